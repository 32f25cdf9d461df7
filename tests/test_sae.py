"""The SAE model: rank-one path == dense reference, losses, scoring, save/load and the errors users meet."""

import json
import math

import numpy as np
import pytest
import torch

from sae import SaeConfig, SchemaVersionError, SparseAutoencoder, kl_sparsity, semantic_deviation
from sae.dense_reference import dense_forward, fused_inputs

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which stalls badly on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DV, DT, K = 6, 5, 10
KINDS = ["sigmoid", "topk"]
SPACES = ["fused", "image"]


def make_sae(kind="sigmoid", space="fused", seed=0, **kw) -> SparseAutoencoder:
    """A float64 SAE with every parameter (biases included) perturbed away from its initialisation."""
    cfg = SaeConfig(kind=kind, space=space, dv=DV, dt=DT, num_latents=K, k_active=3, input_scale=1.7, **kw)
    sae = SparseAutoencoder(cfg, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sae


def pairs(n=9, seed=0):
    """u (n, DV), t (n, DT) in float64; rows 1 and 4 share a prompt, as pairs of one example do."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, DV, generator=g, dtype=torch.float64)
    t = torch.randn(n, DT, generator=g, dtype=torch.float64)
    t[4] = t[1]
    return u, t


def assert_rel(a: torch.Tensor, b: torch.Tensor, rel=1e-6):
    """max |a - b| <= rel * max |b|: relative agreement at the scale of the quantity."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-300)
    assert float((a - b).abs().max() / scale) <= rel, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("kind", KINDS)
def test_rank_one_matches_dense(kind, space):
    sae = make_sae(kind, space)
    assert sae.b_enc.abs().min() > 0 and sae.b_dec.abs().min() > 0  # the bias terms are exercised
    u, t = pairs()
    out = sae(u, t)
    ref = dense_forward(sae, u, t)
    assert_rel(out.pre_acts, ref.pre_acts)
    assert_rel(out.recon_error, ref.recon_error)
    torch.testing.assert_close(out.latents, ref.latents, rtol=1e-9, atol=1e-12)
    # encode() (its own path, without the decoder terms) agrees too
    assert_rel(sae.encode(u, t).pre_acts, ref.pre_acts)
    # batch FVU against the dense definition
    uu, tt = sae.prepare(u, t)
    d = fused_inputs(uu, tt, sae.cfg.input_scale)
    fvu = ref.recon_error.sum() / ((d - d.mean(0)) ** 2).sum()
    assert_rel(out.fvu, fvu)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("kind", KINDS)
def test_score_candidates_matches_dense(kind, space):
    sae = make_sae(kind, space)
    u, t = pairs(n=7)
    score = sae.score_candidates(u, t[0])
    ref = dense_forward(sae, u, t[0])
    assert score.recon_error.shape == (7,) and score.codes.shape == (7, K)
    assert_rel(score.recon_error, ref.recon_error)
    torch.testing.assert_close(score.codes, ref.latents, rtol=1e-9, atol=1e-12)
    # E prompts at once: u (E, C, Dv), t (E, Dt)
    u3 = u.reshape(1, 7, DV).expand(3, -1, -1) * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)[:, None, None]
    batched = sae.score_candidates(u3, t[:3])
    for e in range(3):
        ref_e = dense_forward(sae, u3[e], t[e])
        assert_rel(batched.recon_error[e], ref_e.recon_error)
        torch.testing.assert_close(batched.codes[e], ref_e.latents, rtol=1e-9, atol=1e-12)


def test_scorer_cache_follows_weight_changes():
    sae = make_sae("sigmoid")
    u, t = pairs()
    before = sae.score_candidates(u, t[0]).recon_error
    with torch.no_grad():
        sae.W_dec.mul_(1.5)
    after = sae.score_candidates(u, t[0]).recon_error
    assert not torch.allclose(before, after)
    assert_rel(after, dense_forward(sae, u, t[0]).recon_error)


def test_kl_penalty_hand_computed():
    latents = torch.tensor([[0.2, 0.5], [0.4, 0.1]], dtype=torch.float64)
    # rho_hat = (0.3, 0.3); KL(0.1 || 0.3) = 0.1 ln(0.1/0.3) + 0.9 ln(0.9/0.7) = 0.1163217566, twice
    assert kl_sparsity(latents, rho=0.1).item() == pytest.approx(0.2326435132, abs=1e-9)
    assert kl_sparsity(torch.full((3, 4), 0.05, dtype=torch.float64), rho=0.05).item() == pytest.approx(0.0, abs=1e-12)


def test_forward_losses_compose():
    sae = make_sae("sigmoid", gamma=2.0, rho=0.1)
    u, t = pairs()
    out = sae(u, t)
    assert out.sparsity_loss.item() == pytest.approx(2.0 * kl_sparsity(out.latents, 0.1).item())
    assert out.recon_loss.item() == pytest.approx(out.recon_error.mean().item())
    assert out.loss.item() == pytest.approx((out.recon_loss + out.sparsity_loss).item())
    assert out.auxk_loss.item() == 0.0


def test_semantic_deviation_is_l1():
    z = torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(semantic_deviation(z), torch.tensor([1.5, 2.0]))


