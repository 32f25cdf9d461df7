"""Benchmark the SAE: candidates scored per second, rank-one vs dense, and seconds per training epoch.

    .venv/bin/python bench/sae_score.py             # Dv = Dt = 512, k = 128: ~30 s on 2 CPU cores
    .venv/bin/python bench/sae_score.py --quick     # tiny sizes, seconds: checks the script runs
    .venv/bin/python bench/sae_score.py --full-epoch  # time a real epoch of --train-pairs (~2 min more)

Both scoring paths get the same SAE and the same inputs in one run; each is timed --reps times, medians reported.
- dense: materialise d = s vec(u t^T) (C x Dv*Dt) and apply the flat encoder and decoder (`sae.dense_reference`).
- rank-one, 1 prompt per call: `sae.score_candidates(u_c (C, Dv), t (Dt,))`: P, Q for the prompt, then O(C Dv k).
- rank-one, E prompts per call: `sae.score_candidates(u (E, C, Dv), t (E, Dt))`: P, Q for all E prompts in one
  matrix product, which reads the 2 x 134 MB of weights once instead of E times. This is how the miner should call it.
Training: `train_sae` for one epoch on pairs shaped like mining data (prompts x candidates per prompt).
Writes a table to stdout and JSON to reports/bench/sae_score.json.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store.parquet_io import write_json_atomic  # noqa: E402
from sae import SaeConfig, SparseAutoencoder, TrainConfig, train_sae  # noqa: E402
from sae.autoencoder import library_versions  # noqa: E402
from sae.dense_reference import dense_score_candidates  # noqa: E402


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def clip_like_pairs(n_prompts: int, per_prompt: int, dv: int, dt: int, g: torch.Generator):
    """u = h_v(m_p) - h_v(m_i) of L2-normalised embeddings with candidates near their positive, t normalised."""
    pos = unit(torch.randn(n_prompts, 1, dv, generator=g))
    cand = unit(pos + 0.6 * unit(torch.randn(n_prompts, per_prompt, dv, generator=g)))
    u = pos - cand  # (E, C, Dv)
    t = unit(torch.randn(n_prompts, dt, generator=g))
    return u, t


def median_seconds(fn, reps: int) -> tuple[float, list[float]]:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_scoring(args, g: torch.Generator) -> dict:
    cfg = SaeConfig(kind=args.kind, dv=args.dv, dt=args.dt, num_latents=args.k, k_active=min(8, args.k))
    sae = SparseAutoencoder(cfg, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 1e-3, generator=g)
    C, E = args.candidates, args.prompts
    u, t = clip_like_pairs(E, C, args.dv, args.dt, g)

    start = time.perf_counter()
    sae.scorer()  # prompt-independent terms (Gram matrix): once per trained SAE, not per prompt
    build_s = time.perf_counter() - start

    state = {"i": 0}

    def next_prompt():
        state["i"] = (state["i"] + 1) % E
        return state["i"]

    def dense_one():
        i = next_prompt()
        return dense_score_candidates(sae, u[i], t[i])

    def rank_one_one():
        i = next_prompt()
        return sae.score_candidates(u[i], t[i])

    def rank_one_batched():
        return sae.score_candidates(u, t)

    # agreement of the two paths on the same inputs (float32)
    ref_err, ref_codes = dense_score_candidates(sae, u[0], t[0])
    fast = sae.score_candidates(u[0], t[0])
    rel_err = float((fast.recon_error - ref_err).abs().max() / ref_err.abs().max())
    code_diff = float((fast.codes - ref_codes).abs().max())

    rows = []
    for name, fn, per_call in [
        ("dense (materialise d)", dense_one, C),
        ("rank-one, 1 prompt per call", rank_one_one, C),
        (f"rank-one, {E} prompts per call", rank_one_batched, E * C),
    ]:
        with torch.no_grad():
            med, times = median_seconds(fn, args.reps)
        rows.append({"path": name, "candidates_per_call": per_call, "median_s_per_call": med,
                     "candidates_per_s": per_call / med, "times_s": times})
    dense_rate = rows[0]["candidates_per_s"]
    for row in rows:
        row["speedup_vs_dense"] = row["candidates_per_s"] / dense_rate
    return {
        "config": cfg.to_dict(),
        "candidates_per_prompt": C,
        "prompts": E,
        "scorer_build_s": build_s,
        "max_rel_diff_recon_error": rel_err,
        "max_abs_diff_codes": code_diff,
        "rows": rows,
        "headline_speedup": rows[2]["speedup_vs_dense"],
        "per_prompt_speedup": rows[1]["speedup_vs_dense"],
    }


def bench_training(args, g: torch.Generator) -> dict:
    per_prompt = args.candidates
    n_prompts = math.ceil(args.train_pairs / per_prompt)
    u, t = clip_like_pairs(n_prompts, per_prompt, args.dv, args.dt, g)
    u = u.reshape(-1, args.dv)[: args.train_pairs]
    t = t.repeat_interleave(per_prompt, 0)[: args.train_pairs]
    n_timed = args.train_pairs if args.full_epoch else min(args.timed_pairs, args.train_pairs)
    idx = torch.randperm(args.train_pairs, generator=g)[:n_timed]  # a random subset keeps the prompt mix per batch
    cfg = SaeConfig(kind=args.kind, dv=args.dv, dt=args.dt, num_latents=args.k, k_active=min(8, args.k))
    run = TrainConfig(batch_size=args.batch_size, max_epochs=1)
    start = time.perf_counter()
    _, history = train_sae(u[idx], t[idx], cfg, run, progress=False)
    total = time.perf_counter() - start
    epoch_s = history["epochs"][0]["seconds"]
    steps = math.ceil(history["n_train"] / args.batch_size)
    return {
        "kind": args.kind,
        "train_pairs": args.train_pairs,
        "distinct_prompts": n_prompts,
        "timed_pairs": n_timed,
        "batch_size": args.batch_size,
        "steps_timed": steps,
        "seconds_timed_epoch": epoch_s,
        "seconds_per_step": epoch_s / steps,
        "seconds_per_epoch": epoch_s * args.train_pairs / n_timed,
        "extrapolated": n_timed < args.train_pairs,
        "seconds_train_sae_call": total,
        "val_fvu_after_epoch": history["final_val"]["fvu"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dv", type=int, default=512)
    p.add_argument("--dt", type=int, default=512)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--kind", default="sigmoid", choices=["sigmoid", "topk"])
    p.add_argument("--candidates", type=int, default=64, help="candidates per prompt (SPEC default M = 64)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per call of the batched rank-one path")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--train-pairs", type=int, default=20_000)
    p.add_argument("--timed-pairs", type=int, default=4096, help="pairs actually trained on; epoch time scaled up")
    p.add_argument("--full-epoch", action="store_true", help="train a full epoch of --train-pairs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    p.add_argument("--out", default="reports/bench/sae_score.json")
    args = p.parse_args()
    if args.quick:
        args.dv, args.dt, args.k, args.reps, args.train_pairs, args.timed_pairs = 32, 32, 16, 3, 2000, 1000

    g = torch.Generator().manual_seed(0)
    scoring = bench_scoring(args, g)
    training = bench_training(args, g)

    print(f"\nSAE scoring, Dv={args.dv} Dt={args.dt} k={args.k} ({args.kind}), {args.candidates} candidates per prompt, "
          f"median of {args.reps}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'path':34s} {'cand/call':>9s} {'s/call':>9s} {'cand/s':>10s} {'vs dense':>9s}")
    for r in scoring["rows"]:
        print(f"{r['path']:34s} {r['candidates_per_call']:9d} {r['median_s_per_call']:9.4f} "
              f"{r['candidates_per_s']:10.0f} {r['speedup_vs_dense']:8.1f}x")
    print(f"one-off Scorer build (Gram matrix etc.): {scoring['scorer_build_s']:.3f} s; "
          f"rank-one vs dense: max rel diff of recon error {scoring['max_rel_diff_recon_error']:.1e}, "
          f"max abs diff of codes {scoring['max_abs_diff_codes']:.1e}")
    tr = training
    how = f"extrapolated from {tr['timed_pairs']} pairs" if tr["extrapolated"] else "measured"
    print(f"\nSAE training ({tr['kind']}), {tr['train_pairs']} pairs from {tr['distinct_prompts']} prompts, batch "
          f"{tr['batch_size']}: {tr['seconds_per_step']:.2f} s/step, {tr['seconds_per_epoch']:.0f} s/epoch ({how})")

    out = {"scoring": scoring, "training": training, "threads": torch.get_num_threads(),
           "machine": platform.platform(), "library_versions": library_versions(), "argv": sys.argv[1:]}
    write_json_atomic(out, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
