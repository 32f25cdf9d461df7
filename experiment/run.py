"""`python -m experiment`: the experiment of issue 7, end to end, resumable.

    python -m experiment                      # main conditions x 5 seeds -> reports/experiment.md  (make experiment)
    python -m experiment --ablations          # the ablation grid          -> reports/ablations.md  (make ablations)
    python -m experiment --quick --out /tmp/x # minutes: the tiny prior world, 2 seeds, a few steps (CI)

Stages, each skipped when its output is current: the scene world of the language-prior regime and its mining
chain (the Dagster assets, on the instance in $DAGSTER_HOME or an ephemeral one) for the recipes the conditions
need (selection rule x SAE space, each a partition of the shard assets with its own folder, `assets.layout.
recipe_dir`), the base model (language pretraining, then a short image fine-tuning), then per condition and seed a
training run and its evaluation, then the report.
Work lives under `<data root>/experiment/<world preset>/`; a run whose config, base model and shards are
unchanged is not redone. docs/experiment.md has the design.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from experiment.conditions import (BASELINE, CONTROL, FULL_SEED_GROUPS, GROUP_TITLES, LOW_SFT, LOW_SFT_WEIGHT, MAIN,
                                   PAPER_FORM, Condition, ablations, group_controls, train_overrides)
from experiment.report import format_console, write_report
from store.fingerprint import fingerprint, sha256_file
from store.parquet_io import write_bytes_atomic, write_json_atomic
from store.paths import data_root

RECORD_VERSION = 1
"""Bump when a change to the runner makes the same condition train differently."""
EVAL_VERSION = 3
"""Bump when the evaluation's metrics change (2: prior lift, 3: the prior probe): results are re-evaluated, not
retrained."""


@dataclass(frozen=True)
class ExperimentConfig:
    """The budget and data of one experiment; every condition shares it."""

    world_preset: str = "prior"
    """Scene world preset (world.PRESETS); `prior` is the language-prior regime."""
    base_preset: str = "prior"
    """Base model preset (world.base_model.BASE_PRESETS)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Training seeds: init of on-the-fly negatives and IS draws, and the batch order (shared by conditions)."""
    ablation_seeds: int = 3
    """The ablation conditions (the paper form included) run the first N of `seeds` (issue 15: main conditions at 5
    seeds, ablations at 3)."""
    steps: int = 200
    """Optimiser steps per run."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 2e-4
    """Peak learning rate (warmup then cosine)."""
    warmup_steps: int = 10
    sft_weight: float = 1.0
    """Weight of the SFT term every condition carries (the `sft` control has only that term)."""
    max_length: int = 96
    """Tokens per row."""
    candidates: int = 16
    """Candidate pool per example (mining `m`): what IS samples from and the `full pool` ablation forwards."""
    eval_limit: int | None = 300
    """Test scenes evaluated (captions + POPE probes); None: all."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: give one or more distinct seeds")
        if self.ablation_seeds < 1:
            raise ValueError(f"ablation_seeds={self.ablation_seeds}: give at least 1")
        if self.steps < 1 or self.batch_size < 1 or self.candidates < 2:
            raise ValueError("steps and batch_size must be >= 1 and candidates >= 2")


QUICK = ExperimentConfig(world_preset="prior_tiny", base_preset="prior_tiny", seeds=(0, 1), steps=3, batch_size=4,
                         warmup_steps=1, candidates=8, eval_limit=12)
"""CI: the tiny prior world, a handful of steps; checks the machinery, measures nothing."""


@dataclass
class Context:
    cfg: ExperimentConfig
    root: Path
    """Everything this experiment writes (besides the report): <data root>/experiment/<world preset>."""
    progress: bool = True

    @property
    def world_dir(self) -> Path:
        return self.root / "world" / f"{self.cfg.world_preset}-seed0"

    @property
    def base_dir(self) -> Path:
        return self.root / "models" / f"base-{self.cfg.base_preset}"

    def shard_set(self, name: str) -> Path:
        """Where the mining recipe `name` (assets/recipes.py) puts its shards and manifest."""
        from assets.layout import recipe_dir

        return recipe_dir(self.root, name)


# ---------------------------------------------------------------------------------------------- mining
def _env(ctx: Context) -> dict[str, str]:
    return {**os.environ, "MISP_DATA_ROOT": str(ctx.root), "MISP_SOURCE": "world",
            "MISP_WORLD_PRESET": ctx.cfg.world_preset, "MISP_WORLD_SEED": "0"}


def _mining_configs(cfg: ExperimentConfig) -> dict[str, dict]:
    """The asset configs of the experiment's mining. K = m: the shards list every candidate in selection order, so
    a run that uses K negatives takes the first K (greedy order is prefix-consistent), and `full pool` takes them
    all."""
    return {"candidates": {"m": cfg.candidates}, "preference_shards": {"k": cfg.candidates}}


def prepare_shards(ctx: Context, needed: Sequence[str], instance=None) -> None:
    """Ask Dagster for the needed recipes' shard sets (recipes are partitions: each lands in its own folder,
    `assets.layout.recipe_dir`), through the same `materialise` as `make mine`: every asset that runs and finds its
    inputs, config and code version unchanged returns what it stored (nothing recomputed or rewritten)."""
    recipes = list(dict.fromkeys(needed))
    if not recipes:
        return
    import dagster as dg

    from assets.resources import resources_from_env
    from assets.run_pipeline import materialise

    if instance is None:
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    done = materialise("*", instance=instance, resources=resources_from_env(_env(ctx)),
                       configs=_mining_configs(ctx.cfg), recipes=recipes)
    if done and not done[-1][1].success:
        raise RuntimeError(f"mining the shard sets {recipes} failed at {done[-1][0]}; see the Dagster logs above (or "
                           "in the UI), fix the cause and rerun: finished work is kept")


# ---------------------------------------------------------------------------------------------- base model
def prepare_base(ctx: Context) -> dict[str, Any]:
    from world.base_model import BASE_PRESETS, format_report, train_base_model

    report = train_base_model(ctx.world_dir, ctx.base_dir, BASE_PRESETS[ctx.cfg.base_preset], progress=ctx.progress)
    print(format_report(report), flush=True)
    return report.to_dict()


def describe_base(config: dict[str, Any]) -> str:
    """How the base model was built, in words, from its report's config."""
    st = config.get("staged")
    if not st:
        return f"{config['steps']} SFT steps"
    on = " on yes/no questions" if st.get("tune_qa_fraction") == 1.0 else ""
    tune = f", then {st['tune_steps']} tuning steps{on} on its top {st['tune_layers']} layers" if st["tune_steps"] else ""
    return (f"built like LLaVA: a vision encoder trained on the ground truth ({st['encoder']['steps']} steps, frozen), "
            f"{st['slot_steps']} language-model steps reading slots on the text corpus, {st['projector_steps']} "
            f"projector-only steps{tune}")


