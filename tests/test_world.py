"""The scene world on disk: determinism, layout and schema (docs/data.md), ground truth of every preference
example, rendering, presets and regeneration."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from world import PRESETS, WorldConfig, generate_world, preset
from world import grammar as g
from world import vocab
from world.__main__ import main as cli_main
from world.generate import build_scene, png_bytes, read_scenes
from world.render import background
from world.scene import ObjectSpec, Scene, render, sample_scene
from world.truth import judge

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("worlds")
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        generate_world(preset("tiny", seed=seed), base / name, progress=False)
        out[name] = base / name
    return out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_bytes(worlds):
    a, b = worlds["a"], worlds["b"]
    files = _files(a)
    assert files == _files(b)
    assert sum(f.endswith(".png") for f in files) == TINY.n_scenes
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_different_seed_gives_different_images(worlds):
    a, other = worlds["a"], worlds["other"]
    pngs = [f for f in _files(a) if f.endswith(".png")]
    differ = sum((a / f).read_bytes() != (other / f).read_bytes() for f in pngs)
    assert differ >= 0.95 * len(pngs)
    assert (a / "scenes.parquet").read_bytes() != (other / "scenes.parquet").read_bytes()


def test_a_scene_does_not_depend_on_generation_order(worlds):
    scenes = read_scenes(worlds["a"])
    prefs = pl.read_parquet(worlds["a"] / "preferences.parquet")
    for split, index in (("test", 39), ("train", 17), ("pool", 123)):
        built = build_scene(TINY, split, index)
        assert built.scene == scenes[f"{split}-{index:07d}"]
        path = worlds["a"] / f"images/{split}/{dict(pool='p', train='t', test='s')[split]}{index:07d}.png"
        assert png_bytes(built.image, TINY.png_compress_level) == path.read_bytes()
    rows = prefs.filter(pl.col("scene_id") == "train-0000017").sort("id")
    assert [e.chosen for e in build_scene(TINY, "train", 17).examples] == rows["chosen"].to_list()


# ------------------------------------------------------------------------------------------- layout, schema
def test_layout_and_schemas_follow_the_data_contract(worlds):
    root = worlds["a"]
    scenes = pl.read_parquet(root / "scenes.parquet")
    assert scenes.columns == ["image", "split", "scene_id", "background", "objects", "caption"]
    struct = pl.Struct({"shape": pl.String, "colour": pl.String, "size": pl.String, "position": pl.String})
    assert scenes.schema["objects"] == pl.List(struct)
    assert all(scenes.schema[c] == pl.String for c in ("image", "split", "scene_id", "background", "caption"))
    assert scenes["split"].value_counts().sort("split").rows() == [("pool", 200), ("test", 40), ("train", 48)]
    assert scenes["scene_id"].n_unique() == len(scenes)
    assert scenes.filter(pl.col("split") == "pool")["image"][12] == "images/pool/p0000012.png"
    for rel in scenes["image"]:
        assert not rel.startswith("/") and (root / rel).is_file()
    for name, split in (("preferences.parquet", "train"), ("preferences_test.parquet", "test")):
        prefs = pl.read_parquet(root / name)
        assert prefs.columns == ["id", "prompt", "chosen", "rejected", "image", "scene_id", "prompt_kind",
                                 "error_type", "error_detail"]
        assert all(dtype == pl.String for dtype in prefs.schema.values())
        assert prefs["id"].n_unique() == len(prefs) == 2 * getattr(TINY, f"n_{split}")
        assert prefs["image"].str.starts_with(f"images/{split}/").all()
        assert set(prefs["prompt_kind"]) <= {"describe", "count", "attribute", "yesno"}
        assert set(prefs["error_type"]) <= {"object", "attribute", "count", "position", "binding"}
        assert prefs.null_count().sum_horizontal().item() == 0
    info = json.loads((root / "world.json").read_text())
    assert WorldConfig.from_dict(info["config"]) == TINY
    assert info["counts"]["pool"] == 200 and info["counts"]["preferences"] == 96
    assert {"library_version", "world_version", "schema_version"} <= set(info)


def test_presets_have_the_documented_sizes():
    assert (TINY.n_pool, TINY.n_train, TINY.n_test) == (200, 48, 40)
    d, big = PRESETS["default"], PRESETS["large"]
    assert (d.n_pool, d.n_train, d.n_test) == (8000, 2000, 1000)
    assert (big.n_pool, big.n_train, big.n_test) == (50000, 10000, 2000)
    # only the language-prior presets of the experiment carry a co-occurrence prior
    assert all(p.cooccur_pairs == () and p.cooccur_p == 0 for name, p in PRESETS.items() if not name.startswith("prior"))


def test_tiny_generates_every_scene_in_one_call(tmp_path):
    # Speed lives in bench/world_gen.py (tests never assert wall-clock times); here: one call writes the whole world.
    summary = generate_world(TINY, tmp_path / "w", progress=False)
    assert summary.generated
    assert (summary.n_pool, summary.n_train, summary.n_test) == (200, 48, 40)
    scenes = pl.read_parquet(summary.scenes)
    assert scenes.height == 288 and scenes["split"].value_counts().sort("split").to_dicts() == [
        {"split": "pool", "count": 200}, {"split": "test", "count": 40}, {"split": "train", "count": 48}]
    assert len(list((tmp_path / "w" / "images").rglob("*.png"))) == 288
    assert summary.n_preferences == pl.read_parquet(summary.preferences).height > 0


# ------------------------------------------------------------------------------------------- ground truth
def _rows(root: Path) -> list[dict]:
    return pl.concat([pl.read_parquet(root / "preferences.parquet"),
                      pl.read_parquet(root / "preferences_test.parquet")]).to_dicts()


def _by_position(objects) -> dict[str, tuple]:
    return {o.position: (o.shape, o.colour, o.size) for o in objects}


def _check_describe(scene: Scene, row: dict) -> None:
    """Independent of world.truth: compare the two captions' objects cell by cell."""
    assert row["chosen"] == g.caption(scene)
    said = g.parse_caption(row["rejected"])
    assert said.well_formed and said.background == scene.background
    S, A = _by_position(scene.objects), _by_position(said.objects)
    kinds = {k for k in S.values()}
    changed = [p for p in S if p in A and S[p] != A[p]]
    etype = row["error_type"]
    if etype == "count":
        (extra,) = set(A) - set(S)
        assert not changed and set(S) <= set(A) and A[extra] in kinds
    elif etype == "position":
        assert not changed and len(set(S) ^ set(A)) == 2
        (old,), (new,) = set(S) - set(A), set(A) - set(S)
        assert S[old] == A[new]
    else:
        assert set(A) == set(S)
        if etype == "binding":
            p, q = changed
            assert S[p][1] != S[q][1] and (A[p][1], A[q][1]) == (S[q][1], S[p][1])
            assert (A[p][0], A[p][2], A[q][0], A[q][2]) == (S[p][0], S[p][2], S[q][0], S[q][2])
        else:
            (p,) = changed
            diff = [i for i in range(3) if S[p][i] != A[p][i]]
            assert len(diff) == 1
            assert (diff[0] == 0) == (etype == "object")
            if etype == "object":
                assert A[p][0] not in scene.shapes


