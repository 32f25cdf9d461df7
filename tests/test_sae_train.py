"""Training: the SAE finds planted sparse structure, early stopping and determinism, TopK constraints."""

import numpy as np
import pytest
import torch

from sae import SaeConfig, SparseAutoencoder, TrainConfig, evaluate, train_sae
from sae.train import fit_input_scale


def planted(n=2400, dv=12, dt=6, n_atoms=5, n_prompts=3, seed=0):
    """Pairs whose u is a sparse non-negative mix of a few atoms, with a few distinct prompts: d = vec(u t^T) then
    lies near n_atoms * n_prompts directions. Returns u, t, which atoms are active (n, n_atoms)."""
    g = np.random.default_rng(seed)
    atoms = g.normal(size=(n_atoms, dv))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    prompts = g.normal(size=(n_prompts, dt))
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    active = g.random((n, n_atoms)) < 0.2
    u = (active * g.uniform(0.5, 1.5, (n, n_atoms))) @ atoms + 0.01 * g.normal(size=(n, dv))
    t = prompts[g.integers(0, n_prompts, n)]
    return u.astype(np.float32), t.astype(np.float32), active


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which stalls badly on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAST = TrainConfig(batch_size=128, max_epochs=25, patience=2)


@pytest.mark.parametrize(
    "kind, space",
    [("sigmoid", "fused"), ("topk", "fused"), ("topk", "image"), ("sigmoid", "image")],
)
def test_training_beats_mean_baseline(kind, space):
    u, t, _ = planted()
    cfg = SaeConfig(kind=kind, space=space, dv=12, dt=6, num_latents=24, k_active=3)
    sae, history = train_sae(u, t, cfg, FAST, progress=False)
    fvus = [r["val_fvu"] for r in history["epochs"]]
    # predicting the val mean scores FVU 1.0; the planted structure is recoverable far below that
    assert history["final_val"]["fvu"] < 0.1, fvus
    best = history["best_epoch"]
    assert history["final_val"]["fvu"] == pytest.approx(fvus[best - 1], abs=1e-6)  # the best epoch is restored
    assert min(fvus) > fvus[best - 1] - FAST.min_delta
    assert history["final_val"]["fvu"] < 0.5 * fvus[0]
    assert sae.cfg.input_scale == pytest.approx(history["input_scale"]) != 1.0
    tt = t if space == "fused" else np.ones((len(u), 1), np.float32)
    mean_sq = float(((sae.cfg.input_scale**2) * (u**2).sum(1) * (tt**2).sum(1)).mean())
    assert 0.8 < mean_sq < 1.2  # the fitted scale puts mean ||d||^2 near 1 (fitted on the train split)
    for key in ("train_loss", "val_fvu", "val_mean_l0", "val_mean_activation", "val_dead_fraction", "seconds"):
        assert all(np.isfinite(r[key]) for r in history["epochs"]), key


def test_training_is_deterministic_under_a_seed():
    u, t, _ = planted(n=800)
    cfg = SaeConfig(kind="topk", dv=12, dt=6, num_latents=16, k_active=3, seed=7)
    run = TrainConfig(batch_size=64, max_epochs=3, patience=3)
    a, ha = train_sae(u, t, cfg, run, progress=False)
    b, hb = train_sae(u, t, cfg, run, progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h["epochs"]]  # noqa: E731
    assert strip(ha) == strip(hb)
    c, _ = train_sae(u, t, SaeConfig(**{**cfg.to_dict(), "seed": 8}), run, progress=False)
    assert not torch.equal(a.W_enc, c.W_enc)


def test_topk_decoder_stays_unit_norm_and_auxk_is_used():
    u, t, _ = planted(n=800)
    cfg = SaeConfig(kind="topk", dv=12, dt=6, num_latents=48, k_active=2, aux_k=8)
    # dead_after of one batch: latents the TopK skips get the AuxK loss from the second step on
    sae, history = train_sae(u, t, cfg, TrainConfig(batch_size=64, max_epochs=2, dead_after=64), progress=False)
    norms = sae.W_dec.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    assert history["epochs"][0]["train_auxk"] > 0


def test_early_stopping_stops():
    u, t, _ = planted(n=600)
    cfg = SaeConfig(kind="topk", dv=12, dt=6, num_latents=16, k_active=3)
    # min_delta larger than any possible improvement: no epoch after the first counts as better
    _, history = train_sae(u, t, cfg, TrainConfig(batch_size=64, max_epochs=20, patience=2, min_delta=10.0),
                           progress=False)
    assert history["stopped_early"] and len(history["epochs"]) == 3 and history["best_epoch"] == 1


def test_evaluate_mean_predictor_scores_one():
    # an SAE whose latents never fire and whose decoder bias is the data mean reconstructs the mean: FVU 1
    u, t, _ = planted(n=300)
    cfg = SaeConfig(kind="topk", dv=12, dt=6, num_latents=8, k_active=2, input_scale=fit_input_scale(
        torch.as_tensor(u), torch.as_tensor(t)))
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
        sae.b_dec.copy_(cfg.input_scale * torch.as_tensor(u).T @ torch.as_tensor(t) / len(u))
    m = evaluate(sae, u, t).metrics
    assert m.fvu == pytest.approx(1.0, abs=1e-4)
    assert m.mean_l0 == 0 and m.dead_fraction == 1.0


def test_train_refuses_bad_inputs():
    u, t, _ = planted(n=50)
    cfg = SaeConfig(dv=12, dt=6, num_latents=8)
    with pytest.raises(ValueError, match=r"u has shape \(50, 11\)"):
        train_sae(u[:, :11], t, cfg, progress=False)
    u[3, 0] = np.nan
    with pytest.raises(ValueError, match="u contains NaN"):
        train_sae(u, t, cfg, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_data_init_rows_start_on_pairs():
    from sae.train import init_from_data

    u, t, _ = planted(n=50)
    u, t = torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64)
    sae = SparseAutoencoder(SaeConfig(dv=12, dt=6, num_latents=8, input_scale=0.7), dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.copy_(0.7 * u.T @ t / len(u))
    init_from_data(sae, u, t, torch.Generator().manual_seed(0))
    norms = sae.W_dec.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert torch.equal(sae.W_enc, sae.W_dec)
    centred = (0.7 * u[:, :, None] * t[:, None, :] - sae.b_dec).detach()  # d_i - b, (n, Dv, Dt)
    unit_pairs = centred / centred.flatten(1).norm(dim=1)[:, None, None]
    for row in sae.W_dec.detach():  # every row is unit(d_i - b) of some training pair i
        assert (unit_pairs - row).flatten(1).norm(dim=1).min() < 1e-9
    with pytest.raises(ValueError, match="init='zeros' is unknown"):
        TrainConfig(init="zeros")