# ---------------------------------------------------------------------------------------------- runs
def _slug(cond: Condition) -> str:
    if cond.preset is None:
        return "base"
    digest = hashlib.sha1(cond.run_key().encode()).hexdigest()[:8]
    return f"{cond.preset}-{cond.shards}-{digest}"


def _train_config(ctx: Context, cond: Condition, seed: int, out: Path):
    from trainer.config import TrainConfig

    c = ctx.cfg
    # train_overrides gives the preset and the changes to its loss: from_dict reads them as the nested LossConfig
    return TrainConfig.from_dict(dict(
        run_name=out.name, **train_overrides(cond, c.sft_weight), model=str(ctx.base_dir),
        shards=str(ctx.shard_set(cond.shards)), data_root=str(ctx.root), output_dir=str(out), max_steps=c.steps,
        batch_size=c.batch_size, lr=c.lr, warmup_steps=c.warmup_steps, max_length=c.max_length, save_every=c.steps,
        keep_checkpoints=1, seed=seed))


def _final_metrics(metrics_file: Path, last: int = 20) -> tuple[dict[str, float], dict[str, Any]]:
    """(mean of each loss metric over the last `last` steps, the last row)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    tail = rows[-last:]
    keys = sorted({k for r in tail for k in r} - {"step", "lr", "epoch", "forward_rows", "seconds"})
    return {k: sum(r[k] for r in tail if k in r) / sum(k in r for r in tail) for k in keys}, rows[-1]


def flatten_eval(result: dict[str, Any]) -> dict[str, float | None]:
    """The report's metrics from an eval/run.py result (fractions; None where undefined)."""
    out: dict[str, float | None] = {}
    chair = result.get("chair") or {}
    for level in ("object", "shape", "colour"):
        lv = chair.get("levels", {}).get(level)
        if lv:
            out[f"chair_i_{level}"], out[f"chair_s_{level}"] = lv["chair_i"], lv["chair_s"]
            out[f"recall_{level}"] = lv["recall"]
    if "object" in chair.get("levels", {}):
        lv = chair["levels"]["object"]
        out.update(mentions_per_caption=lv["mentions_per_caption"], well_formed=lv["well_formed"], empty=lv["empty"])
    prior = chair.get("prior") or {}
    if prior.get("pairs"):
        out.update(prior_chair_i=prior["chair_i"], prior_rate=prior["rate"], prior_share=prior["share"],
                   prior_lift=prior.get("lift"))
        for part in ("visible", "uncertain"):  # a coloured partner renamed vs a grey object named the partner
            if (prior.get(part) or {}).get("eligible_captions"):
                out[f"prior_rate_{part}"] = prior[part]["rate"]
    for setting, m in (result.get("pope") or {}).items():
        for k in ("accuracy", "f1", "yes_ratio", "precision", "recall"):
            out[f"pope_{setting}_{k}"] = m.get(k)
    return out


