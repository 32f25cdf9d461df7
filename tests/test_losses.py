"""trainer/losses.py and trainer/proposal.py: formulas against hand-computed values, masks, the IS estimator's
behaviour in K' (SPEC §3: Z_hat unbiased, the loss gradient consistent), the learned proposal, configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    PRESETS, LossConfig, LossInputs, anchor_loss, chip_joint_loss, compute_loss, image_pl_loss,
    importance_sampled_pl_loss, proposal_entropy, sample_from_proposal, sft_loss, text_dpo_loss,
)
from trainer.proposal import LearnedProposal, candidate_features

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


# --------------------------------------------------------------------------------------------- PL image loss


def test_image_pl_loss_hand_computed():
    # beta = 0.5, r_p = 1, r_neg = (0, 2, -1):
    # L = -log(e^0.5 / (e^0.5 + e^0 + e^1 + e^-0.5)) = 1.2873386716983295 (numpy, written out)
    r_p = t([1.0]).requires_grad_()
    r_neg = t([[0.0, 2.0, -1.0]]).requires_grad_()
    loss = image_pl_loss(r_p, r_neg, beta=0.5)
    assert loss.item() == pytest.approx(1.2873386716983295, abs=1e-12)
    explicit = -math.log(math.exp(0.5) / (math.exp(0.5) + 1 + math.exp(1) + math.exp(-0.5)))
    assert loss.item() == pytest.approx(explicit, abs=1e-12)
    # SPEC §3 gradient: d/dr_i = beta sigmoid(LSE a) softmax(a)_i, d/dr_p = -sum of those (numpy values)
    loss.backward()
    expected = [0.08370255, 0.22752712, 0.05076816]
    assert r_neg.grad[0].tolist() == pytest.approx(expected, abs=1e-8)
    assert r_p.grad.item() == pytest.approx(-sum(expected), abs=1e-8)


def test_image_pl_loss_one_negative_is_mdpo_pairwise_term():
    g = torch.Generator().manual_seed(0)
    r_p, r_n = torch.randn(16, generator=g, dtype=D) * 3, torch.randn(16, generator=g, dtype=D) * 3
    for beta in (0.1, 0.5, 2.0):
        pl = image_pl_loss(r_p, r_n[:, None], beta=beta, reduction="none")
        torch.testing.assert_close(pl, -F.logsigmoid(beta * (r_p - r_n)), rtol=0, atol=1e-12)


def test_image_pl_loss_masks_and_empty_rows():
    r_p = t([1.0, -0.3, 0.2]).requires_grad_()
    r_neg = t([[0.0, 2.0, -1.0], [0.7, 123.0, float("nan")], [float("inf"), float("nan"), 5.0]]).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    per = image_pl_loss(r_p, r_neg, mask, beta=0.5, reduction="none")
    # row 2: one valid negative, softplus(0.5 * (0.7 + 0.3)) = log1p(e^0.5) = 0.9740769841801067
    assert per.tolist() == pytest.approx([1.2873386716983295, 0.9740769841801067, 0.0], abs=1e-12)
    mean = image_pl_loss(r_p, r_neg, mask, beta=0.5)
    assert mean.item() == pytest.approx((1.2873386716983295 + 0.9740769841801067) / 2, abs=1e-12)  # row 3 left out
    mean.backward()
    assert torch.isfinite(r_neg.grad).all() and torch.isfinite(r_p.grad).all()
    assert r_neg.grad[~mask].abs().max() == 0 and r_p.grad[2] == 0
    # all examples masked: 0, no NaN, backward works
    r_neg2 = torch.zeros(2, 3, dtype=D, requires_grad=True)
    loss = image_pl_loss(torch.zeros(2, dtype=D), r_neg2, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and torch.equal(r_neg2.grad, torch.zeros(2, 3, dtype=D))


def test_padded_negatives_change_nothing():
    g = torch.Generator().manual_seed(1)
    r_p, r_neg = torch.randn(4, generator=g, dtype=D), torch.randn(4, 3, generator=g, dtype=D)
    padded = torch.cat([r_neg, torch.full((4, 2), 1e6, dtype=D)], dim=1)
    mask = torch.cat([torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(image_pl_loss(r_p, padded, mask), image_pl_loss(r_p, r_neg), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------- text, anchor, sft


def test_text_dpo_loss_is_sigmoid_dpo_and_trl_formula():
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=D) * 5 - 20 for _ in range(4))
    beta, label_smoothing = 0.5, 0.0
    ours = text_dpo_loss(pc - rc, pr - rr, beta, reduction="none")
    # TRL DPOTrainer, loss_type="sigmoid", written out
    logits = (pc - pr) - (rc - rr)
    trl = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    torch.testing.assert_close(ours, trl, rtol=0, atol=1e-12)
    by_hand = [math.log1p(math.exp(-beta * v)) for v in logits.tolist()]
    assert ours.tolist() == pytest.approx(by_hand, abs=1e-12)
    # examples without a rejected response: 0, left out of the mean, zero gradient even through NaN padding
    has = torch.tensor([True] * 6 + [False] * 2)
    r_r = torch.where(has, pr - rr, torch.full_like(pr, float("nan"))).requires_grad_()
    loss = text_dpo_loss(pc - rc, r_r, beta, has)
    loss.backward()
    assert loss.item() == pytest.approx(trl[:6].mean().item(), abs=1e-12)
    assert torch.isfinite(r_r.grad).all() and r_r.grad[6:].abs().max() == 0


def test_anchor_and_sft():
    r_c = t([0.4, -2.0])
    assert anchor_loss(r_c, 0.5, reduction="none").tolist() == pytest.approx(
        [math.log1p(math.exp(-0.2)), math.log1p(math.exp(1.0))], abs=1e-12)
    assert anchor_loss(r_c, 0.5, delta=0.3).item() == pytest.approx(
        (math.log1p(math.exp(0.1)) + math.log1p(math.exp(1.3))) / 2, abs=1e-12)
    assert sft_loss(t([-6.0, -2.0]), torch.tensor([3, 1])).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="n_tokens"):
        sft_loss(t([-1.0]), torch.tensor([0]))


# --------------------------------------------------------------------------------------------- importance sampling


def _pool(c=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(c, generator=g, dtype=D) * 1.5
    # a proposal that only roughly follows the posterior, as the mined q does
    q = torch.softmax(0.5 * a + torch.randn(c, generator=g, dtype=D), 0)
    return a, q


def _is_draws(a, q, k_prime, n_draws, seed):
    """n_draws independent IS estimates (one per row): per-draw log Z_hat and gradient of the loss w.r.t. a."""
    s = sample_from_proposal(q.expand(n_draws, -1), None, k_prime, torch.Generator().manual_seed(seed))
    a_rows = a.expand(n_draws, -1).clone().requires_grad_()
    out = importance_sampled_pl_loss(torch.zeros(n_draws, dtype=D), a_rows.gather(1, s.idx_bk), s.q_bk, beta=1.0,
                                     reduction="none")
    out.loss.sum().backward()  # row r's loss depends only on row r: a_rows.grad[r] is that draw's gradient
    return out, a_rows.grad


def test_z_hat_unbiased_even_at_one_draw():
    a, q = _pool()
    z_true = torch.exp(a).sum().item()
    out, _ = _is_draws(a, q, 1, 40_000, seed=0)
    z = torch.exp(out.log_z_hat_b)
    stderr = z.std().item() / math.sqrt(len(z))
    assert abs(z.mean().item() - z_true) < 4 * stderr


def test_is_gradient_consistent_bias_and_spread_shrink_with_k_prime():
    a, q = _pool()
    # full-pool PL gradient w.r.t. a (SPEC §3 closed form, not autograd): sigmoid(LSE a) softmax(a)
    full = torch.sigmoid(torch.logsumexp(a, 0)) * torch.softmax(a, 0)
    bias, spread = {}, {}
    for k_prime in (1, 2, 4, 16, 64):
        _, grads = _is_draws(a, q, k_prime, 4000, seed=k_prime)
        bias[k_prime] = (grads.mean(0) - full).norm().item()
        spread[k_prime] = grads.std(0).norm().item()
    assert bias[64] < bias[1] / 5 and bias[16] < bias[2]
    assert spread[64] < spread[1] / 4 and spread[16] < spread[2]
    assert [spread[k] for k in (1, 2, 4, 16, 64)] == sorted(spread.values(), reverse=True)


def test_ess():
    a = t([[0.3, 0.3, 0.3, 0.3], [50.0, 0.0, 0.0, 0.0]])
    q = t([[0.25] * 4, [0.25] * 4])
    out = importance_sampled_pl_loss(torch.zeros(2, dtype=D), a, q, beta=1.0)
    assert out.ess_b.tolist() == pytest.approx([4.0, 1.0], abs=1e-9)
    assert out.weights_bk.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    # equal weights also when a - log q is constant with unequal q
    q2 = t([[0.1, 0.2, 0.3, 0.4]])
    out2 = importance_sampled_pl_loss(torch.zeros(1, dtype=D), torch.log(q2), q2, beta=1.0)
    assert out2.ess_b.item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="q <= 0"):
        importance_sampled_pl_loss(torch.zeros(1, dtype=D), a[:1], t([[0.5, 0.5, 0.0, 0.0]]))


def test_sample_from_proposal_deterministic_masked_and_renormalised():
    q = t([[0.2, 0.3, 0.5, 0.0], [0.5, 0.5, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4])
    s1 = sample_from_proposal(q, mask, 2000, torch.Generator().manual_seed(7))
    s2 = sample_from_proposal(q, mask, 2000, torch.Generator().manual_seed(7))
    assert torch.equal(s1.idx_bk, s2.idx_bk)
    assert s1.mask_bk[:2].all() and not s1.mask_bk[2].any()
    assert (s1.idx_bk[0] < 3).all() and (s1.idx_bk[1] < 2).all()  # padding never drawn
    freq = torch.bincount(s1.idx_bk[0], minlength=3).to(D) / 2000
    assert freq.tolist() == pytest.approx([0.2, 0.3, 0.5], abs=0.04)
    assert set(s1.q_bk[1].tolist()) == {0.5}  # renormalised over the valid pool
    with pytest.raises(ValueError, match="k_prime"):
        sample_from_proposal(q, mask, 0)
    with pytest.raises(ValueError, match="never be drawn"):
        sample_from_proposal(t([[0.0, 1.0]]), None, 2)
    assert proposal_entropy(t([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]])).tolist() == pytest.approx([math.log(4), 0.0])


# --------------------------------------------------------------------------------------------- learned proposal


def _proposal_world(b=6, c=16, k=8, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    code_idx = torch.stack([torch.randperm(k, generator=g)[:n] for _ in range(b * c)]).reshape(b, c, n)
    code_val = torch.rand(b, c, n, generator=g)
    score, clip = torch.rand(b, c, generator=g) * 2, torch.rand(b, c, generator=g)
    feats = candidate_features(code_idx.to(torch.uint16), code_val, score, clip, k)
    q_fixed = torch.softmax(score, -1)
    # a synthetic posterior that depends on the code, which q_fixed (the score) does not know about
    a = 3.0 * feats[..., :k] @ torch.randn(k, generator=g)
    return feats, q_fixed, a


def _kl(a, log_q):
    p = torch.softmax(a, -1)
    return (p * (torch.log(p) - log_q)).sum(-1).mean().item()


def test_candidate_features_densify():
    feats = candidate_features(torch.tensor([[[2, 0]]], dtype=torch.uint16), t([[[0.5, 0.25]]]), t([[1.5]]),
                               t([[0.9]]), 4)
    assert feats[0, 0].tolist() == pytest.approx([0.25, 0.0, 0.5, 0.0, 1.5, 0.9])
    with pytest.raises(ValueError, match="num_latents"):
        candidate_features(torch.tensor([[[5]]]), t([[[1.0]]]), t([[0.0]]), t([[0.0]]), 4)


def test_learned_proposal_learns_the_posterior_with_is_weights():
    feats, q_fixed, a = _proposal_world()
    mask = torch.ones_like(q_fixed, dtype=torch.bool)
    prop = LearnedProposal(8, lr=1e-2, seed=0)
    torch.testing.assert_close(torch.exp(prop.log_q_phi(feats, q_fixed, mask)), q_fixed)  # starts at q_fixed
    kl0 = _kl(a, prop.log_q_phi(feats, q_fixed, mask).detach())
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        q = prop.mixture(feats, q_fixed, mask)
        s = sample_from_proposal(q, mask, 8, gen)
        # the policy side: r_p = 0, beta = 1, so a of each draw is the synthetic posterior's logit
        out = importance_sampled_pl_loss(torch.zeros(len(a)), a.gather(1, s.idx_bk), s.q_bk, beta=1.0)
        prop.update(feats, q_fixed, mask, s.idx_bk, out.weights_bk, s.mask_bk)
    kl1 = _kl(a, prop.log_q_phi(feats, q_fixed, mask).detach())
    assert kl1 < 0.1 * kl0, (kl0, kl1)


def test_proposal_loss_estimates_full_pool_cross_entropy():
    # the IS correction: with many draws, sum_k w_k log q_phi(i_k) -> sum_i p_i log q_phi_i over the whole pool
    feats, q_fixed, a = _proposal_world(b=2)
    mask = torch.ones_like(q_fixed, dtype=torch.bool)
    prop = LearnedProposal(8, seed=1)
    with torch.no_grad():
        prop.net.mlp[-1].weight.normal_(0, 0.5)  # a q_phi that differs from q_fixed and from p
    q = prop.mixture(feats, q_fixed, mask)
    s = sample_from_proposal(q, mask, 20_000, torch.Generator().manual_seed(0))
    w = importance_sampled_pl_loss(torch.zeros(2), a.gather(1, s.idx_bk), s.q_bk, beta=1.0).weights_bk
    est = prop.loss(feats, q_fixed, mask, s.idx_bk, w).item()
    full = -(torch.softmax(a, -1) * prop.log_q_phi(feats, q_fixed, mask)).sum(-1).mean().item()
    assert est == pytest.approx(full, rel=0.03)


def test_mixture_keeps_q_away_from_zero():
    feats, q_fixed, _ = _proposal_world()
    mask = torch.ones_like(q_fixed, dtype=torch.bool)
    mask[0, 10:] = False
    prop = LearnedProposal(8, eps=0.1, seed=0)
    with torch.no_grad():  # drive q_phi to near one-hot
        prop.net.mlp[-1].weight.normal_(0, 200.0)
    assert torch.exp(prop.log_q_phi(feats, q_fixed, mask)).min() < 1e-20
    uniform = torch.where(mask, 1.0, 0.0)
    for base in (q_fixed, uniform):
        q = prop.mixture(feats, base, mask)
        assert q[~mask].abs().max() == 0 and q.sum(-1).tolist() == pytest.approx([1.0] * 6)
        base_n = torch.where(mask, base, 0) / torch.where(mask, base, 0).sum(-1, keepdim=True)
        assert (q[mask] >= 0.1 * base_n[mask] * (1 - 1e-6)).all()
    q_u = prop.mixture(feats, uniform, mask)
    c = mask.sum(-1, keepdim=True).expand_as(mask)
    assert (q_u[mask] >= (0.1 / c[mask]) * (1 - 1e-6)).all()  # >= eps / C with a uniform base
    state = prop.state_dict()
    prop2 = LearnedProposal(8, eps=0.1, seed=5)
    prop2.load_state_dict(state)
    torch.testing.assert_close(prop2.mixture(feats, q_fixed, mask), prop.mixture(feats, q_fixed, mask))
    with pytest.raises(ValueError, match="proposal_eps"):
        LearnedProposal(8, eps=0.2).load_state_dict(state)
    with pytest.raises(ValueError, match="eps"):
        LearnedProposal(8, eps=0.0)
    learned = LossConfig.from_preset("misp", is_mode="learned", proposal_eps=0.2)
    assert LearnedProposal.from_config(learned, 8).eps == 0.2
    with pytest.raises(ValueError, match="is_mode='learned'"):
        LearnedProposal.from_config(PRESETS["misp"], 8)


# --------------------------------------------------------------------------------------------- config and batch


def test_presets_are_spec_table():
    combos = {name: (c.lambda_text > 0, c.use_image, c.image_negatives, c.num_negatives, c.anchor_weight > 0,
                     c.anchor_delta, c.shard_rule, c.is_mode, c.fresh_negatives, c.loss_form)
              for name, c in PRESETS.items()}
    assert combos == {
        "sft": (False, False, "none", 1, False, 0.0, None, "none", False, "sum"),
        "dpo": (True, False, "none", 1, False, 0.0, None, "none", False, "sum"),
        "mdpo": (True, True, "crop", 1, True, 0.0, None, "none", True, "sum"),
        "chip": (True, True, "diffusion_noise", 1, False, 0.0, None, "none", True, "chip_joint"),
        "random_multi": (True, True, "shard", 3, False, 0.0, "random_pool", "none", False, "sum"),
        "misp": (True, True, "shard", 3, False, 0.0, "greedy", "none", False, "sum"),
    }
    assert all(c.beta == 0.5 and c.sft_weight == (name == "sft") for name, c in PRESETS.items())
    assert LossConfig() == PRESETS["misp"]
    assert LossConfig.from_preset("misp", is_mode="learned", k_prime=2).uses_pool


@pytest.mark.parametrize("preset,overrides,match", [
    ("mdpo", {"is_mode": "learned"}, "only shards"),
    ("dpo", {"is_mode": "fixed"}, "only shards"),
    ("misp", {"is_mode": "fixed", "k_prime": 0}, "k_prime"),
    ("misp", {"num_negatives": 0}, "num_negatives"),
    ("misp", {"beta": 0.0}, "beta"),
    ("misp", {"lambda_text": -1.0}, "lambda_text"),
    ("misp", {"is_mode": "learned", "proposal_eps": 0.0}, "proposal_eps"),
    ("misp", {"is_mode": "sometimes"}, "is_mode"),
    ("dpo", {"image_negatives": "crop"}, "use_image"),
    ("chip", {"shard_rule": "greedy"}, "shard_rule"),
    ("misp", {"shard_rule": None}, "shard_rule"),
    ("dpo", {"lambda_text": 0.0}, "every loss term is off"),
    ("misp", {"fresh_negatives": True}, "fresh_negatives"),
    ("misp", {"loss_form": "chip_joint"}, "chip_joint"),
    ("chip", {"lambda_text": 0.0}, "chip_joint"),
    ("chip", {"loss_form": "joint"}, "loss_form"),
    ("nope", {}, "unknown loss preset"),
])
def test_invalid_combinations_raise(preset, overrides, match):
    with pytest.raises(ValueError, match=match):
        LossConfig.from_preset(preset, **overrides)


def _batch(b=4, k=3, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D) - 10  # noqa: E731
    return LossInputs(logp_chosen=r(b), ref_chosen=r(b), logp_rejected=r(b), ref_rejected=r(b),
                      logp_neg=r(b, k), ref_neg=r(b, k), **extra)


def test_compute_loss_combines_terms_and_names_metrics():
    x = _batch()
    r_c, r_r = x.logp_chosen - x.ref_chosen, x.logp_rejected - x.ref_rejected
    r_n = x.logp_neg - x.ref_neg
    l_text = text_dpo_loss(r_c, r_r, 0.5)
    l_img = image_pl_loss(r_c, r_n, beta=0.5)
    out = compute_loss(PRESETS["dpo"], x)
    assert out.loss.item() == pytest.approx(l_text.item()) and "loss/img" not in out.metrics
    assert "rewards/img_margin" in out.metrics  # negatives present: watched, not trained on
    out = compute_loss(PRESETS["misp"], x)
    assert out.loss.item() == pytest.approx((l_img + l_text).item()) and out.is_weights is None
    out = compute_loss(PRESETS["mdpo"], x)
    assert out.loss.item() == pytest.approx((l_img + l_text + anchor_loss(r_c, 0.5)).item())
    m = out.metrics
    assert m["loss"] == pytest.approx(out.loss.item())
    assert m["rewards/chosen"] == pytest.approx((0.5 * r_c).mean().item())
    assert m["rewards/margins"] == pytest.approx((0.5 * (r_c - r_r)).mean().item())
    assert m["rewards/accuracies"] == pytest.approx((r_c > r_r).to(D).mean().item())
    assert m["rewards/img_margin"] == pytest.approx((0.5 * (r_c[:, None] - r_n)).mean().item())
    assert m["rewards/img_accuracy"] == pytest.approx((r_c[:, None] > r_n).to(D).mean().item())
    assert m["logps/img_negatives"] == pytest.approx(x.logp_neg.mean().item())
    assert {"logps/chosen", "logps/rejected", "rewards/rejected", "loss/text", "loss/img", "loss/anchor"} <= set(m)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    with pytest.raises(ValueError, match="n_tokens_chosen"):
        compute_loss(LossConfig.from_preset("misp", sft_weight=1.0), x)
    with pytest.raises(ValueError, match="logp_neg"):
        compute_loss(PRESETS["misp"], LossInputs(x.logp_chosen, x.ref_chosen, x.logp_rejected, x.ref_rejected))
    with pytest.raises(ValueError, match="shape"):
        LossInputs(x.logp_chosen, x.ref_chosen[:2])


def test_compute_loss_importance_sampled():
    b, c, kp = 3, 10, 4
    q_pool = torch.softmax(torch.randn(b, c, generator=torch.Generator().manual_seed(0), dtype=D), -1)
    pool_mask = torch.ones(b, c, dtype=torch.bool)
    pool_mask[2] = False  # an example whose pool is empty
    s = sample_from_proposal(q_pool, pool_mask, kp, torch.Generator().manual_seed(0))
    x = _batch(b=b, logp_samp=torch.randn(b, kp, dtype=D), ref_samp=torch.randn(b, kp, dtype=D), q_samp=s.q_bk,
               samp_mask=s.mask_bk, q_pool=q_pool, pool_mask=pool_mask)
    cfg = LossConfig.from_preset("misp", is_mode="fixed", k_prime=kp)
    out = compute_loss(cfg, x)
    r_c = x.logp_chosen - x.ref_chosen
    is_out = importance_sampled_pl_loss(r_c, x.logp_samp - x.ref_samp, s.q_bk, 0.5, s.mask_bk)
    text = text_dpo_loss(r_c, x.logp_rejected - x.ref_rejected, 0.5)
    assert out.loss.item() == pytest.approx((is_out.loss + text).item())
    assert out.metrics["is/ess"] == pytest.approx((is_out.ess_b[:2] / kp).mean().item())
    assert 0 < out.metrics["is/ess"] <= 1 and 0 < out.metrics["is/q_entropy"] <= math.log(c)
    assert out.is_weights.shape == (b, kp) and out.is_weights[2].abs().max() == 0


def test_compute_loss_gradients_flow_and_are_finite_without_rejected():
    x = _batch(has_rejected=torch.tensor([False] * 4))
    x.logp_chosen.requires_grad_()
    out = compute_loss(PRESETS["misp"], x)
    out.loss.backward()
    assert torch.isfinite(x.logp_chosen.grad).all() and x.logp_chosen.grad.abs().sum() > 0
    assert "rewards/accuracies" not in out.metrics and out.metrics["loss/text"] == 0


# --------------------------------------------------------------------------------------------- CHiP's joint form


def test_chip_joint_loss_is_one_sigmoid_over_summed_margins():
    # beta 0.5, r_c = 1, r_r = -1, r_neg = 0.5: -logsigmoid(0.5 * 2 + 0.5 * 0.5) = log(1 + e^-1.25)
    r_c, r_r, r_n = t([1.0]), t([-1.0]), t([0.5])
    assert chip_joint_loss(r_c, r_r, r_n, 0.5).item() == pytest.approx(math.log1p(math.exp(-1.25)), abs=1e-12)
    # the decomposed form is two sigmoids: log(1 + e^-1) + log(1 + e^-0.25), a different number
    decomposed = text_dpo_loss(r_c, r_r, 0.5) + image_pl_loss(r_c, r_n[:, None], beta=0.5)
    assert decomposed.item() == pytest.approx(math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.25)), abs=1e-12)
    # without y_n only the image margin is left; lambda_text scales the text margin inside the sigmoid
    assert chip_joint_loss(r_c, r_r, r_n, 0.5, has_rejected_b=torch.tensor([False])).item() == pytest.approx(
        math.log1p(math.exp(-0.25)), abs=1e-12)
    assert chip_joint_loss(r_c, r_r, r_n, 0.5, text_weight=2.0).item() == pytest.approx(
        math.log1p(math.exp(-2.25)), abs=1e-12)


def test_chip_preset_trains_the_joint_form():
    x = _batch(k=1)
    r_c, r_r = x.logp_chosen - x.ref_chosen, x.logp_rejected - x.ref_rejected
    r_n = (x.logp_neg - x.ref_neg)[:, 0]
    out = compute_loss(PRESETS["chip"], x)
    expected = (-F.logsigmoid(0.5 * (r_c - r_r) + 0.5 * (r_c - r_n))).mean()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert "loss/chip_joint" in out.metrics and "loss/text" not in out.metrics and "loss/img" not in out.metrics
    summed = compute_loss(LossConfig.from_preset("chip", loss_form="sum"), x)
    assert summed.loss.item() != pytest.approx(out.loss.item())
    with pytest.raises(ValueError, match="one valid image negative"):
        compute_loss(PRESETS["chip"], _batch(k=2))


# --------------------------------------------------------------------------------------------- fixed-IS diagnostics


def test_fixed_is_logs_ess_and_max_weight():
    # one example, K' = 2 draws with a = beta (r_i - r_p) = (0, log 3) and q = (0.5, 0.5):
    # weights softmax(a - log q) = (1/4, 3/4), ESS = 1 / (1/16 + 9/16) = 1.6, max weight 3/4
    x = LossInputs(logp_chosen=t([0.0]), ref_chosen=t([0.0]), logp_samp=t([[0.0, math.log(3.0)]]),
                   ref_samp=t([[0.0, 0.0]]), q_samp=t([[0.5, 0.5]]))
    out = compute_loss(LossConfig.from_preset("misp", is_mode="fixed", k_prime=2, lambda_text=0.0, beta=1.0), x)
    assert out.metrics["is/max_weight"] == pytest.approx(0.75, abs=1e-12)
    assert out.metrics["is/ess"] == pytest.approx(1.6 / 2, abs=1e-12)


def test_shard_rule_is_checked_against_the_shards_not_a_list(tmp_path):
    """The trainer keeps no list of mining rules: a rule is right when the shards record it (a new selection rule
    is a change in pipeline.selection only), and shards of another rule are refused with both names."""
    import polars as pl

    from store.parquet_io import write_parquet_atomic
    from trainer.state import check_shard_rule

    write_parquet_atomic(pl.DataFrame({"example_id": ["a"]}), tmp_path / "shard=000.parquet",
                         {"config": {"rule": "my_new_rule"}})
    check_shard_rule(LossConfig.from_preset("misp", shard_rule="my_new_rule"), tmp_path)
    with pytest.raises(ValueError, match=r"rule='random_pool' but .* holds \['my_new_rule'\]"):
        check_shard_rule(LossConfig.from_preset("random_multi"), tmp_path)
    check_shard_rule(LossConfig.from_preset("dpo"), tmp_path)  # no image negatives from shards: nothing to check
