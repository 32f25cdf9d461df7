"""When fixed-proposal importance sampling misleads: the expected gradient of the IS loss against the exact
full-pool gradient (docs/losses.md, "When not to use fixed IS").

    python bench/is_bias.py [--pools 20] [--draws 200000] [--pool-size 64]

For each of `--pools` random pools: rewards a_i ~ N(mean, std) over C candidates, the exact PL loss over the pool
`softplus(logsumexp a)` and its gradient; then the IS loss of trainer.losses (`importance_sampled_pl_loss`) on
`--draws` independent sets of K' draws from a proposal q, its gradient averaged over the draws (the expected
gradient, to Monte Carlo error), and the cosine between the two. Proposals: `uniform-ish` (softmax of small
scores, like a shard's q when the SAE scores barely differ), and `ideal` (q proportional to e^a, what the learned
proposal aims at). Also the mean ESS / K' and max normalised weight the trainer logs (is/ess, is/max_weight)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from trainer.losses import importance_sampled_pl_loss, sample_from_proposal


def expected_is_gradient(a: torch.Tensor, q: torch.Tensor, k_prime: int, draws: int, gen: torch.Generator):
    """(E[grad_a of the IS loss], mean ESS / K', mean max weight) over `draws` sets of K' draws from q."""
    leaf = a.clone().requires_grad_()
    s = sample_from_proposal(q.expand(draws, -1), None, k_prime, gen)
    out = importance_sampled_pl_loss(torch.zeros(draws, dtype=a.dtype), leaf[s.idx_bk], s.q_bk, beta=1.0,
                                     reduction="none")
    out.loss.sum().backward()
    return leaf.grad / draws, float((out.ess_b / k_prime).mean()), float(out.max_weight_b.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, default=20)
    ap.add_argument("--draws", type=int, default=200_000)
    ap.add_argument("--pool-size", type=int, default=64)
    ap.add_argument("--mean", type=float, default=-2.0)
    ap.add_argument("--std", type=float, default=3.0)
    ap.add_argument("--score-spread", type=float, default=0.3, help="q = softmax(U[0, spread]) (uniform-ish)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k_prime in (1, 2, 4, 8, 16, 64):
        for name in ("uniform-ish", "ideal"):
            cos, ess, wmax = [], [], []
            for p in range(args.pools):
                g = torch.Generator().manual_seed(1000 + p)
                a = args.mean + args.std * torch.randn(args.pool_size, generator=g, dtype=torch.float64)
                exact = torch.sigmoid(torch.logsumexp(a, 0)) * torch.softmax(a, 0)  # d softplus(LSE a) / d a
                if name == "ideal":
                    q = torch.softmax(a, 0)
                else:
                    q = torch.softmax(args.score_spread * torch.rand(args.pool_size, generator=g, dtype=torch.float64), 0)
                grad, e, w = expected_is_gradient(a, q, k_prime, args.draws, gen)
                cos.append(float(F.cosine_similarity(grad, exact, dim=0)))
                ess.append(e)
                wmax.append(w)
            n = len(cos)
            rows.append((k_prime, name, sum(cos) / n, min(cos), sum(ess) / n, sum(wmax) / n))
    print(f"a ~ N({args.mean}, {args.std}), C = {args.pool_size}, {args.pools} pools, {args.draws} draw sets each")
    print(f"| K' | proposal | cos(E[grad IS], grad pool) mean | min | is/ess (ESS/K') | is/max_weight |")
    print("|---|---|---|---|---|---|")
    for k, name, c, cmin, e, w in rows:
        print(f"| {k} | {name} | {c:.3f} | {cmin:.3f} | {e:.3f} | {w:.3f} |")


if __name__ == "__main__":
    main()