def flatten_probe(probe: dict[str, Any] | None) -> dict[str, float | None]:
    """The report's metrics from a `world.prior_probe.measure_probe` result ({} for a world without pairs)."""
    if not probe or not probe.get("pairs"):
        return {}
    return {"prior_probe_rate": probe["rate_with_trigger"], "prior_probe_control": probe["rate_without_trigger"],
            "prior_probe_lift": probe["lift"], "probe_grey_said": probe["grey_with_trigger"]}


def measure_world_probe(model_dir: Path, world_dir: Path, out: Path) -> dict[str, Any] | None:
    """The prior probe (world.prior_probe) on every test scene of a world with colour co-occurrence pairs, written
    to `out`; None for a world without pairs. It is where the prior shows without costing accuracy elsewhere: the
    test split's own prior rate rests on few eligible captions (base_report.json)."""
    from trainer.model_loading import load_model_or_adapter
    from world.encoder import world_config
    from world.generate import read_scenes
    from world.prior_probe import measure_probe

    world = world_config(world_dir)
    if not world.cooccur_pairs:
        return None
    scenes = read_scenes(world_dir, "test")
    model, processor, _ = load_model_or_adapter(model_dir)
    probe = measure_probe(model, processor, [scenes[k] for k in sorted(scenes)], world)
    write_json_atomic(probe, out)
    return probe


PATH_FIELDS = ("run_name", "model", "shards", "data_root", "output_dir")
"""TrainConfig fields that say where things are, not what is trained."""


def _without(d: dict[str, Any] | None, keys: Sequence[str]) -> dict[str, Any] | None:
    return None if d is None else {k: v for k, v in d.items() if k not in keys}


