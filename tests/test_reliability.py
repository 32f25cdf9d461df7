"""Reliability (issue 13): one test per row of its table, each failing on the code before the fix.

Special files as manifests end in a clear error instead of a hang (these tests carry a timeout, so a regression
fails rather than blocks the suite); a rerun notices image files that changed under an unchanged manifest; readers
after ingest read what ingest validated, upright; tiny and hostile inputs stop early with a clear message; a
changed `chosen` text re-ingests but re-embeds nothing. Everything runs on real Dagster instances, real Parquet,
real (tiny, random) open_clip models."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import dagster as dg
import numpy as np
import open_clip
import polars as pl
import pytest
import torch
from PIL import Image

from assets.definitions import all_assets
from assets.resources import ClipModel, DataRoot, DataSource
from world.clip import WorldClipConfig, save_world_clip
from pipeline.ingest import IngestLimits, ingest_examples
from store.parquet_io import read_metadata
from store.paths import data_root
from store.safe_files import NotRegularFileError
from store.safe_image import ImageChangedError, UnsafeImageError, open_image
from pipeline.sharding import shard_keys, shard_of



def write_ledger(result, root) -> None:
    """Record an examples ingest of shard 0 under `root`'s ledger (what the asset writes), for readers that need it."""
    from store.parquet_io import write_parquet_atomic
    from store.safe_image import ledger_file

    write_parquet_atomic(result.images, ledger_file(Path(root), "examples", "000"))


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
           (120, 120, 120), (250, 140, 0)]


def tiny_clip(folder: Path, seed: int) -> str:
    """A random-init 1-layer open_clip model in the local-dir layout (what a user's checkpoint looks like)."""
    cfg = WorldClipConfig(vision_layers=1, text_layers=1, vision_width=64, text_width=64, embed_dim=32,
                          image_size=32, patch_size=8)
    torch.manual_seed(seed)
    save_world_clip(open_clip.CLIP(**cfg.model_cfg()), cfg, folder, {})
    return f"local-dir:{folder}"


def files_source(tmp_path: Path, n: int = 6, fmt: str = "png") -> dict:
    """A user's data: n positive images + n pool images (distinct colours) and a JSONL manifest of n examples."""
    pos, pool = tmp_path / "images", tmp_path / "pool"
    pos.mkdir()
    pool.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(pos / f"{i}.{fmt}")
        Image.new("RGB", (32, 32), COLOURS[(i + 3) % len(COLOURS)]).save(pool / f"p{i}.{fmt}")
    rows = [{"id": f"ex{i}", "prompt": f"What colour is square {i}?", "chosen": f"colour {i}",
             "rejected": "no colour", "image": f"images/{i}.{fmt}"} for i in range(n)]
    manifest = tmp_path / "prefs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pos": pos, "pool": pool, "manifest": manifest, "rows": rows, "data": tmp_path / "data"}


def resources(src: dict, clip: str = "", manifest: Path | None = None) -> dict:
    return {"data_root": DataRoot(path=str(src["data"])),
            "source": DataSource(kind="files", pool_dir=str(src["pool"]), manifest=str(manifest or src["manifest"]),
                                 image_root=str(src["manifest"].parent)),
            "clip": ClipModel(model=clip, device="cpu", batch_size=8)}


