"""Reading the latents on a planted example: a latent that fires when colour changes is the colour latent."""

import numpy as np
import pytest

from sae.interpret import attribute_association, average_ranks, latent_table, top_activating, usage_histogram
from world.changes import ATTRIBUTES, change_labels, scene_changes


def planted(n=400, seed=0):
    """codes (n, 4): latent 0 fires exactly when colour changes, latent 1 when count changes, latent 2 is
    noise, latent 3 never fires."""
    g = np.random.default_rng(seed)
    changed = g.random((n, len(ATTRIBUTES))) < 0.3
    codes = np.zeros((n, 4))
    codes[:, 0] = changed[:, ATTRIBUTES.index("colour")] * g.uniform(0.5, 1.0, n)
    codes[:, 1] = changed[:, ATTRIBUTES.index("count")] * g.uniform(0.5, 1.0, n)
    codes[:, 2] = (g.random(n) < 0.3) * g.uniform(0.5, 1.0, n)
    return codes, changed


def test_planted_latents_find_their_attribute():
    codes, changed = planted()
    table = latent_table(codes, changed, ATTRIBUTES, ids=[f"img{i}" for i in range(len(codes))], kind="topk")
    rows = {r["latent"]: r for r in table.to_dicts()}
    assert rows[0]["best_attribute"] == "colour" and rows[0]["auroc"] == pytest.approx(1.0)
    assert rows[1]["best_attribute"] == "count" and rows[1]["auroc"] == pytest.approx(1.0)
    assert rows[2]["auroc"] < 0.65  # noise tracks nothing in particular
    assert rows[3]["best_attribute"] is None and rows[3]["fire_rate"] == 0
    assert rows[0]["mean_changed"] > 0.5 and rows[0]["mean_unchanged"] == 0
    top = rows[0]["top_ids"]
    assert len(top) == 5 and all(changed[int(i[3:]), ATTRIBUTES.index("colour")] for i in top)


def test_auroc_matches_pairwise_definition():
    g = np.random.default_rng(1)
    codes = np.round(g.random((40, 3)), 1)  # many ties
    changed = g.random((40, 2)) < 0.4
    table = attribute_association(codes, changed, ["a", "b"])
    for j in range(3):
        for a, name in enumerate(["a", "b"]):
            pos, neg = codes[changed[:, a], j], codes[~changed[:, a], j]
            want = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
            got = table.filter((table["latent"] == j) & (table["attribute"] == name))["auroc"].item()
            assert got == pytest.approx(want)


def test_average_ranks_share_ties():
    np.testing.assert_allclose(average_ranks(np.array([[3.0], [1.0], [3.0], [2.0]]))[:, 0], [3.5, 1, 3.5, 2])


def test_top_activating_and_histogram():
    codes, _ = planted()
    top = top_activating(codes, n=3)
    assert top.shape == (12, 5)
    first = top.filter(top["latent"] == 0).sort("rank")
    assert first["activation"].to_list() == sorted(codes[:, 0], reverse=True)[:3]
    hist = usage_histogram(codes, kind="topk")
    assert hist["n_latents"].sum() == 4 and hist.filter(hist["bin"] == "dead")["n_latents"].item() == 1


def test_attribute_association_refuses_misaligned_labels():
    codes, changed = planted()
    with pytest.raises(ValueError, match="changed has shape"):
        attribute_association(codes, changed[:10], ATTRIBUTES)


def test_scene_changes():
    red_circle = {"shape": "circle", "colour": "red", "size": "large", "position": "left"}
    a = {"background": "light", "objects": [red_circle]}
    b = {"background": "light", "objects": [{**red_circle, "colour": "blue"}]}
    c = {"background": "dark", "objects": [red_circle, red_circle]}
    assert scene_changes(a, b) == dict(colour=True, shape=False, size=False, count=False, position=False, context=False)
    assert scene_changes(a, c)["count"] and scene_changes(a, c)["context"] and scene_changes(a, c)["colour"]
    labels = change_labels([a, a], [b, a])
    assert labels.shape == (2, len(ATTRIBUTES)) and labels[0, ATTRIBUTES.index("colour")] and not labels[1].any()