def _read_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_one(ctx: Context, cond: Condition, seed: int, *, compute: bool = True) -> dict[str, Any] | None:
    """Train (unless base) and evaluate one condition and seed. A current training is not redone; a current
    training whose evaluation is stale (another eval config or EVAL_VERSION) is only re-evaluated.
    `compute=False`: the stored record if it is current, else None (nothing trained or evaluated)."""
    from eval.run import EvalConfig, evaluate_model
    from trainer.ref_cache import model_fingerprint

    run_dir = ctx.root / "runs" / (f"{_slug(cond)}-seed{seed}" if cond.preset else "base")
    eval_cfg = EvalConfig(limit=ctx.cfg.eval_limit, progress=ctx.progress)
    shards_fp = sha256_file(ctx.shard_set(cond.shards) / "manifest.json") if cond.preset else ""
    tcfg = _train_config(ctx, cond, seed, run_dir) if cond.preset else None
    world_fp = sha256_file(ctx.world_dir / "world.json")
    base_fp = model_fingerprint(ctx.base_dir)
    # What is trained and how it is judged, not where it lives or how it is shown: the base model and shards
    # enter by content, so moving the data root or passing --no-progress reuses every result.
    train_fp = fingerprint(RECORD_VERSION, _without(tcfg.to_dict() if tcfg else None, PATH_FIELDS), base_fp,
                           shards_fp, world_fp)
    eval_fp = fingerprint(EVAL_VERSION, _without(eval_cfg.to_dict(), ("progress",)))
    result_file = run_dir / "result.json"
    saved = _read_result(result_file)
    trained = saved.get("train_fingerprint") == train_fp and (tcfg is None or (run_dir / "final").is_dir())
    if trained and saved.get("eval_fingerprint") == eval_fp:
        return saved["record"]
    if not compute:
        return None
    model_dir = ctx.base_dir
    if tcfg is None:
        train_info = None
    elif trained:
        train_info, model_dir = saved["record"]["train"], run_dir / "final"
    else:
        from trainer.train import train

        shutil.rmtree(run_dir, ignore_errors=True)  # a stale or half-finished run of another config
        t0 = time.perf_counter()
        model_dir = train(tcfg, progress=ctx.progress)
        wall = time.perf_counter() - t0
        final, last = _final_metrics(run_dir / "metrics.jsonl")
        ref = json.loads((run_dir / "reference.json").read_text()) if (run_dir / "reference.json").is_file() else {}
        train_info = {"seconds": last["seconds"], "forward_rows": last["forward_rows"], "steps": last["step"],
                      "reference_rows": ref.get("rows_needed"), "wall_seconds": wall, "final": final}
    t1 = time.perf_counter()
    result = evaluate_model(model_dir, ctx.world_dir, out=run_dir / "eval.json", config=eval_cfg)
    probe = measure_world_probe(model_dir, ctx.world_dir, run_dir / "prior_probe.json")
    record = {"condition": cond.name, "group": cond.group, "seed": seed, "train": train_info,
              "eval": {**flatten_eval(result), **flatten_probe(probe)}, "eval_seconds": time.perf_counter() - t1}
    write_json_atomic({"train_fingerprint": train_fp, "eval_fingerprint": eval_fp, "record": record}, result_file)
    return record


def plan(with_main: bool, with_ablations: bool, cfg: ExperimentConfig) -> list[Condition]:
    conds = list(MAIN) + list(LOW_SFT) + list(PAPER_FORM) if with_main else []
    if with_ablations:
        conds += list(ablations(cfg.candidates))
    return conds


def seeds_of(cfg: ExperimentConfig, cond: Condition) -> tuple[int, ...]:
    """The seeds a condition runs: the base model one (it is not trained), a condition of `FULL_SEED_GROUPS` (main,
    low SFT weight) every seed, an ablation (the paper form included) the first `ablation_seeds`."""
    if cond.preset is None:
        return cfg.seeds[:1]
    return cfg.seeds if cond.group in FULL_SEED_GROUPS else cfg.seeds[:cfg.ablation_seeds]


