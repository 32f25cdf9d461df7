"""The figures a world base VLM is held to (issue 15), measured on the test split and written to base_report.json:

    caption shape and colour accuracy on visible objects    >= 90%
    prior rate (eligible captions) and its lift              >= 15%, >= 2
    or, on the prior-probe split (`world.prior_probe`):
    hidden object named the partner with the trigger in view >= 15%, lift over the control scenes >= 2
    POPE random accuracy                                     >= 80%

One caption per test scene (greedy, "Describe the image."), read back with the world's grammar; POPE probes of
`eval.pope_world` (statistics from the train split) answered greedily and scored by their first word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from eval.metrics import chair_metrics, parse_yes_no, pope_metrics, prior_hallucinations
from eval.pope_world import SETTINGS, build_probes, object_stats
from trainer.model_loading import greedy_generate
from world import grammar
from world.generate import read_scenes
from world.prior_probe import measure_probe
from world.scene import Scene, is_uncertain

TARGETS: dict[str, tuple[str, float]] = {
    "caption_shape_visible": (">=", 0.90),
    "caption_colour_visible": (">=", 0.90),
    "prior_rate": (">=", 0.15),
    "prior_lift": (">=", 2.0),
    "pope_random_accuracy": (">=", 0.80),
    "prior_probe_rate": (">=", 0.15),
    "prior_probe_lift": (">=", 2.0),
}


def object_accuracy(scenes: Sequence[Scene], captions: Sequence[grammar.ParsedCaption]) -> dict[str, Any]:
    """Per true object, is its cell mentioned with the right shape / colour? Split into visible and hidden
    (grey) objects; an object whose cell no mention names counts as wrong."""
    hits: dict[str, list[float]] = {k: [] for k in ("shape_visible", "colour_visible", "shape_uncertain",
                                                     "colour_uncertain")}
    for scene, cap in zip(scenes, captions):
        said = {}
        for m in cap.objects:
            said.setdefault(m.position, m)
        for o in scene.objects:
            part = "uncertain" if is_uncertain(o) else "visible"
            m = said.get(o.position)
            hits[f"shape_{part}"].append(float(m is not None and m.shape == o.shape))
            hits[f"colour_{part}"].append(float(m is not None and m.colour == o.colour))
    out: dict[str, Any] = {k: (float(np.mean(v)) if v else None) for k, v in hits.items()}
    out["n_visible"], out["n_uncertain"] = len(hits["shape_visible"]), len(hits["shape_uncertain"])
    return out


def measure(model, processor, world_dir: Path, world, *, pope_scenes: int = 300, batch_size: int = 128,
            progress: bool = False) -> dict[str, Any]:
    """Captions, CHAIR, prior and POPE of `model` on the world's test split; `targets` says which are met."""
    from world.base_model import load_images

    world_dir = Path(world_dir)
    df = pl.read_parquet(world_dir / "scenes.parquet").filter(pl.col("split") == "test").sort("scene_id")
    scenes = read_scenes(world_dir, "test")
    ids, paths = df["scene_id"].to_list(), df["image"].to_list()
    images = load_images(world_dir, paths)
    truth = [scenes[s] for s in ids]
    texts = greedy_generate(model, processor, [images[p] for p in paths], [grammar.DESCRIBE_PROMPT] * len(ids),
                            max_new_tokens=56, batch_size=batch_size)
    parsed = [grammar.parse_caption(t) for t in texts]
    objects = object_accuracy(truth, parsed)
    prior = prior_hallucinations(truth, parsed, world.cooccur_pairs, world.cooccur_attribute, world.colours)
    chair = chair_metrics(truth, parsed, "object")
    train = list(read_scenes(world_dir, "train").values())
    probes = build_probes(list(zip(ids, paths, truth))[:pope_scenes], object_stats(train, "object"),
                          shapes=world.shapes, colours=world.colours, seed=0)
    answers = greedy_generate(model, processor, [images[p.image] for p in probes], [p.prompt for p in probes],
                              max_new_tokens=4, batch_size=batch_size)
    pope = {}
    for setting in SETTINGS:
        rows = [(p, a) for p, a in zip(probes, answers) if p.setting == setting]
        if rows:
            pope[setting] = pope_metrics([p.label for p, _ in rows], [parse_yes_no(a) for _, a in rows])
    probe = (measure_probe(model, processor, truth, world, batch_size=batch_size)  # a colour prior only
             if world.cooccur_pairs and world.cooccur_attribute == "colour" else {})
    figures = {
        "prior_probe_rate": probe.get("rate_with_trigger"), "prior_probe_lift": probe.get("lift"),
        "caption_shape_visible": objects["shape_visible"], "caption_colour_visible": objects["colour_visible"],
        "prior_rate": prior["rate"], "prior_lift": prior["lift"],
        "pope_random_accuracy": pope.get("random", {}).get("accuracy"),
    }
    targets = {k: {"value": figures[k], "target": f"{op} {bound:g}",
                   "met": figures[k] is not None and figures[k] >= bound} for k, (op, bound) in TARGETS.items()}
    return {"targets": targets, "objects": objects, "prior": prior, "prior_probe": probe, "chair_object": chair,
            "pope": {s: {k: m[k] for k in ("n", "accuracy", "f1", "yes_ratio", "precision", "recall")}
                     for s, m in pope.items()},
            "samples": [{"scene_id": s, "truth": grammar.caption(t), "caption": c}
                        for s, t, c in list(zip(ids, truth, texts))[:6]]}


def format_targets(figures: dict[str, Any]) -> str:
    lines = []
    for k, t in figures["targets"].items():
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:.2f}" if k.endswith("lift") else f"{v:.1%}")
        lines.append(f"  {k:<24} {shown:>7}  target {t['target']:<8} {'met' if t['met'] else 'NOT met'}")
    unc = figures["prior"].get("uncertain")
    if unc:
        lines.append(f"  prior on hidden objects: {unc['captions']}/{unc['eligible_captions']} eligible captions; "
                     f"named the partner {_pct(unc['rate_with_trigger'])} with the trigger vs "
                     f"{_pct(unc['rate_without_trigger'])} without")
        vis = figures["prior"]["visible"]
        lines.append(f"  prior on visible objects: {vis['captions']}/{vis['eligible_captions']} eligible captions")
    probe = figures.get("prior_probe")
    if probe:
        lines.append(f"  prior probe ({probe['pairs']} pairs): hidden object named the partner "
                     f"{_pct(probe['rate_with_trigger'])} with the trigger vs {_pct(probe['rate_without_trigger'])} "
                     f"in the control; grey {_pct(probe['grey_with_trigger'])} vs {_pct(probe['grey_without_trigger'])}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"