def test_every_chosen_is_true_and_every_rejected_is_false_in_the_labelled_way(worlds):
    scenes = read_scenes(worlds["a"])
    for row in _rows(worlds["a"]):
        _check_example(scenes[row["scene_id"]], row)


@pytest.mark.parametrize("cfg", [
    preset("tiny"),
    preset("tiny", shapes=vocab.SHAPES, colours=tuple(vocab.COLOURS), min_objects=3, max_objects=9),
    preset("tiny", shapes=("circle", "square"), colours=("red", "blue"), max_objects=2, always_describe=False,
           prompts_per_scene=4),
])
def test_ground_truth_holds_for_many_scenes_and_configs(cfg):
    n = 0
    for i in range(300):
        built = build_scene(cfg, "test", i)
        for ex in built.examples:
            _check_example(built.scene, ex._asdict())
            n += 1
    assert n >= 300 * min(cfg.prompts_per_scene, 2)


def _check_example(scene: Scene, row: dict) -> None:
    """The chosen answer is true; the rejected one is false, and (checked here without world.truth where
    the kind allows) in exactly the labelled way."""
    assert judge(scene, row["prompt"], row["chosen"]).true, row
    verdict = judge(scene, row["prompt"], row["rejected"])
    assert not verdict.true and verdict.error_type == row["error_type"], (row, verdict)
    kind = row["prompt_kind"]
    if kind == "describe":
        _check_describe(scene, row)
    elif kind == "count":
        assert g.parse_count(row["chosen"]) == len(scene.objects)
        assert abs(g.parse_count(row["rejected"]) - len(scene.objects)) == 1
    elif kind == "yesno":
        q = g.parse_prompt(row["prompt"])
        present = bool(scene.find(q.subject))
        assert g.parse_yesno(row["chosen"]).yes is present
        assert g.parse_yesno(row["rejected"]).yes is (not present)
    else:
        q = g.parse_prompt(row["prompt"])
        (i,) = scene.find(q.subject)  # the question names exactly one object
        assert g.parse_attribute_answer(row["chosen"]).value == getattr(scene.objects[i], q.attribute)
        wrong = g.parse_attribute_answer(row["rejected"]).value
        assert wrong != getattr(scene.objects[i], q.attribute)
        if row["error_type"] == "binding":
            assert wrong in {o.colour for j, o in enumerate(scene.objects) if j != i}
        if row["error_type"] == "position":
            assert wrong in scene.free_cells()