def materialize(selection: list[str], res: dict, key: str | None = None, instance=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(all_assets, selection=selection, partition_key=key, resources=res, raise_on_error=False,
                          instance=instance or dg.DagsterInstance.ephemeral())


def error_text(result: dg.ExecuteInProcessResult) -> str:
    """The messages of every failed step, with the exceptions that caused them."""
    out = []
    for event in result.all_events:
        if event.is_step_failure:
            err = event.event_specific_data.error
            while err is not None:
                out.append(err.message)
                err = err.cause
    return "\n".join(out)


def shard_key_of(example_id: str) -> str:
    keys = shard_keys()
    return keys[shard_of(example_id, len(keys))]


def examples_of(src: dict, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    ingest = src["data"] / "ingest"
    return (pl.read_parquet(ingest / "examples" / f"shard={key}.parquet"),
            pl.read_parquet(ingest / "quarantine" / f"examples-shard={key}.parquet"))


# ----------------------------------------------------------------------------------------- special files


@pytest.mark.timeout(120)
def test_a_fifo_manifest_is_refused_at_once(tmp_path):
    src = files_source(tmp_path)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)  # no writer ever opens it: reading it would block forever
    result = materialize(["source_data"], resources(src, manifest=fifo))
    assert not result.success and "FIFO" in error_text(result) and str(fifo) in error_text(result)
    with pytest.raises(NotRegularFileError, match="FIFO"):
        ingest_examples(fifo, image_root=tmp_path, shard=0, num_shards=1, progress=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("as_symlink", [False, True])
def test_dev_zero_as_manifest_is_refused_at_once(tmp_path, as_symlink):
    src = files_source(tmp_path)
    manifest = Path("/dev/zero")
    if as_symlink:  # a symlink named like a manifest, pointing at an endless device
        manifest = tmp_path / "prefs-link.jsonl"
        manifest.symlink_to("/dev/zero")
    result = materialize(["source_data"], resources(src, manifest=manifest))
    assert not result.success and "character device" in error_text(result)
    if as_symlink:
        with pytest.raises(NotRegularFileError, match="character device"):
            ingest_examples(manifest, image_root=tmp_path, shard=0, num_shards=1, progress=False)


# ---------------------------------------------------------------------------------- images that change


def test_an_image_replaced_by_garbage_after_a_run_is_noticed_on_rerun(tmp_path):
    src = files_source(tmp_path)
    res, key = resources(src), shard_key_of("ex2")
    assert materialize(["source_data"], res).success
    assert materialize(["preference_examples"], res, key).success
    rows, _ = examples_of(src, key)
    assert "ex2" in rows["example_id"].to_list()
    (src["pos"] / "2.png").write_bytes(os.urandom(3000))  # the manifest is unchanged
    assert materialize(["preference_examples"], res, key).success
    rows, quarantine = examples_of(src, key)
    assert "ex2" not in rows["example_id"].to_list()
    assert dict(zip(quarantine["id"], quarantine["reason"]))["ex2"] == "undecodable_image"


def test_an_image_made_a_symlink_outside_the_root_is_never_read(tmp_path):
    src = files_source(tmp_path)
    clip_a, clip_b = tiny_clip(tmp_path / "clip_a", 0), tiny_clip(tmp_path / "clip_b", 1)
    key = shard_key_of("ex1")
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(["source_data"], resources(src, clip_a), instance=instance).success
    assert materialize(["preference_examples", "positive_embeddings"], resources(src, clip_a), key, instance).success
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(outside)
    (src["pos"] / "1.png").unlink()
    (src["pos"] / "1.png").symlink_to(outside)
    # The CLIP changes, so positives are re-embedded: the image is not read from outside the root.
    result = materialize(["positive_embeddings"], resources(src, clip_b), key, instance)
    assert not result.success
    assert "outside its image root" in error_text(result) and "re-ingest" in error_text(result)
    # Re-ingesting quarantines it; embeddings then go through without it.
    assert materialize(["preference_examples", "positive_embeddings"], resources(src, clip_b), key, instance).success
    rows, quarantine = examples_of(src, key)
    assert dict(zip(quarantine["id"], quarantine["reason"]))["ex1"] == "path_outside_root"
    positives = pl.read_parquet(src["data"] / "embeddings" / "positives" / f"shard={key}.parquet")
    assert sorted(positives["key"]) == sorted(rows["image_sha256"].unique())


def test_a_pool_image_swapped_with_same_size_and_mtime_is_noticed(tmp_path):
    src = files_source(tmp_path, fmt="bmp")  # uncompressed: two images of one size have one file size
    clip = tiny_clip(tmp_path / "clip", 0)
    res = resources(src, clip)
    victim = src["pool"] / "p0.bmp"
    key = shard_keys()[shard_of("p0.bmp", len(shard_keys()))]
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(["source_data"], res, instance=instance).success
    assert materialize(["pool_images", "pool_embeddings"], res, key, instance).success
    before = os.stat(victim)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(victim).st_size == before.st_size and os.stat(victim).st_mtime_ns == before.st_mtime_ns
    assert materialize(["pool_images", "pool_embeddings"], res, key, instance).success
    pool = pl.read_parquet(src["data"] / "ingest" / "pool" / f"shard={key}.parquet")
    import hashlib

    assert dict(zip(pool["image_id"], pool["sha256"]))["p0.bmp"] == hashlib.sha256(victim.read_bytes()).hexdigest()


def test_the_safe_opener_refuses_a_changed_file_and_names_it(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert open_image(path, root=tmp_path, sha256=sha).size == (16, 16)
    Image.new("RGB", (16, 16), (99, 20, 30)).save(path)
    with pytest.raises(ImageChangedError, match=r"a\.png changed since ingest.*re-ingest"):
        open_image(path, root=tmp_path, sha256=sha)
    with pytest.raises(UnsafeImageError, match="outside its image root"):
        open_image(path, root=tmp_path / "sub")


# ------------------------------------------------------------------------------------ tiny / hostile input


def test_every_row_quarantined_stops_at_ingest_pointing_at_the_quarantine(tmp_path):
    src = files_source(tmp_path)
    for f in src["pos"].iterdir():
        f.unlink()  # every example's image is missing
    res = resources(src)
    assert materialize(["source_data"], res).success
    key = shard_keys()[0]
    result = materialize(["preference_examples"], res, key)
    text = error_text(result)
    assert not result.success and "none of its 6 rows can be used" in text
    assert "missing_file" in text and f"examples-shard={key}.parquet" in text
    assert (src["data"] / "ingest" / "quarantine" / f"examples-shard={key}.parquet").exists()


def test_a_giant_id_and_an_invisible_prompt_are_quarantined(tmp_path):
    src = files_source(tmp_path, n=3)
    rows = src["rows"]
    rows[0]["id"] = "x" * 1_000_007
    rows[1]["prompt"] = "\u200b\u200b\u200c\u2060\ufeff"  # zero-width spaces, joiners, word joiner, BOM
    src["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = ingest_examples(src["manifest"], shard=0, num_shards=1, progress=False)
    reasons = dict(zip(res.quarantine["row_index"], res.quarantine["reason"]))
    assert reasons == {0: "text_too_long", 1: "empty_prompt"}
    assert res.rows["example_id"].to_list() == ["ex2"]
    assert len(res.quarantine["id"][0]) < 300  # the id column holds a readable stub, not a megabyte


def test_a_huge_manifest_line_is_skipped_without_holding_it(tmp_path):
    """A 70 MB row over max_row_bytes (1 MiB here; 64 MiB by default): skipped in blocks, never held whole."""
    src = files_source(tmp_path, n=3)
    good = src["manifest"].read_bytes()
    huge = json.dumps({"id": "huge", "prompt": "p" * 70_000_000, "chosen": "c", "image": "images/0.png"})
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as fh:
        fh.write(good)
        fh.write(huge.encode() + b"\n")
    del huge
    tracemalloc.start()
    try:
        res = ingest_examples(path, shard=0, num_shards=1, limits=IngestLimits(max_row_bytes=1 << 20), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.rows.height == 3 and res.quarantine["reason"].to_list() == ["malformed_row"]
    assert "max_row_bytes" in res.quarantine["detail"][0]
    assert peak < 8_000_000, f"peak {peak:,} bytes: the 70 MB line was held in memory"


# ------------------------------------------------------------------------------------------ EXIF upright


def _sideways_jpeg(path: Path) -> None:
    """Stored 40x20, left half red and right half blue, EXIF orientation 6 (shown rotated 90 degrees clockwise:
    upright it is 20x40 with red on top)."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_rotated_jpegs_are_read_upright_by_every_reader(tmp_path):
    from eval.run import _load_image
    from pipeline.contact_sheet import _tile
    from trainer.rows import load_image

    path = tmp_path / "sideways.jpg"
    _sideways_jpeg(path)
    # The trainer reads only images ingest recorded (its ledger under the data root): ingest this one first.
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "s", "prompt": "p", "chosen": "c", "image": "sideways.jpg"}) + "\n")
    res = ingest_examples(manifest, shard=0, num_shards=1, progress=False)
    write_ledger(res, tmp_path / "data")
    data_root(tmp_path / "data")
    for read in (load_image, _load_image):
        getattr(read, "cache_clear", lambda: None)()
        im = read(str(path))
        assert im.size == (20, 40)
        top, bottom = np.asarray(im)[2, 10], np.asarray(im)[37, 10]
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    # The embedding stage's opener (pipeline.embed hands it to ClipEncoder.embed_images).
    upright = open_image(path)
    assert upright.size == (20, 40)
    assert np.asarray(_tile(str(path)))[5, 64, 0] > 200  # the contact sheet's tile: red on top


def test_a_real_clip_embeds_the_upright_image(tmp_path):
    from pipeline.clip_encoder import ClipEncoder, ClipSpec
    from pipeline.embed import positive_embedding_table

    sideways, upright = tmp_path / "sideways.jpg", tmp_path / "upright.png"
    _sideways_jpeg(sideways)
    open_image(sideways).save(upright)
    encoder = ClipEncoder(ClipSpec(model=tiny_clip(tmp_path / "clip", 0), device="cpu"))
    import hashlib

    examples = pl.DataFrame({"image_sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in (sideways, upright)],
                             "image_id": ["s", "u"], "image_path": [str(sideways), str(upright)]})
    table = positive_embedding_table(encoder, examples, progress=False)  # the stage's default opener
    e = table["embedding"].to_numpy()
    stored = encoder.embed_images([str(sideways)], progress=False)[0]  # PIL's plain open: stored orientation
    assert float(e[0] @ e[1]) > float(e[1] @ stored) + 1e-4
    assert float(e[0] @ e[1]) > 0.99


# ------------------------------------------------------------------------------ what a `chosen` edit costs


def test_a_changed_chosen_text_reingests_but_reembeds_nothing(tmp_path):
    src = files_source(tmp_path, n=8)
    res = resources(src, tiny_clip(tmp_path / "clip", 0))
    embed = ["preference_examples", "positive_embeddings", "prompt_embeddings"]
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(["source_data"], res, instance=instance).success
    for key in shard_keys():
        assert materialize(embed, res, key, instance).success
    emb = {p: (os.stat(p).st_mtime_ns, read_metadata(p)["fingerprint"])
           for p in sorted((src["data"] / "embeddings").rglob("shard=*.parquet"))}
    content = {k: read_metadata(src["data"] / "ingest" / "examples" / f"shard={k}.parquet").get("content")
               for k in shard_keys()}
    rows = src["rows"]
    rows[4]["chosen"] = "a corrected answer"
    src["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert materialize(["source_data"], res, instance=instance).success
    for key in shard_keys():
        assert materialize(embed, res, key, instance).success
    assert emb == {p: (os.stat(p).st_mtime_ns, read_metadata(p)["fingerprint"]) for p in emb}  # not re-embedded
    changed = shard_key_of("ex4")
    after = {k: read_metadata(src["data"] / "ingest" / "examples" / f"shard={k}.parquet").get("content")
             for k in shard_keys()}
    assert {k for k in content if content[k] != after[k]} == {changed}
    rows_after, _ = examples_of(src, changed)
    assert dict(zip(rows_after["example_id"], rows_after["chosen"]))["ex4"] == "a corrected answer"


def test_exactly_one_good_example_names_the_sae_minimum_and_the_knob(tmp_path):
    from assets.run_pipeline import materialise

    src = files_source(tmp_path, n=3)
    for i in (1, 2):
        (src["pos"] / f"{i}.png").unlink()  # one good example is left
    res = resources(src, tiny_clip(tmp_path / "clip", 0))
    per_shard = ["pool_images", "preference_examples", "pool_embeddings", "positive_embeddings", "prompt_embeddings"]
    results = materialise(["source_data", *per_shard, "pool_index", "candidates", "sae"],
                          instance=dg.DagsterInstance.ephemeral(), resources=res)
    label, last = results[-1]
    assert label == "sae [partition fused]" and not last.success, [(lbl, r.success) for lbl, r in results]
    text = error_text(last)
    assert "the SAE needs at least 20" in text and "pairs_per_example" in text and "FVU is inf" not in text


def test_the_trainer_reads_only_what_ingest_recorded(tmp_path):
    """`trainer.rows.load_image` gets a path only: the ledger under the run's data root gives its sha256."""
    from trainer.rows import load_image

    src = files_source(tmp_path, n=3)
    res = resources(src)
    key = shard_key_of("ex0")
    assert materialize(["source_data"], res).success
    assert materialize(["preference_examples"], res, key).success
    rows, _ = examples_of(src, key)
    path = dict(zip(rows["example_id"], rows["image_path"]))["ex0"]
    data_root(src["data"])  # what `python -m trainer --data_root ...` does first
    getattr(load_image, "cache_clear", lambda: None)()
    assert load_image(path).size == (32, 32)
    Image.new("RGB", (32, 32), (1, 1, 1)).save(path)
    getattr(load_image, "cache_clear", lambda: None)()
    with pytest.raises(ImageChangedError, match="changed since ingest"):
        load_image(path)


# ------------------------------------------------------------------------------ memory bounded by the shard


def _manifest_with_shard_rows(path: Path, image: str, shard_rows: int, other_rows: int, num_shards: int) -> None:
    """JSON Lines with `shard_rows` rows of shard 0 and `other_rows` rows of the other shards, interleaved."""
    mine, others, i = [], [], 0
    while len(mine) < shard_rows or len(others) < other_rows:
        key = f"row-{i:07d}"
        target = mine if shard_of(key, num_shards) == 0 else others
        if len(target) < (shard_rows if target is mine else other_rows):
            target.append(json.dumps({"id": key, "prompt": f"What is in picture {i}?", "chosen": "A square.",
                                      "rejected": "A circle.", "image": image, "extra": i}))
        i += 1
    step = max(1, len(others) // max(1, len(mine)))
    lines = []
    for j, line in enumerate(others):
        if j % step == 0 and mine:
            lines.append(mine.pop())
        lines.append(line)
    path.write_text("\n".join(lines + mine) + "\n")


def _ingest_peak(path: Path, num_shards: int):
    tracemalloc.start()
    try:
        res = ingest_examples(path, shard=0, num_shards=num_shards, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return res, peak


def test_ingest_of_one_shard_holds_that_shards_rows_not_the_manifests(tmp_path):
    """Ten times more rows of other shards must not raise the peak: the rows are filtered by shard as they
    stream past (before, every parsed row of the manifest was held: ~1.6 KB each, ~80 MB here)."""
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a.png")
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    _manifest_with_shard_rows(small, "a.png", shard_rows=1000, other_rows=5_000, num_shards=8)
    _manifest_with_shard_rows(big, "a.png", shard_rows=1000, other_rows=50_000, num_shards=8)
    res_small, peak_small = _ingest_peak(small, 8)
    res_big, peak_big = _ingest_peak(big, 8)
    assert res_small.rows.height == res_big.rows.height == 1000
    assert res_small.rows["example_id"].sort().equals(res_big.rows["example_id"].sort())
    assert res_big.rows["extra"].dtype == pl.Int64  # the extra column's type still comes from the whole file
    extra_text = big.stat().st_size - small.stat().st_size  # ~5 MB of other shards' rows
    assert peak_big < peak_small + extra_text // 5, (
        f"peak {peak_big:,} bytes for the big manifest vs {peak_small:,} for the small one: other shards' rows "
        f"({extra_text:,} bytes of text) were held")
    assert peak_big < big.stat().st_size


# -------------------------------------------------------------------------------- per-shard recompute


def test_one_changed_row_reingests_only_its_shard(tmp_path):
    """The examples ingest is fingerprinted per shard (its own rows as read + the shared layout), so editing one
    row leaves every other shard's files untouched (same bytes, same mtime) and logs that they were reused."""
    src = files_source(tmp_path, n=8)
    res = resources(src)
    keys = shard_keys()
    assert len(keys) >= 2
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(["source_data"], res, instance=instance).success
    for key in keys:
        assert materialize(["preference_examples"], res, key, instance).success

    def files_of(key: str) -> list[Path]:
        return [src["data"] / "ingest" / "examples" / f"shard={key}.parquet",
                src["data"] / "ingest" / "quarantine" / f"examples-shard={key}.parquet",
                src["data"] / "ledger" / f"examples-shard={key}.parquet"]

    def state(key: str) -> list[tuple[int, bytes]]:
        return [(os.stat(p).st_mtime_ns, p.read_bytes()) for p in files_of(key)]

    before = {key: state(key) for key in keys}
    changed = shard_key_of("ex4")
    rows = src["rows"]
    rows[4]["prompt"] = "Which colour is square 4, really?"
    src["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert materialize(["source_data"], res, instance=instance).success
    messages = {}
    for key in keys:
        result = materialize(["preference_examples"], res, key, instance)
        assert result.success
        messages[key] = " ".join(e.user_message for e in instance.all_logs(result.run_id))
    for key in keys:
        if key == changed:
            assert state(key)[0] != before[key][0] and "reusing" not in messages[key]
        else:
            assert state(key) == before[key], f"shard {key} was rewritten though none of its rows changed"
            assert "inputs unchanged" in messages[key] and "reusing" in messages[key]
    rows_after, _ = examples_of(src, changed)
    assert dict(zip(rows_after["example_id"], rows_after["prompt"]))["ex4"] == "Which colour is square 4, really?"


def test_shard_fingerprint_follows_its_own_rows(tmp_path):
    from pipeline.manifest_shard import shard_fingerprint

    src = files_source(tmp_path, n=8)
    n = 4
    fps = lambda: [shard_fingerprint(src["manifest"], shard=s, num_shards=n) for s in range(n)]  # noqa: E731
    before = fps()
    rows = src["rows"]
    rows[4]["chosen"] = "another answer"
    src["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    after = fps()
    changed = shard_of("ex4", n)
    assert [s for s in range(n) if before[s] != after[s]] == [changed]
    # A new extra column changes what every shard's table holds (its schema): every shard is redone.
    rows[0]["note"] = "x"
    src["manifest"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert all(a != b for a, b in zip(after, fps()))


def test_the_trainer_without_a_ledger_names_the_data_root_and_the_variable(world_base, tmp_path, monkeypatch):
    """Images are verified against the data root's ledger; a data root without one (ingest ran elsewhere, or
    MISP_DATA_ROOT points at the wrong folder) stops the trainer at once, not silently unverified."""
    import store.paths
    import store.safe_image
    from store.safe_image import LedgerMissingError
    from trainer.config import load_config
    from trainer.rows import load_image
    from trainer.train import train

    empty = tmp_path / "elsewhere"
    monkeypatch.setenv("MISP_DATA_ROOT", str(empty))
    with pytest.raises(LedgerMissingError, match=rf"data root {empty}.*MISP_DATA_ROOT \(now {empty}\)"):
        train(load_config(None, ["--data_root", str(empty), "--run_name", "r",
                                 "--model", str(world_base / "models" / "base")]), progress=False)
    # A reader that only has a path (trainer.rows.load_image): the same error, naming where it looked.
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(image)
    monkeypatch.setattr(store.safe_image, "_registered", [])  # only this test's roots, not earlier tests'
    monkeypatch.setattr(store.paths, "_last", None)
    getattr(load_image, "cache_clear", lambda: None)()
    with pytest.raises(LedgerMissingError, match=rf"{image}: no image ledger under the data root {empty}.*"
                                                 "MISP_DATA_ROOT"):
        load_image(str(image))
    # With a ledger that does not record the image (shards from another data root): named as such.
    (tmp_path / "other").mkdir()
    src = files_source(tmp_path / "other", n=1)
    res = ingest_examples(src["manifest"], shard=0, num_shards=1, progress=False)
    write_ledger(res, empty)
    getattr(load_image, "cache_clear", lambda: None)()
    with pytest.raises(store.safe_image.UnsafeImageError, match=r"not recorded in the image ledger.*--data_root"):
        load_image(str(image))
    getattr(load_image, "cache_clear", lambda: None)()
    assert load_image(res.rows["image_path"][0]).size == (32, 32)  # what ingest recorded is read
    # Eval checks the same ledger for the images it records (its benchmark images are never ingested).
    from eval.run import _load_image

    Image.new("RGB", (32, 32), (200, 0, 0)).save(res.rows["image_path"][0])
    _load_image.cache_clear()
    with pytest.raises(ImageChangedError, match="changed since ingest"):
        _load_image(res.rows["image_path"][0])
    assert _load_image(str(image)).size == (16, 16)  # not recorded: type, size, format and EXIF checks only


def test_a_shards_data_version_follows_image_content_not_stamps(tmp_path):
    """`fingerprint(shard_fingerprint(...), ledger_fingerprint(ledger))`: what an asset can report as a shard's data
    version. Touching an image keeps it (re-hashed, same bytes); new bytes under the same name change it."""
    from store.fingerprint import fingerprint
    from pipeline.manifest_shard import shard_fingerprint
    from store.safe_image import ledger_file, ledger_fingerprint

    src = files_source(tmp_path, n=3)
    res = ingest_examples(src["manifest"], shard=0, num_shards=1, progress=False)
    write_ledger(res, src["data"])
    ledger = pl.read_parquet(ledger_file(src["data"], "examples", "000"))

    def version() -> str:
        return fingerprint(shard_fingerprint(src["manifest"], shard=0, num_shards=1),
                           ledger_fingerprint(ledger, max_bytes=IngestLimits().max_file_bytes))

    v0 = version()
    image = src["pos"] / "1.png"
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    assert version() == v0
    Image.new("RGB", (32, 32), (9, 9, 9)).save(image)
    assert version() != v0