@pytest.mark.parametrize("space", SPACES)
def test_auxk_matches_dense_and_reaches_dead_latents(space):
    sae = make_sae("topk", space, aux_k=2, aux_coef=0.5)
    u, t = pairs()
    dead = torch.zeros(K, dtype=torch.bool)
    dead[[0, 3, 7]] = True
    out = sae(u, t, dead_mask=dead)
    # dense: residual e (detached), top-2 relu pre-activations among the dead latents decoded without bias
    ref = dense_forward(sae, u, t)
    uu, tt = sae.prepare(u, t)
    d = fused_inputs(uu, tt, sae.cfg.input_scale)
    W = sae.W_dec.reshape(K, -1)
    e = d - (ref.latents @ W + sae.b_dec.reshape(-1))
    acts = torch.relu(ref.pre_acts[:, dead])
    top = acts.topk(2, dim=-1)
    z_aux = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
    e_hat = z_aux @ W[dead]
    want = 0.5 * ((e - e_hat) ** 2).sum() / (e**2).sum()
    assert out.auxk_loss.item() > 0
    assert out.auxk_loss.item() == pytest.approx(want.item(), rel=1e-9)
    # its gradient reaches the dead latents' encoder rows
    out.auxk_loss.backward()
    assert sae.W_enc.grad[dead].abs().sum() > 0


def test_auxk_off_without_dead_latents():
    sae = make_sae("topk")
    u, t = pairs()
    assert sae(u, t, dead_mask=torch.zeros(K, dtype=torch.bool)).auxk_loss.item() == 0.0


def test_unit_norm_decoder_projection():
    sae = make_sae("topk")
    u, t = pairs()
    sae(u, t).loss.backward()
    sae.set_decoder_norm_to_unit_norm()
    sae.remove_gradient_parallel_to_decoder_directions()
    w, g = sae.W_dec.flatten(1), sae.W_dec.grad.flatten(1)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(K, dtype=torch.float64))
    torch.testing.assert_close((w * g).sum(1), torch.zeros(K, dtype=torch.float64), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- save / load and errors


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    sae = make_sae(kind)
    sae.save(tmp_path / "sae")
    assert {p.name for p in (tmp_path / "sae").iterdir()} == {"sae.safetensors", "cfg.json"}
    raw = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert raw["schema_version"] == 1 and "torch" in raw["library_versions"]
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and loaded.dtype == torch.float64
    u, t = pairs()
    a, b = sae(u, t), loaded(u, t)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(sae.score_candidates(u, t[0]).recon_error, loaded.score_candidates(u, t[0]).recon_error)


def test_load_refuses_other_schema_version(tmp_path):
    make_sae().save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    raw["schema_version"] = 0
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SchemaVersionError, match="schema version 0.*reads version 1"):
        SparseAutoencoder.load(tmp_path)


def test_load_refuses_weights_that_do_not_match_config(tmp_path):
    make_sae().save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    raw["dv"] = DV + 1
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="holds tensors"):
        SparseAutoencoder.load(tmp_path)


def test_dimension_mismatch_names_both_shapes():
    sae = make_sae()
    u, t = pairs()
    with pytest.raises(ValueError, match=r"u has shape \(9, 7\).*expects last dimension 6 \(SaeConfig.dv\)"):
        sae(torch.randn(9, DV + 1, dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"t has shape \(9, 4\).*expects last dimension 5 \(SaeConfig.dt\)"):
        sae(u, t[:, :4])
    with pytest.raises(ValueError, match=r"u_c has shape \(3, 8\)"):
        sae.score_candidates(torch.randn(3, 8), t[0])
    with pytest.raises(ValueError, match="one prompt row per u row"):
        sae(u, t[:4])


def test_nan_input_is_refused():
    sae = make_sae()
    u, t = pairs()
    u[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"u contains NaN.*\[2\]"):
        sae(u, t)
    u[2, 1] = 0.0
    t[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"t contains NaN"):
        sae.score_candidates(u, t[5])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kind": "relu"}, "kind='relu' is unknown"),
        ({"space": "text"}, "space='text' is unknown"),
        ({"kind": "topk", "num_latents": 4, "k_active": 8}, "k_active=8 must lie in 1..num_latents=4"),
        ({"rho": 1.5}, "rho=1.5 must lie strictly between 0 and 1"),
        ({"kind": "topk", "unit_norm_decoder": False}, "needs unit_norm_decoder=True"),
        ({"input_scale": 0.0}, "input_scale=0.0 must be > 0"),
        ({"dv": 0}, "dv=0 must be a positive integer"),
        ({"schema_version": 2}, "schema_version=2"),
    ],
)
def test_config_refuses_bad_combinations(kw, match):
    with pytest.raises(ValueError, match=match):
        SaeConfig(**kw)


def test_image_space_ignores_prompt():
    sae = make_sae("sigmoid", "image")
    u, t = pairs()
    a = sae(u, t)
    b = sae(u)
    assert torch.equal(a.recon_error, b.recon_error)
    assert sae.W_enc.shape == (K, DV, 1)
    assert math.isclose(float(sae.score_candidates(u).recon_error.sum()), float(b.recon_error.detach().sum()), rel_tol=1e-9)
    assert np.isfinite(b.loss.item())


def test_module_apply_is_torchs():
    """`nn.Module.apply(fn)` (used by init code, e.g. `model.apply(init_weights)`) is not shadowed: it visits every
    submodule and returns the module."""
    sae = make_sae()
    seen = []
    assert sae.apply(lambda m: seen.append(type(m).__name__)) is sae
    assert seen[-1] == "SparseAutoencoder"