def test_error_types_and_prompt_kinds_are_balanced():
    cfg = preset("tiny")
    examples = [e for i in range(600) for e in build_scene(cfg, "train", i).examples]
    types = Counter(e.error_type for e in examples)
    kinds = Counter(e.prompt_kind for e in examples)
    assert set(types) == {"object", "attribute", "count", "position", "binding"}
    assert min(types.values()) >= 0.08 * len(examples), types
    assert kinds["describe"] == 600 and min(kinds.values()) >= 150, kinds
    yes = [g.parse_yesno(e.chosen).yes for e in examples if e.prompt_kind == "yesno"]
    assert 0.4 <= np.mean(yes) <= 0.6
    # The wording of a yes/no question does not reveal its answer: questions naming a cell are mixed too.
    with_cell = [g.parse_yesno(e.chosen).yes for e in examples
                 if e.prompt_kind == "yesno" and g.parse_prompt(e.prompt).subject.position is not None]
    assert 0.25 <= np.mean(with_cell) <= 0.75


# ------------------------------------------------------------------------------------------- rendering
def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(vocab.COLOURS)
    d = [np.abs(rgb.astype(int) - np.array(vocab.COLOURS[n])).sum() for n in names]
    return names[int(np.argmin(d))]


def test_objects_are_drawn_where_the_scene_says(worlds):
    scenes = read_scenes(worlds["a"], "pool")
    cell = TINY.image_size / 3
    checked_large = checked_empty = 0
    for sid, scene in scenes.items():
        img = Image.open(worlds["a"] / f"images/pool/p{sid[-7:]}.png")
        assert img.mode == "RGB" and img.size == (64, 64)
        arr = np.asarray(img)
        taken = {o.position for o in scene.objects}
        for pos in vocab.POSITIONS:
            row, col = vocab.CELL[pos]
            y, x = int((row + 0.5) * cell), int((col + 0.5) * cell)
            window = arr[int(row * cell) + 1:int((row + 1) * cell) - 1, int(col * cell) + 1:int((col + 1) * cell) - 1]
            if pos not in taken:
                # Backgrounds are dim greys: no saturated or bright pixel in an empty cell.
                assert (window.max(axis=2).astype(int) - window.min(axis=2) <= 12).all() and window.max() < 160
                checked_empty += 1
        for o in scene.objects:
            row, col = vocab.CELL[o.position]
            if o.size == "large":
                y, x = int((row + 0.5) * cell), int((col + 0.5) * cell)
                assert _nearest_colour(arr[y, x]) == o.colour, (sid, o)
                checked_large += 1
            window = arr[int(row * cell):int((row + 1) * cell), int(col * cell):int((col + 1) * cell)]
            ref = np.array(vocab.COLOURS[o.colour])
            n_px = int((np.abs(window.astype(int) - ref).max(axis=2) <= TINY.colour_jitter + 1).sum())
            lo, hi = (85, 330) if o.size == "large" else (15, 75)  # triangle is the thinnest, circle the fullest
            assert lo <= n_px <= hi, (sid, o, n_px)
    assert checked_large > 100 and checked_empty > 500


def test_small_shapes_differ_by_few_pixels_and_large_by_many():
    """Shape is meant to be the hard attribute: at small size, look-alike shapes differ by a few pixels."""
    def mask(shape: str, size: str) -> np.ndarray:
        return render(Scene((ObjectSpec(shape, "red", size, "centre"),), "dark"), TINY)[:, :, 0] > 150

    def closest_pair(size: str) -> int:
        masks = {s: mask(s, size) for s in TINY.shapes}
        return min(int((masks[a] ^ masks[b]).sum()) for a in masks for b in masks if a < b)

    assert 0 < closest_pair("small") <= 14 and closest_pair("large") >= 2.5 * closest_pair("small")
    assert background("striped", 64).shape == (64, 64, 3)


