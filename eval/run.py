"""Evaluate any local HF VLM folder (or LoRA adapter folder) on the scene world's hallucination benchmarks, on
public POPE files, on AMBER or with CHAIR on COCO.

    python -m eval --model data/models/base --world data/world/default-seed0            # world POPE + CHAIR
    python -m eval --model data/models/base --world data/world/default-seed0 --limit 200
    python -m eval --model /models/llava-1.5-7b-hf --device cuda --dtype bfloat16 \\
        --pope POPE/output/coco/coco_pope_{random,popular,adversarial}.json --images coco/val2014
    python -m eval --model data/runs/lora/final --amber AMBER --images AMBER/image     # base from adapter_config
    python -m eval --model DIR --coco-chair coco/annotations --coco-synonyms synonyms.txt --images coco/val2014 \\
        --limit 500 --max-new-tokens 512

    from eval.run import EvalConfig, evaluate_model
    result = evaluate_model("data/models/base", "data/world/default-seed0", config=EvalConfig(limit=100))
    result["pope"]["adversarial"]["f1"], result["chair"]["levels"]["object"]["chair_i"]

Greedy decoding (`trainer.model_loading.greedy_generate`), batched, one progress bar; a question asked twice
(POPE's yes-questions are the same in the three settings) is generated once. Writes the result as JSON and every
answer as JSON Lines beside it (`<out>.answers.jsonl`). Metrics: eval/metrics.py; docs/eval.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import polars as pl
import torch
import transformers
from PIL import Image
from tqdm.auto import tqdm

from eval import amber as amber_bench
from eval import coco_chair
from eval.amber import TASKS as AMBER_TASKS
from eval.coco_chair import DEFAULT_PROMPT as COCO_PROMPT
from eval.metrics import ANSWER_RULES, LEVELS, chair_metrics, pope_metrics, prior_hallucinations, \
    resolve_answer
from eval.pope_reader import read_pope
from eval.pope_world import PROBE_LEVELS, SETTINGS, build_probes, object_stats
from store import SCHEMA_VERSION
from store.fingerprint import sha256_file
from store.parquet_io import write_bytes_atomic, write_json_atomic
from store.paths import data_root
from trainer.model_loading import DTYPES, greedy_generate, load_model_or_adapter
from world import grammar
from world.generate import scene_from_row

LLAVA_POPE_SUFFIX = "Answer the question using a single word or phrase."
"""LLaVA-1.5's instruction after each POPE question (its llava_pope_test.jsonl)."""
EVAL_SCHEMA = 1