def run_experiment(cfg: ExperimentConfig, conditions: Sequence[Condition], out_md: Path, *, title: str,
                   root: Path | None = None, progress: bool = True, instance=None,
                   report_only: bool = False) -> list[dict[str, Any]]:
    """Everything: shards, base model, runs, report. Returns the records.
    `report_only`: mine, train and evaluate nothing; report the runs that are current (e.g. while other processes
    are still running seeds) and name the missing ones in the report."""
    t_start = time.perf_counter()
    root = (Path(root) if root else data_root() / "experiment" / cfg.world_preset).resolve()
    ctx = Context(cfg, root, progress)
    if report_only:
        from world.base_model import read_report

        saved_base = read_report(ctx.base_dir)
        if saved_base is None or not ctx.world_dir.is_dir():
            raise ValueError(f"--report-only: no experiment under {root} (no base model or world): run "
                             "`python -m experiment` without it first, or pass the --root it used")
        base = saved_base.to_dict()
    else:
        prepare_shards(ctx, [c.shards for c in conditions if c.preset], instance=instance)
        if not ctx.world_dir.is_dir():  # only the base model is asked for: still needs the world
            from world import generate_world, preset

            generate_world(preset(cfg.world_preset), ctx.world_dir, progress=progress)
        base = prepare_base(ctx)
    records: list[dict[str, Any]] = []
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    missing: list[str] = []
    for i, cond in enumerate(conditions, 1):
        for seed in seeds_of(cfg, cond):
            key = (cond.run_key(), seed)
            if not report_only:
                print(f"\n=== [{i}/{len(conditions)}] {cond.group}: {cond.name}, seed {seed}", flush=True)
            if key not in runs:
                record = run_one(ctx, cond, seed, compute=not report_only)
                if record is None:
                    missing.append(f"{cond.group}: {cond.name}, seed {seed}")
                    continue
                runs[key] = record
            records.append({**runs[key], "condition": cond.name, "group": cond.group, "seed": seed})
    if missing:
        print(f"not run yet ({len(missing)}): " + "; ".join(missing), flush=True)
    out_md = Path(out_md)
    results = out_md.with_suffix(".results.jsonl")
    write_bytes_atomic("".join(json.dumps(r) + "\n" for r in records).encode(), results)
    total = time.perf_counter() - t_start
    write_report(records, out_md, out_md.parent / out_md.stem, title=title, control=CONTROL, baseline=BASELINE,
                 group_controls=group_controls(cfg.candidates), group_titles=GROUP_TITLES,
                 preamble=preamble(cfg, base, ctx, total, results, list(runs.values()), missing))
    print("\n" + format_console(records))
    print(f"\nreport: {out_md}  (results: {results}; {total / 60:.1f} min)")
    return records


