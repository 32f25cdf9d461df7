"""The prior-probe split: paired test scenes that measure a colour prior where the pixels leave a colour open.

Like POPE's adversarial setting, it asks the question where the prior and the image disagree, without changing the
test split the other figures are read on. Each test scene with two or more objects gives one pair of scenes that
differ only in the colour of one visible object:

    trigger   object 1 drawn in a trigger colour (e.g. red), object 2 hidden (drawn grey, its true caption says grey);
    control   the same scene, object 1 drawn in a neutral colour (no trigger, no partner of any pair).

No other object has a trigger or partner colour, and both are drawn with the same jitter. The chosen caption names
the hidden object grey in both, so the right answer is in the pixels; naming it the trigger's partner colour is the
prior overriding what the model sees. `rate_with_trigger` is the share of pairs whose trigger scene's caption names
the hidden object the partner colour, `rate_without_trigger` the same share in the control scenes, and
`lift` = rate with / rate without: how much the visible trigger, not a general bias, drives the partner colour.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from world import grammar, vocab
from world.scene import ObjectSpec, Scene, render


class ProbePair(NamedTuple):
    trigger: Scene
    """Object 1 a trigger colour, object 2 hidden."""
    control: Scene
    """The same scene with object 1 a neutral colour."""
    hidden_position: str
    """The hidden object's cell."""
    partner: str
    """The colour the prior says the hidden object has when the trigger is in view."""


def probe_pairs(scenes: Sequence[Scene], pairs: Sequence[Sequence[str]], colours: Sequence[str],
                seed: int = 0) -> list[ProbePair]:
    """One `ProbePair` per scene with >= 2 objects; the (trigger, partner) pairs are used in turn."""
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("the prior probe needs a world with colour co-occurrence pairs (world preset `prior`)")
    in_pairs = {c for p in pairs for c in p}
    neutral = [c for c in colours if c not in in_pairs and c != vocab.UNCERTAIN_COLOUR]
    if not neutral:
        raise ValueError(f"colours {list(colours)} are all in co-occurrence pairs {pairs}: the control scene needs "
                         "a neutral colour; add a colour to the world")
    rng = np.random.default_rng([seed, 15])
    out = []
    for scene in scenes:
        if len(scene.objects) < 2:
            continue
        trigger, partner = pairs[len(out) % len(pairs)]
        objs = [o.with_(colour=neutral[int(rng.integers(len(neutral)))]) if o.colour in in_pairs | {
            vocab.UNCERTAIN_COLOUR} else o for o in scene.objects]
        hidden = objs[1].with_(colour=vocab.UNCERTAIN_COLOUR)
        control_colour = neutral[int(rng.integers(len(neutral)))]
        with_t = scene.replace_objects([objs[0].with_(colour=trigger), hidden, *objs[2:]])
        without_t = scene.replace_objects([objs[0].with_(colour=control_colour), hidden, *objs[2:]])
        out.append(ProbePair(with_t, without_t, hidden.position, partner))
    return out


def probe_images(probe: Sequence[ProbePair], world, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(trigger images, control images), each pair drawn with the same jitter so only one object's colour differs."""
    trig, ctrl = [], []
    for i, p in enumerate(probe):
        trig.append(render(p.trigger, world, np.random.default_rng([seed, 16, i])))
        ctrl.append(render(p.control, world, np.random.default_rng([seed, 16, i])))
    return trig, ctrl


def colour_said_at(caption: grammar.ParsedCaption, position: str) -> str | None:
    """The colour the caption's first mention in `position` names (None: no mention, or no colour)."""
    for m in caption.objects:
        if m.position == position:
            return m.colour
    return None


def score_probe(probe: Sequence[ProbePair], trigger_captions: Sequence[str],
                control_captions: Sequence[str]) -> dict[str, Any]:
    """Rates of the partner colour (and of grey) said of the hidden object with and without the trigger in view.
    `lift` divides by at least one pair's worth (1 / n) so that a control rate of 0 gives a finite lower bound."""
    if not len(probe) == len(trigger_captions) == len(control_captions):
        raise ValueError(f"{len(probe)} probe pairs but {len(trigger_captions)} trigger and "
                         f"{len(control_captions)} control captions: give one caption per scene")
    n = len(probe)
    said_t = [colour_said_at(grammar.parse_caption(c), p.hidden_position) for p, c in zip(probe, trigger_captions)]
    said_c = [colour_said_at(grammar.parse_caption(c), p.hidden_position) for p, c in zip(probe, control_captions)]
    partner_t = sum(s == p.partner for s, p in zip(said_t, probe))
    partner_c = sum(s == p.partner for s, p in zip(said_c, probe))
    rate_t = partner_t / n if n else None
    rate_c = partner_c / n if n else None
    return {"pairs": n, "partner_with_trigger": partner_t, "partner_without_trigger": partner_c,
            "rate_with_trigger": rate_t, "rate_without_trigger": rate_c,
            "lift": (rate_t / max(rate_c, 1 / n)) if n else None,
            "grey_with_trigger": (sum(s == vocab.UNCERTAIN_COLOUR for s in said_t) / n) if n else None,
            "grey_without_trigger": (sum(s == vocab.UNCERTAIN_COLOUR for s in said_c) / n) if n else None}


def measure_probe(model, processor, scenes: Sequence[Scene], world, *, batch_size: int = 128,
                  seed: int = 0) -> dict[str, Any]:
    """Caption both scenes of every probe pair greedily and score them (`score_probe`)."""
    from trainer.model_loading import greedy_generate

    probe = probe_pairs(scenes, world.cooccur_pairs, world.colours, seed)
    trig, ctrl = probe_images(probe, world, seed)
    prompts = [grammar.DESCRIBE_PROMPT] * len(probe)
    t = greedy_generate(model, processor, trig, prompts, max_new_tokens=56, batch_size=batch_size)
    c = greedy_generate(model, processor, ctrl, prompts, max_new_tokens=56, batch_size=batch_size)
    out = score_probe(probe, t, c)
    out["samples"] = [{"trigger": a, "control": b, "hidden_position": p.hidden_position, "partner": p.partner}
                      for p, a, b in list(zip(probe, t, c))[:4]]
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure the probe on a saved model; with --into, also record it in a base_report.json's figures."""
    import argparse
    import json
    from pathlib import Path

    from store.parquet_io import write_json_atomic
    from trainer.model_loading import load_vlm
    from world.encoder import world_config
    from world.generate import read_scenes

    ap = argparse.ArgumentParser(prog="python -m world.prior_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="the generated world folder (colour co-occurrence pairs)")
    ap.add_argument("--model", required=True, help="a save_pretrained VLM folder")
    ap.add_argument("--into", default=None, help="a base_report.json whose `figures` get the probe and its targets")
    args = ap.parse_args(argv)
    world = world_config(args.world)
    scenes = read_scenes(args.world, "test")
    model, processor = load_vlm(args.model)
    out = measure_probe(model, processor, [scenes[k] for k in sorted(scenes)], world)
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1))
    if args.into:
        from world.base_targets import TARGETS

        report = json.loads(Path(args.into).read_text())
        figures = report.get("figures")
        if not figures:
            raise ValueError(f"{args.into} has no `figures`: give the base_report.json of a staged build")
        figures["prior_probe"] = out
        for key, value in (("prior_probe_rate", out["rate_with_trigger"]), ("prior_probe_lift", out["lift"])):
            op, bound = TARGETS[key]
            figures["targets"][key] = {"value": value, "target": f"{op} {bound:g}", "met": value >= bound}
        write_json_atomic(report, Path(args.into))
    return out


if __name__ == "__main__":
    main()