SOURCE_FIELDS = ("amber_tasks", "coco_split", "caption_prompt")
"""EvalConfig fields that one public benchmark alone reads; recorded in the result's `source`."""


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate; the source (world, POPE files, AMBER, COCO) and the model are arguments of
    `evaluate_model`."""

    limit: int | None = None
    """World: the first N test scenes (sorted by id); POPE: the first N good questions of each file; AMBER: the
    first N good queries of each task; COCO: N images drawn with `seed`."""
    seed: int = 0
    """Seed of the world probes (which objects are asked about) and of the COCO image draw; decoding is greedy."""
    settings: tuple[str, ...] = SETTINGS
    """World POPE settings to build."""
    probe_level: str = "object"
    """World probes: `object` (`Is there a red circle?`) or `shape` (`Is there a circle?`)."""
    per_scene: int = 3
    """World probes: at most this many yes- and as many no-questions per scene and setting (POPE: 3)."""
    captions: bool = True
    """World: also caption every scene and score CHAIR."""
    answer_rule: str = "first_word"
    """`first_word` (yes/no must open the answer, else unparsed, counted as no) or `pope` (the reference script's
    rule: no/not in the first sentence means no, anything else yes)."""
    pope_suffix: str = LLAVA_POPE_SUFFIX
    """POPE files and AMBER's yes/no queries: appended on a new line to each question (LLaVA-1.5's evaluation
    prompt); '' for none."""
    batch_size: int = 64
    """Rows per generation batch."""
    max_new_tokens: int = 64
    """Longest caption (a 4-object world caption is ~45 tokens)."""
    max_new_tokens_yesno: int = 16
    """Longest yes/no answer (only its first word counts under `first_word`)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str = "auto"
    """Model weights: `auto` (as saved), `float32`, `bfloat16`, `float16`."""
    trust_remote_code: bool = False
    """Allow a model folder's own code (config auto_map)."""
    samples: int = 5
    """Answers per setting (and captions) copied into the result for a look."""
    amber_tasks: tuple[str, ...] = AMBER_TASKS
    """AMBER: `discriminative` (yes/no) and/or `generative` (descriptions scored with CHAIR / Cover / Hal / Cog)."""
    coco_split: str = "val2014"
    """CHAIR on COCO: the split whose `instances_<split>.json` / `captions_<split>.json` give the ground truth."""
    caption_prompt: str = COCO_PROMPT
    """CHAIR on COCO: the captioning prompt (AMBER's generative queries bring their own)."""
    progress: bool = True
    """Show the progress bar."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(self.settings))
        object.__setattr__(self, "amber_tasks", tuple(self.amber_tasks))
        if not self.amber_tasks or any(t not in AMBER_TASKS for t in self.amber_tasks):
            raise ValueError(f"amber_tasks {list(self.amber_tasks)}: choose one or more of {AMBER_TASKS}")
        if not self.caption_prompt.strip():
            raise ValueError("caption_prompt is empty: give the instruction the model captions with")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: give at least 1 (or leave it unset for everything)")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise ValueError(f"settings {list(self.settings)}: choose one or more of {SETTINGS}")
        if self.probe_level not in PROBE_LEVELS:
            raise ValueError(f"probe_level={self.probe_level!r} is not one of {PROBE_LEVELS}")
        if self.answer_rule not in ANSWER_RULES:
            raise ValueError(f"answer_rule={self.answer_rule!r} is not one of {ANSWER_RULES}")
        if self.per_scene < 1 or self.batch_size < 1 or self.max_new_tokens < 1 or self.max_new_tokens_yesno < 1:
            raise ValueError("per_scene, batch_size, max_new_tokens and max_new_tokens_yesno must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        """Every field but `SOURCE_FIELDS` (those are in the result's `source`): a world evaluation's config, and
        so the experiment's fingerprint of it, stays what it was before AMBER and COCO were added."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SOURCE_FIELDS}


class Question(NamedTuple):
    """One yes/no question of either source."""

    question_id: Any
    setting: str
    image: str
    """As written (world: relative to the world root; POPE: relative to the image folder)."""
    path: Path
    prompt: str
    """What the model is asked (a POPE question with the suffix)."""
    label: bool
    kind: str
    """World: `present` or how the negative was chosen; POPE: `yes` / `no`."""
    scene_id: str | None = None


# ---------------------------------------------------------------------------------------------- sources
def world_config(world_dir: Path) -> dict[str, Any]:
    path = world_dir / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{world_dir} has no world.json: give a generated world folder (`make world`)")
    return json.loads(path.read_text())["config"]


def world_sources(world_dir: Path, cfg: EvalConfig):
    """(test scenes as (scene_id, image, Scene), probes, world config)."""
    wcfg = world_config(world_dir)
    table = pl.read_parquet(world_dir / "scenes.parquet")
    test = table.filter(pl.col("split") == "test").sort("scene_id")
    if test.height == 0:
        raise ValueError(f"{world_dir}/scenes.parquet has no test split; generate the world with n_test > 0")
    if cfg.limit is not None:
        test = test.head(cfg.limit)
    scenes = [(r["scene_id"], r["image"], scene_from_row(r)) for r in test.iter_rows(named=True)]
    train = table.filter(pl.col("split").is_in(["pool", "train"]))
    stats = object_stats([scene_from_row(r) for r in train.iter_rows(named=True)], cfg.probe_level)
    probes = build_probes(scenes, stats, shapes=wcfg["shapes"], colours=wcfg["colours"], seed=cfg.seed,
                          per_scene=cfg.per_scene, settings=cfg.settings)
    questions = [Question(p.question_id, p.setting, p.image, world_dir / p.image, p.prompt, p.label, p.kind,
                          p.scene_id) for p in probes]
    return scenes, questions, wcfg


def pope_sources(files: Sequence[str | os.PathLike], image_dir: str | os.PathLike, cfg: EvalConfig):
    """(questions, problems) of public POPE files."""
    questions, problems = [], []
    for f in files:
        pope = read_pope(f, image_dir, limit=cfg.limit)
        problems += pope.problems
        for q in pope.questions:
            prompt = f"{q.text}\n{cfg.pope_suffix}" if cfg.pope_suffix else q.text
            questions.append(Question(q.question_id, q.setting, q.image, q.path, prompt, q.label,
                                      "yes" if q.label else "no"))
    if not questions:
        raise ValueError(f"no usable question in {[str(f) for f in files]}: {problems[:5]}")
    return questions, problems


# ---------------------------------------------------------------------------------------------- generation
@lru_cache(maxsize=256)  # questions come grouped by image; a small cache suffices
def _load_image(path: str) -> Image.Image:
    from store.safe_image import open_ingested  # regular file, size limit, allowed decoders, EXIF-upright

    return open_ingested(path).convert("RGB")


def generate_all(model, processor, requests: Sequence[tuple[Path, str]], *, max_new_tokens: int, batch_size: int,
                 bar: tqdm, problems: list[str]) -> dict[tuple[Path, str], str | None]:
    """Greedy answers of unique (image, prompt) requests; an image that cannot be read gets None (and a problem)."""
    answers: dict[tuple[Path, str], str | None] = {}
    todo = list(dict.fromkeys(requests))
    for i in range(0, len(todo), batch_size):
        chunk, images = [], []
        for req in todo[i:i + batch_size]:
            try:
                images.append(_load_image(str(req[0])))
                chunk.append(req)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                problems.append(f"{req[0]}: cannot read the image ({err})")
                answers[req] = None
        if chunk:
            out = greedy_generate(model, processor, images, [p for _, p in chunk], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
            answers.update(zip(chunk, out))
        bar.update(len(todo[i:i + batch_size]))
    return answers


# ---------------------------------------------------------------------------------------------- scoring
def score_pope(questions: Sequence[Question], answers: dict, rule: str, samples: int) -> dict[str, Any]:
    """Per setting: pope_metrics, plus the false-yes rate of negatives by how they were chosen."""
    by_setting: dict[str, list[tuple[Question, str]]] = defaultdict(list)
    for q in questions:
        a = answers[(q.path, q.prompt)]
        if a is not None:
            by_setting[q.setting].append((q, a))
    out = {}
    for setting, rows in by_setting.items():
        preds = [resolve_answer(a, rule) for _, a in rows]
        m = pope_metrics([q.label for q, _ in rows], preds)
        kinds: dict[str, list[bool]] = defaultdict(list)
        for (q, _), p in zip(rows, preds):
            if not q.label:
                kinds[q.kind].append(p is True)
        m["false_yes_by_kind"] = {k: {"n": len(v), "rate": sum(v) / len(v)} for k, v in sorted(kinds.items())}
        m["samples"] = [{"question_id": q.question_id, "prompt": q.prompt, "label": "yes" if q.label else "no",
                         "answer": a} for q, a in rows[:samples]]
        out[setting] = m
    order = [s for s in SETTINGS if s in out] + sorted(s for s in out if s not in SETTINGS)
    return {s: out[s] for s in order}


def score_captions(scenes, captions: Sequence[str], pairs, samples: int, attribute: str = "shape",
                   universe: Sequence[str] | None = None) -> dict[str, Any]:
    parsed = [grammar.parse_caption(c) for c in captions]
    truth = [s for _, _, s in scenes]
    return {"levels": {level: chair_metrics(truth, parsed, level) for level in LEVELS},
            "prior": prior_hallucinations(truth, parsed, pairs, attribute, universe),
            "samples": [{"scene_id": sid, "truth": grammar.caption(s), "caption": c}
                        for (sid, _, s), c in list(zip(scenes, captions))[:samples]]}


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# ---------------------------------------------------------------------------------------------- entry points
def load_eval_model(model_dir: str | os.PathLike, cfg: EvalConfig, device: str,
                    base: str | os.PathLike | None = None):
    """(model in eval mode, processor, base folder or None): `trainer.model_loading.load_model_or_adapter`."""
    model, processor, base_dir = load_model_or_adapter(model_dir, base=base, dtype=cfg.dtype, device=device,
                                                       trust_remote_code=cfg.trust_remote_code)
    return model.eval(), processor, base_dir


def amber_sources(amber_dir, image_dir, cfg: EvalConfig):
    """(AmberData, yes/no questions, caption requests as (path, query)) of an AMBER folder."""
    data = amber_bench.read_amber(amber_dir, image_dir, tasks=cfg.amber_tasks, limit=cfg.limit)
    questions = [Question(it.id, amber_bench.dimension_of(it.type), it.image, it.path,
                          f"{it.query}\n{cfg.pope_suffix}" if cfg.pope_suffix else it.query, it.truth == "yes",
                          it.type) for it in data.discriminative]
    if not questions and not data.generative:
        raise ValueError(f"no usable AMBER query in {amber_dir}: {data.problems[:5]}")
    return data, questions, [(it.path, it.query) for it in data.generative]


def _sources_given(world_dir, files, amber_dir, coco_dir) -> list[str]:
    return [name for name, v in (("world_dir", world_dir), ("pope_file", files), ("amber_dir", amber_dir),
                                 ("coco_dir", coco_dir)) if v]


def evaluate_model(model_dir: str | os.PathLike, world_dir: str | os.PathLike | None = None, *,
                   pope_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   image_dir: str | os.PathLike | None = None, amber_dir: str | os.PathLike | None = None,
                   coco_dir: str | os.PathLike | None = None, coco_synonyms: str | os.PathLike | None = None,
                   out: str | os.PathLike | None = None, config: EvalConfig = EvalConfig(), model=None,
                   processor=None, base: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate the VLM in `model_dir` (a full model, or a LoRA adapter folder on `base` / its recorded base) on one
    source: the world in `world_dir` (POPE probes + CHAIR), public POPE files (`pope_file` + `image_dir`), AMBER
    (`amber_dir` + `image_dir`) or CHAIR on COCO (`coco_dir` annotations + `coco_synonyms` + `image_dir`). A model
    already loaded can be passed as `model` + `processor` (`model_dir` is then only recorded). Writes `out` (JSON)
    and `<out>.answers.jsonl` when `out` is given; returns the result."""
    cfg = config
    files = [pope_file] if isinstance(pope_file, (str, os.PathLike)) else list(pope_file or [])
    given = _sources_given(world_dir, files, amber_dir, coco_dir)
    if len(given) != 1:
        raise ValueError(f"give exactly one source: world_dir (the scene world), pope_file + image_dir (public POPE), "
                         f"amber_dir + image_dir (AMBER) or coco_dir + coco_synonyms + image_dir (CHAIR on COCO); "
                         f"got {given or 'none'}")
    if world_dir is None and image_dir is None:
        raise ValueError(f"{given[0]} needs image_dir: the folder its images are relative to")
    if coco_dir is not None and coco_synonyms is None:
        raise ValueError("coco_dir needs coco_synonyms: CHAIR's synonyms.txt (one line per COCO category, "
                         "`person, girl, boy, man, ...`; see docs/eval.md)")
    t0 = time.perf_counter()
    problems: list[str] = []
    scenes, pairs, attribute, universe = [], [], "shape", None
    questions: list[Question] = []
    caption_reqs: list[tuple[Path, str]] = []
    amber_data = coco = syn = coco_images = None
    if world_dir is not None:
        world_dir = Path(world_dir).expanduser()
        scenes, questions, wcfg = world_sources(world_dir, cfg)
        pairs = wcfg.get("cooccur_pairs", [])
        attribute = wcfg.get("cooccur_attribute", "shape")
        universe = wcfg.get("shapes" if attribute == "shape" else "colours")
        source = {"kind": "world", "world": str(world_dir), "world_json_sha256": sha256_file(world_dir / "world.json"),
                  "scenes": len(scenes), "probe_level": cfg.probe_level, "cooccur_pairs": pairs,
                  "cooccur_attribute": attribute}
        if cfg.captions:
            caption_reqs = [(world_dir / image, grammar.DESCRIBE_PROMPT) for _, image, _ in scenes]
    elif files:
        questions, problems = pope_sources(files, image_dir, cfg)
        source = {"kind": "pope", "files": [str(f) for f in files], "images": str(image_dir)}
    elif amber_dir is not None:
        amber_data, questions, caption_reqs = amber_sources(amber_dir, image_dir, cfg)
        problems = list(amber_data.problems)
        source = {"kind": "amber", "amber": str(amber_dir), "images": str(image_dir), "files": amber_data.files,
                  "tasks": list(cfg.amber_tasks), "queries": len(questions) + len(caption_reqs)}
    else:
        syn = coco_chair.read_synonyms(coco_synonyms)
        coco = coco_chair.load_coco(coco_dir, cfg.coco_split, syn)
        coco_images, problems = coco_chair.sample_images(coco, image_dir, limit=cfg.limit, seed=cfg.seed)
        if not coco_images:
            raise ValueError(f"no image of {cfg.coco_split} found in {image_dir}: {problems[:5]}")
        caption_reqs = [(im.path, cfg.caption_prompt) for im in coco_images]
        source = {"kind": "coco_chair", "annotations": coco.paths, "synonyms": str(coco_synonyms),
                  "synonyms_sha256": sha256_file(Path(coco_synonyms).expanduser()), "images": str(image_dir),
                  "split": cfg.coco_split, "prompt": cfg.caption_prompt, "n_images": len(coco_images),
                  "seed": cfg.seed}
    device = resolve_device(cfg.device)
    base_dir = None
    if model is None:
        model, processor, base_dir = load_eval_model(model_dir, cfg, device, base)
    elif processor is None:
        raise ValueError("a loaded model needs its processor too (processor=...)")
    t_load = time.perf_counter()
    probe_reqs = [(q.path, q.prompt) for q in questions]
    bar = tqdm(total=len(dict.fromkeys(probe_reqs)) + len(dict.fromkeys(caption_reqs)), desc="eval", unit="answer",
               disable=not cfg.progress)
    answers = generate_all(model, processor, probe_reqs, max_new_tokens=cfg.max_new_tokens_yesno,
                           batch_size=cfg.batch_size, bar=bar, problems=problems)
    cap_answers = generate_all(model, processor, caption_reqs, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size, bar=bar, problems=problems) if caption_reqs else {}
    bar.close()
    t_gen = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": EVAL_SCHEMA, "model": str(model_dir), "base": None if base_dir is None else str(base_dir),
        "source": source, "config": cfg.to_dict(), "device": str(next(model.parameters()).device),
        "pope": {}, "chair": None, "amber": None, "coco_chair": None, "problems": problems,
        "generations": len(answers) + len(cap_answers),
        "seconds": {"load": t_load - t0, "generate": t_gen - t_load},
        "versions": {"schema": str(SCHEMA_VERSION), "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }
    captions = [cap_answers.get(r) for r in caption_reqs]
    if amber_data is not None:
        result["amber"] = score_amber(amber_data, questions, answers, captions, cfg)
    elif coco is not None:
        kept = [(im.image_id, c) for im, c in zip(coco_images, captions) if c is not None]
        result["coco_chair"] = coco_chair.chair_scores(kept, coco.objects, syn, cfg.samples)
    else:
        result["pope"] = score_pope(questions, answers, cfg.answer_rule, cfg.samples)
        kept = [(s, c) for s, c in zip(scenes, captions) if c is not None]
        if kept:
            result["chair"] = score_captions([s for s, _ in kept], [c for _, c in kept], pairs, cfg.samples,
                                             attribute, universe)
    result["seconds"]["total"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out).expanduser()
        write_json_atomic(result, out)
        rows = [{"question_id": q.question_id, "setting": q.setting, "image": q.image, "prompt": q.prompt,
                 "label": "yes" if q.label else "no", "kind": q.kind, "scene_id": q.scene_id,
                 "answer": answers[(q.path, q.prompt)]} for q in questions]
        if world_dir is not None:
            rows += [{"scene_id": sid, "image": image, "prompt": grammar.DESCRIBE_PROMPT, "answer": c}
                     for (sid, image, _), c in zip(scenes, captions)]
        elif amber_data is not None:
            rows += [{"question_id": it.id, "image": it.image, "prompt": it.query, "answer": c}
                     for it, c in zip(amber_data.generative, captions)]
        elif coco is not None:
            rows += [{"image_id": im.image_id, "image": im.image, "prompt": cfg.caption_prompt, "answer": c}
                     for im, c in zip(coco_images, captions)]
        write_bytes_atomic("".join(json.dumps(r) + "\n" for r in rows).encode(), answers_path(out))
    return result


def score_amber(data, questions: Sequence[Question], answers: dict, captions: Sequence[str | None],
                cfg: EvalConfig) -> dict[str, Any]:
    """AMBER's discriminative scores (answers read with `cfg.answer_rule`) and generative scores."""
    by_id = {it.id: it for it in data.discriminative}
    disc = [(by_id[q.question_id], resolve_answer(answers[(q.path, q.prompt)], cfg.answer_rule))
            for q in questions if answers[(q.path, q.prompt)] is not None]
    gen = [(it, c) for it, c in zip(data.generative, captions) if c is not None]
    return {"discriminative": amber_bench.discriminative_metrics(disc) if disc else None,
            "generative": amber_bench.generative_metrics(gen, data.lexicon, cfg.samples) if gen else None}


def answers_path(out: Path) -> Path:
    return out.with_name(out.stem + ".answers.jsonl")


def _pct(x: float | None) -> str:
    return "    -" if x is None else f"{100 * x:5.1f}"


def format_table(result: dict[str, Any]) -> str:
    """The result as the table the CLI prints (percentages)."""
    src = result["source"]
    where = {"world": lambda: f"world {src['world']} ({src['scenes']} test scenes, {src['probe_level']} probes)",
             "pope": lambda: f"POPE {', '.join(Path(f).name for f in src['files'])}",
             "amber": lambda: f"AMBER {src['amber']} ({src['queries']} queries)",
             "coco_chair": lambda: f"COCO {src['split']} ({src['n_images']} images, CHAIR)"}[src["kind"]]()
    model = result["model"] + (f" (LoRA on {result['base']})" if result.get("base") else "")
    lines = [f"{model} on {where}: {result['generations']} answers in "
             f"{result['seconds']['generate']:.0f} s on {result['device']}"]
    yes_no = {"POPE": result["pope"]}
    amber = result.get("amber") or {}
    if amber.get("discriminative"):
        yes_no = {"AMBER (no = positive)": amber["discriminative"]}
    for title, table in yes_no.items():
        if table:
            lines.append(f"{title:<12}{'n':>6} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} {'yes':>6} {'unpars':>6}")
        for setting, m in table.items():
            lines.append(f"{setting:<12}{m['n']:>6} " + " ".join(
                f"{_pct(m[k]):>6}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed_rate")))
    if amber.get("generative"):
        g = amber["generative"]
        lines.append(f"AMBER generative ({g['n']} responses): CHAIR {_pct(g['chair']).strip()}  Cover "
                     f"{_pct(g['cover']).strip()}  Hal {_pct(g['hal']).strip()}  Cog {_pct(g['cog']).strip()}  "
                     f"words/response {g['mentions_per_response'] or 0:.2f}")
    coco = result.get("coco_chair")
    if coco:
        lines.append(f"COCO CHAIR ({coco['n_captions']} captions): CHAIR_i {_pct(coco['chair_i']).strip()}  CHAIR_s "
                     f"{_pct(coco['chair_s']).strip()}  recall {_pct(coco['recall']).strip()}  objects/caption "
                     f"{coco['mentions_per_caption'] or 0:.2f}  empty {_pct(coco['empty']).strip()}")
    chair = result.get("chair")
    if chair:
        lines.append(f"{'CHAIR':<12}{'n':>6} {'CH_i':>6} {'CH_s':>6} {'recall':>6} {'ment/c':>6} {'wellf':>6} "
                     f"{'empty':>6}")
        for level, c in chair["levels"].items():
            lines.append(f"{level:<12}{c['n_captions']:>6} {_pct(c['chair_i']):>6} {_pct(c['chair_s']):>6} "
                         f"{_pct(c['recall']):>6} {c['mentions_per_caption'] or 0:>6.2f} {_pct(c['well_formed']):>6} "
                         f"{_pct(c['empty']):>6}")
        p = chair["prior"]
        if p["pairs"]:
            lines.append(f"prior-driven ({', '.join('->'.join(x) for x in p['pairs'])}): {_pct(p['chair_i']).strip()}% "
                         f"of mentions, {_pct(p['rate']).strip()}% of {p['eligible_captions']} eligible captions, "
                         f"{_pct(p['share']).strip()}% of {p.get('attribute', 'shape')} hallucinations"
                         + (f", {p['lift']:.2f}x chance" if p.get("lift") is not None else ""))
        else:
            lines.append("prior-driven: 0 (the world has no cooccur_pairs)")
    if result["problems"]:
        lines.append(f"{len(result['problems'])} problems (questions dropped), first: {result['problems'][0]}")
    return "\n".join(lines)


def default_out(model_dir: str | os.PathLike, world_dir: str | os.PathLike | None, kind: str = "pope") -> Path:
    """`<data root>/eval/<parent>-<model folder>-<world folder | pope | amber | coco-chair>.json`: the parent keeps
    runs apart (`runs/misp/final` -> `misp-final-...`, `models/base` -> `models-base-...`)."""
    model = "-".join(Path(model_dir).expanduser().resolve().parts[-2:])
    return data_root() / "eval" / f"{model}-{Path(world_dir).name if world_dir else kind}.json"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="a local VLM folder (save_pretrained), or a LoRA run's final/ (adapter_config.json)")
    ap.add_argument("--world", default=None, help="a generated world folder: its test split's POPE probes + CHAIR")
    ap.add_argument("--pope", nargs="+", default=None, help="public POPE question files (JSON Lines)")
    ap.add_argument("--amber", default=None, help="the AMBER repository folder (data/annotations.json, "
                    "data/query/query_*.json, data/relation.json, data/safe_words.txt)")
    ap.add_argument("--coco-chair", dest="coco_chair", default=None,
                    help="the COCO 2014 annotation folder (instances_val2014.json, captions_val2014.json): CHAIR")
    ap.add_argument("--coco-synonyms", dest="coco_synonyms", default=None,
                    help="CHAIR's synonyms.txt (needed by --coco-chair; not shipped, see docs/eval.md)")
    ap.add_argument("--images", default=None,
                    help="the folder the images of --pope / --amber / --coco-chair are in (val2014/, AMBER's image/)")
    ap.add_argument("--base", default=None,
                    help="a LoRA adapter's base model folder (default: the adapter config's base_model_name_or_path)")
    ap.add_argument("--out", default=None,
                    help="result JSON (default <data root>/eval/<parent>-<model folder>-<world folder|pope>.json)")
    helps = {"limit": "world: first N test scenes; POPE: first N good questions per file",
             "seed": "seed of the world probes", "probe_level": "world probes: object (red circle) or shape",
             "per_scene": "world: yes- (and no-) questions per scene and setting, at most",
             "answer_rule": "first_word (unparsed counts as no) or pope (the reference script's rule)",
             "pope_suffix": "POPE and AMBER yes/no: line appended to each question ('' for none)",
             "batch_size": "rows per generation batch", "max_new_tokens": "longest caption",
             "max_new_tokens_yesno": "longest yes/no answer", "device": "auto, cpu, cuda, ...",
             "dtype": "auto, float32, bfloat16, float16", "samples": "answers per setting kept in the JSON"}
    ints = {"limit", "seed", "per_scene", "batch_size", "max_new_tokens", "max_new_tokens_yesno", "samples"}
    defaults = EvalConfig()
    for name, text in helps.items():
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int if name in ints else str,
                        default=getattr(defaults, name), help=f"{text} (default: {getattr(defaults, name)!r})")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--amber-tasks", dest="amber_tasks", nargs="+", default=list(AMBER_TASKS), choices=AMBER_TASKS)
    ap.add_argument("--coco-split", dest="coco_split", default=defaults.coco_split,
                    help=f"CHAIR on COCO: the annotation split (default: {defaults.coco_split!r})")
    ap.add_argument("--caption-prompt", dest="caption_prompt", default=defaults.caption_prompt,
                    help=f"CHAIR on COCO: the captioning prompt (default: {defaults.caption_prompt!r})")
    ap.add_argument("--no-captions", action="store_true", help="world: skip CHAIR")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    given = [f for f, v in (("--world", args.world), ("--pope", args.pope), ("--amber", args.amber),
                            ("--coco-chair", args.coco_chair)) if v]
    if not given:
        ap.error("give --world DIR (the scene world), --pope FILE... --images DIR (public POPE), --amber DIR "
                 "--images DIR (AMBER) or --coco-chair DIR --coco-synonyms FILE --images DIR (CHAIR on COCO)")
    if len(given) > 1:
        ap.error(f"give one of {' / '.join(given)}, not several (run once per benchmark)")
    if given[0] != "--world" and not args.images:
        ap.error(f"{given[0]} needs --images DIR, the folder its image names are relative to")
    if args.coco_chair and not args.coco_synonyms:
        ap.error("--coco-chair needs --coco-synonyms FILE: CHAIR's synonyms.txt (not shipped; see docs/eval.md)")
    cfg = EvalConfig(**{k: getattr(args, k) for k in helps},
                     settings=tuple(args.settings), captions=not args.no_captions,
                     trust_remote_code=args.trust_remote_code, progress=not args.no_progress,
                     amber_tasks=tuple(args.amber_tasks), coco_split=args.coco_split,
                     caption_prompt=args.caption_prompt)
    kind = {"--pope": "pope", "--amber": "amber", "--coco-chair": "coco-chair"}.get(given[0], "pope")
    out = Path(args.out) if args.out else default_out(args.model, args.world, kind)
    result = evaluate_model(args.model, args.world, pope_file=args.pope, image_dir=args.images,
                            amber_dir=args.amber, coco_dir=args.coco_chair, coco_synonyms=args.coco_synonyms,
                            out=out, config=cfg, base=args.base)
    print(format_table(result))
    print(f"wrote {out} and {answers_path(out)}")
    return result