def preamble(cfg: ExperimentConfig, base: dict[str, Any], ctx: Context, total: float, results: Path,
             runs: Sequence[dict[str, Any]] = (), missing: Sequence[str] = ()) -> str:
    from world import preset

    train_s = sum((r["train"] or {}).get("wall_seconds") or (r["train"] or {}).get("seconds") or 0 for r in runs)
    eval_s = sum(r.get("eval_seconds") or 0 for r in runs)
    w = preset(cfg.world_preset)
    cap = base.get("caption", {})
    lines = [
        f"Generated by `python -m experiment` on {time.strftime('%Y-%m-%d')} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, no GPU unless stated); every number below comes "
        f"from `{results.name}` beside this file. The {len(runs)} distinct runs behind it took "
        f"{train_s / 60:.1f} min of training (reference precompute included) and {eval_s / 60:.1f} min of "
        f"evaluation when they ran; this invocation took {total / 60:.1f} min (work already current is reused, not redone).",
        "",
        "**Setup.** World preset `{p}`: {n_pool} pool / {n_train} train / {n_test} test scenes of {size} px, "
        "shapes {shapes}, colours {colours}; {attr} co-occurrence pairs {pairs} (trigger -> partner) at p = {tp} "
        "in the {n_text}-caption text corpus, p = {ip} in the image data, none in the test split. Base model `{bp}`: {recipe}; its caption accuracy: colour {colour:.1%}, "
        "position {position:.1%}, count {count:.1%}, shape {shape:.1%} (chance {chance:.0%}).".format(
            p=cfg.world_preset, n_pool=w.n_pool, n_train=w.n_train, n_test=w.n_test, shapes=", ".join(w.shapes),
            size=w.image_size, colours=", ".join(w.colours), attr=w.cooccur_attribute,
            position=cap.get("position", float("nan")), chance=1 / len(w.shapes),
            pairs=", ".join(f"{a} -> {b}" for a, b in w.cooccur_pairs), tp=w.text_cooccur_p, n_text=w.n_text,
            ip=w.cooccur_p, bp=cfg.base_preset, recipe=describe_base(base["config"]), shape=cap.get("shape", float("nan")),
            colour=cap.get("colour", float("nan")), count=cap.get("count", float("nan"))),
        "",
        f"**Budget.** Every trained condition: {cfg.steps} steps x {cfg.batch_size} examples, lr {cfg.lr}, the same "
        f"batch order per seed (main conditions and the low SFT weight group: seeds {', '.join(map(str, cfg.seeds))}; "
        f"ablations, the paper form included: seeds {', '.join(map(str, cfg.seeds[:cfg.ablation_seeds]))}), the same "
        f"SFT term (weight {cfg.sft_weight}) except in the low SFT weight group ({LOW_SFT_WEIGHT}) and the paper form "
        f"(off); the `sft` control has only that term. "
        f"Mined pool m = {cfg.candidates} candidates per example; evaluation on {cfg.eval_limit or 'all'} test "
        f"scenes with greedy decoding, and the prior probe (world.prior_probe) on every test scene with two or more "
        f"objects.",
    ]
    if missing:
        lines += ["", f"**Not run yet ({len(missing)}; a report of the finished runs, `--report-only`).** "
                  + "; ".join(missing) + ". Their conditions show fewer seeds (column n)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def _seeds(text: str) -> tuple[int, ...]:
    """`--seeds 5` -> (0, 1, 2, 3, 4); `--seeds 1,3` -> (1, 3)."""
    try:
        if "," in text:
            return tuple(int(s) for s in text.split(",") if s.strip())
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give a count (5) or a comma list (1,3)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds {n}: give at least 1")
    return tuple(range(n))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiment", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="the tiny prior world, 2 seeds, 3 steps (CI)")
    ap.add_argument("--ablations", action="store_true", help="the ablation grid instead of the main conditions")
    ap.add_argument("--all", action="store_true", help="main conditions and ablations")
    ap.add_argument("--seeds", type=_seeds, default=None,
                    help="N: seeds 0..N-1; or a comma list (e.g. 1,3) to run some seeds in another process; "
                         "results of every seed are reused by a later run with the full count")
    ap.add_argument("--steps", type=int, default=None, help="override the optimiser steps per run")
    ap.add_argument("--out", default=None, help="report path (default reports/experiment.md or "
                                                 "reports/ablations.md; --quick: <data root>/experiment/quick.md)")
    ap.add_argument("--root", default=None, help="work folder (default <data root>/experiment/<world preset>)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="train and evaluate nothing: report the finished runs and list the missing ones (e.g. while "
                         "another process runs seeds)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else ExperimentConfig()
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    main_part = not args.ablations or args.all
    conds = plan(main_part, args.ablations or args.all, cfg)
    name = "ablations" if args.ablations and not args.all else "experiment"
    out = Path(args.out) if args.out else (data_root() / "experiment" / "quick.md" if args.quick
                                           else Path("reports") / f"{name}.md")
    title = ("MISP-DPO against its baselines on the scene world" if main_part else "MISP-DPO ablations")
    run_experiment(cfg, conds, out, title=title + (" (quick mode: checks the machinery, measures nothing)"
                                                    if args.quick else ""),
                   root=Path(args.root) if args.root else None, progress=not args.no_progress,
                   report_only=args.report_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