# ------------------------------------------------------------------------------------------- regeneration, CLI
def test_regeneration_is_a_noop_and_other_configs_need_overwrite(tmp_path):
    root = tmp_path / "w"
    first = generate_world(TINY, root, progress=False)
    assert first.generated
    stamp = (root / "scenes.parquet").stat().st_mtime_ns
    again = generate_world(TINY, root, progress=False)
    assert not again.generated and again.n_pool == 200
    assert (root / "scenes.parquet").stat().st_mtime_ns == stamp
    smaller = preset("tiny", n_pool=50)
    with pytest.raises(ValueError, match="overwrite"):
        generate_world(smaller, root, progress=False)
    (root / "images/pool/mine.png").write_bytes(b"a user's file")
    s = generate_world(smaller, root, overwrite=True, progress=False)
    assert s.generated and len(list((root / "images/pool").glob("p*.png"))) == 50  # stale images removed
    assert (root / "images/pool/mine.png").exists()  # and nothing else
    (root / "images/pool/p0000003.png").unlink()  # a damaged world is regenerated, not trusted
    assert generate_world(smaller, root, progress=False).generated


def test_cli_writes_a_world(tmp_path, capsys):
    assert cli_main(["--preset", "tiny", "--seed", "2", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    info = json.loads((tmp_path / "c" / "world.json").read_text())
    assert info["config"]["seed"] == 2
    assert json.loads(capsys.readouterr().out)["n_train"] == 48


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [
    dict(max_objects=10), dict(min_objects=3, max_objects=2), dict(shapes=("circle", "blob")),
    dict(colours=("red",)), dict(backgrounds=()), dict(small_scale=0.8, large_scale=0.7),
    dict(prompts_per_scene=5), dict(error_types=("nonsense",)), dict(cooccur_p=0.9),
    dict(cooccur_pairs=(("circle", "circle"),), cooccur_p=0.9), dict(n_pool=-1), dict(image_size=8),
])
def test_bad_configs_raise_clear_errors(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)


def test_config_round_trips_through_json():
    cfg = preset("tiny", shapes=("circle", "star", "hexagon"), cooccur_pairs=(("circle", "star"),), cooccur_p=0.9)
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        WorldConfig.from_dict({"n_pool": 3, "colour_count": 2})


def test_cooccurrence_prior_makes_the_partner_follow_the_trigger():
    on = preset("tiny", cooccur_pairs=(("circle", "square"),), cooccur_p=0.95)
    def rate(cfg: WorldConfig, split: str) -> float:
        with_trigger = [s for i in range(1500)
                        if "circle" in (s := sample_scene(cfg, np.random.default_rng([0, 0, i]), split)).shapes]
        return np.mean(["square" in s.shapes for s in with_trigger])
    assert rate(on, "pool") >= 0.9
    assert rate(on, "test") < 0.6 and rate(TINY, "pool") < 0.6  # held-out split and default stay unbiased
    # Turning the prior off leaves every scene exactly as before (its draws come last).
    off_scene = sample_scene(TINY, np.random.default_rng([0, 0, 5]), "pool")
    assert sample_scene(on, np.random.default_rng([0, 0, 5]), "test") == off_scene


def test_a_colour_prior_makes_the_partner_colour_follow_the_trigger_colour():
    on = preset("tiny", cooccur_attribute="colour", cooccur_pairs=(("red", "green"),), cooccur_p=0.95)

    def rate(cfg: WorldConfig, split: str) -> float:
        colours = [{o.colour for o in sample_scene(cfg, np.random.default_rng([0, 0, i]), split).objects}
                   for i in range(1500)]
        return np.mean(["green" in c for c in colours if "red" in c])
    assert rate(on, "pool") >= 0.9
    assert rate(on, "test") < 0.6 and rate(TINY, "pool") < 0.6
    with pytest.raises(ValueError, match="two different colours"):
        preset("tiny", cooccur_attribute="colour", cooccur_pairs=(("circle", "square"),), cooccur_p=0.9)
    with pytest.raises(ValueError, match="cooccur_attribute='size'"):
        preset("tiny", cooccur_attribute="size")


def test_bytes_do_not_depend_on_the_process(tmp_path, worlds):
    """String hashing differs between processes; nothing written may depend on set or dict-of-str order."""
    import os
    import subprocess
    import sys

    out = tmp_path / "sub"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "world", "--preset", "tiny", "--out", str(out), "--quiet"],
                   check=True, env=env, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    for f in _files(worlds["a"]):
        assert (out / f).read_bytes() == (worlds["a"] / f).read_bytes(), f
