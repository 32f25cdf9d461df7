"""Ingest: every bad input lands in quarantine with its reason, good rows survive, rows in = out + quarantined."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.column_mapping import PRESETS, ColumnMapping, derive_id, strip_llava_prompt
from pipeline.image_checks import ImageInfo, ImageProblem, check_image
from pipeline.ingest import ingest_examples, ingest_pool
from pipeline.ingest_schema import EXAMPLE_SCHEMA, POOL_SCHEMA, QUARANTINE_SCHEMA, REASONS, IngestLimits

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------ fixture makers


def rgb(w: int = 32, h: int = 24) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def save(im: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def truncated_png(path: Path) -> Path:
    save(rgb(64, 64), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def png_bomb(path: Path, w: int, h: int) -> Path:
    """A real decompression bomb: a valid 1-bit PNG of w x h zeros, a few KB on disk."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (w + 7) // 8)
    co = zlib.compressobj(9)
    block = 1000
    idat = b"".join(co.compress(row * min(block, h - i)) for i in range(0, h, block)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def valid_mode_images(folder: Path) -> dict[str, Path]:
    """One file per mode/format that must pass (the embed stage converts to RGB)."""
    base = rgb(40, 30)
    gray16 = Image.fromarray((RNG.integers(0, 65535, (30, 40))).astype(np.uint16))
    assert gray16.mode == "I;16"
    return {
        "rgb.png": save(base, folder / "rgb.png"),
        "rgb.jpg": save(base, folder / "rgb.jpg", quality=90),
        "rgb.webp": save(base, folder / "rgb.webp"),
        "rgb.bmp": save(base, folder / "rgb.bmp"),
        "l.png": save(base.convert("L"), folder / "l.png"),
        "la.png": save(base.convert("LA"), folder / "la.png"),
        "p.png": save(base.convert("P"), folder / "p.png"),
        "p.gif": save(base.convert("P"), folder / "p.gif"),
        "rgba.png": save(base.convert("RGBA"), folder / "rgba.png"),
        "cmyk.jpg": save(base.convert("CMYK"), folder / "cmyk.jpg"),
        "cmyk.tif": save(base.convert("CMYK"), folder / "cmyk.tif"),
        "i16.png": save(gray16, folder / "i16.png"),
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reasons_by_id(q: pl.DataFrame) -> dict[str, str]:
    return dict(zip(q["id"].to_list(), q["reason"].to_list()))


# ------------------------------------------------------------------------------------------------- image checks


def test_valid_modes_pass(tmp_path: Path) -> None:
    for name, path in valid_mode_images(tmp_path).items():
        info = check_image(path, IngestLimits())
        assert isinstance(info, ImageInfo), (name, info)
        assert (info.width, info.height) == (40, 30)
        assert info.sha256 == sha(path)


def test_bad_images_get_their_reason(tmp_path: Path) -> None:
    limits = IngestLimits()
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "random.jpg").write_bytes(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "folder.png").mkdir()
    save(rgb(1, 1), tmp_path / "one.png")
    truncated_png(tmp_path / "cut.png")
    big = save(rgb(64, 64), tmp_path / "big.png")
    expect = {
        "missing.png": "missing_file",
        "folder.png": "missing_file",
        "zero.png": "empty_file",
        "random.jpg": "undecodable_image",
        "one.png": "image_too_small",
        "cut.png": "truncated_image",
    }
    for name, reason in expect.items():
        out = check_image(tmp_path / name, limits)
        assert isinstance(out, ImageProblem) and out.reason == reason, (name, out)
        assert out.detail
    out = check_image(big, IngestLimits(max_file_bytes=100))
    assert isinstance(out, ImageProblem) and out.reason == "image_too_large"
    out = check_image(big, IngestLimits(max_pixels=1000))
    assert isinstance(out, ImageProblem) and out.reason == "image_too_large"


def test_truncation_is_seen_even_if_pil_is_told_to_pad(tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    out = check_image(truncated_png(tmp_path / "cut.png"), IngestLimits())
    assert isinstance(out, ImageProblem) and out.reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_truncated_jpeg_and_webp(tmp_path: Path) -> None:
    for ext in ("jpg", "webp"):
        path = save(rgb(64, 64), tmp_path / f"x.{ext}")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        out = check_image(path, IngestLimits())
        assert isinstance(out, ImageProblem) and out.reason == "truncated_image", (ext, out)


def test_decompression_bombs_are_too_large_and_nothing_escapes(tmp_path: Path) -> None:
    huge = png_bomb(tmp_path / "huge.png", 20000, 20000)  # 400M px: PIL raises DecompressionBombError
    warn = png_bomb(tmp_path / "warn.png", 10000, 10000)  # 100M px: PIL warns
    assert huge.stat().st_size < 200_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in (huge, warn):
            out = check_image(path, IngestLimits())
            assert isinstance(out, ImageProblem) and out.reason == "image_too_large", out
        # Above PIL's own guard even when our limit allows it: still a quarantine, never an exception.
        out = check_image(huge, IngestLimits(max_pixels=10**9))
        assert isinstance(out, ImageProblem) and out.reason == "image_too_large"


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="min_side"):
        IngestLimits(min_side=0)


# --------------------------------------------------------------------------------------------------------- pool


@pytest.fixture()
def pool(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """A pool folder with good images (subfolders, upper-case suffixes) and one of every bad kind.
    Returns the folder and image_id -> expected reason (None: valid)."""
    root = tmp_path / "pool"
    expect: dict[str, str | None] = {}
    for i in range(12):
        rel = f"{'sub/' if i % 3 == 0 else ''}img{i:02d}.{'PNG' if i % 4 == 0 else 'png'}"
        save(rgb(16 + i, 20), root / rel)
        expect[rel] = None
    for name, path in valid_mode_images(root / "modes").items():
        expect[f"modes/{name}"] = None
    (root / "zero.jpg").write_bytes(b"")
    expect["zero.jpg"] = "empty_file"
    (root / "noise.jpeg").write_bytes(RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    expect["noise.jpeg"] = "undecodable_image"
    truncated_png(root / "cut.png")
    expect["cut.png"] = "truncated_image"
    save(rgb(1, 1), root / "tiny.png")
    expect["tiny.png"] = "image_too_small"
    png_bomb(root / "deep/bomb.png", 20000, 20000)
    expect["deep/bomb.png"] = "image_too_large"
    outside = save(rgb(), tmp_path / "outside.png")
    os.symlink(outside, root / "escape.png")
    expect["escape.png"] = "path_outside_root"
    os.symlink(root / "img01.png", root / "inside_link.png")
    expect["inside_link.png"] = None
    os.symlink(root / "gone.png", root / "dangling.png")
    expect["dangling.png"] = "missing_file"
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").write_text("x")
    return root, expect


def test_pool_ingest(pool) -> None:
    root, expect = pool
    res = ingest_pool(root, shard=0, num_shards=1, progress=False)
    assert res.rows_in == len(expect) == res.rows.height + res.quarantine.height
    assert dict(res.rows.schema) == POOL_SCHEMA
    assert dict(res.quarantine.schema) == QUARANTINE_SCHEMA
    assert reasons_by_id(res.quarantine) == {k: v for k, v in expect.items() if v}
    assert sorted(res.rows["image_id"].to_list()) == sorted(k for k, v in expect.items() if v is None)
    assert set(res.quarantine["source"]) == {"pool"}
    listing = sorted(expect)
    assert res.quarantine["row_index"].to_list() == sorted(listing.index(i) for i in res.quarantine["id"])
    row = res.rows.filter(pl.col("image_id") == "sub/img03.png").row(0, named=True)
    assert row["path"] == str(root.resolve() / "sub/img03.png")
    assert row["sha256"] == sha(root / "sub/img03.png")
    assert (row["width"], row["height"], row["shard"]) == (19, 20, 0)
    assert res.counts()["image_too_large"] == 1
    assert res.summary()["rows_out"] == res.rows.height


def test_pool_shards_partition_the_unsharded_result(pool) -> None:
    root, _ = pool
    full = ingest_pool(root, shard=0, num_shards=1, progress=False)
    parts = [ingest_pool(root, shard=s, num_shards=3, progress=False) for s in range(3)]
    assert all(p.rows.height > 0 for p in parts)
    rows = pl.concat([p.rows for p in parts])
    quarantine = pl.concat([p.quarantine for p in parts])
    assert rows["image_id"].is_unique().all() and quarantine["id"].is_unique().all()
    assert sum(p.rows_in for p in parts) == full.rows_in
    assert rows.drop("shard").sort("image_id").equals(full.rows.drop("shard").sort("image_id"))
    assert quarantine.sort("row_index").equals(full.quarantine)
    for s, p in enumerate(parts):
        assert set(p.rows["shard"]) <= {s}


def test_pool_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        ingest_pool(tmp_path / "nope", shard=0, num_shards=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        ingest_pool(tmp_path / "empty", shard=0, num_shards=1)
    save(rgb(), tmp_path / "ok/a.png")
    with pytest.raises(ValueError, match="shard=2"):
        ingest_pool(tmp_path / "ok", shard=2, num_shards=2)


# ------------------------------------------------------------------------------------------------------ examples


@pytest.fixture()
def examples(tmp_path: Path) -> tuple[Path, Path, dict[str, str | None], list[bytes]]:
    """A JSONL manifest with good rows and every bad kind. Returns manifest, image root, id -> expected reason,
    and the raw lines (to rewrite the same rows in other formats)."""
    root = tmp_path / "images"
    for i in range(6):
        save(rgb(20 + i, 20), root / f"ok{i}.png")
    truncated_png(root / "cut.png")
    save(rgb(2, 2), root / "tiny.png")
    (root / "empty.png").write_bytes(b"")
    (root / "noise.png").write_bytes(b"\x89PNG not really")
    png_bomb(root / "bomb.png", 20000, 20000)
    outside = save(rgb(), tmp_path / "secret.png")
    os.symlink(outside, root / "link.png")
    save(rgb(), root / "sub/deep.png")

    def row(id_, image="ok0.png", prompt="What is shown?", chosen="A cat.", rejected="A dog.", **extra):
        d = {"id": id_, "prompt": prompt, "chosen": chosen, "rejected": rejected, "image": image, **extra}
        return {k: v for k, v in d.items() if v is not ...}

    good = {
        "g0": row("g0", kind="a"),
        "g1": row("g1", image="ok1.png", rejected=None, kind="b"),  # null rejected: valid
        "g2": row("g2", image="ok2.png", rejected=..., kind="c"),  # absent rejected: valid
        "g3": row("g3", image="sub/../ok3.png"),  # `..` that stays inside the root
        "g4": row("g4", image="ok0.png"),  # shares an image with g0
        "g5": row("g5", image=str(root / "ok5.png")),  # absolute, inside the root
        "g6": row("g6", image="sub/deep.png", prompt="x" * 8192),  # exactly at the limit
        "dup": row("dup", image="ok4.png"),
    }
    bad = {
        "dup#2": ("duplicate_id", row("dup", image="ok1.png")),
        "no_prompt": ("missing_field", row("no_prompt", prompt=...)),
        "null_chosen": ("missing_field", row("null_chosen", chosen=None)),
        "no_image": ("missing_field", row("no_image", image=...)),
        "blank_prompt": ("empty_prompt", row("blank_prompt", prompt="  \n ")),
        "empty_chosen": ("empty_response", row("empty_chosen", chosen="")),
        "empty_rejected": ("empty_response", row("empty_rejected", rejected="")),
        "long_prompt": ("text_too_long", row("long_prompt", prompt="x" * 8193)),
        "long_chosen": ("text_too_long", row("long_chosen", chosen="y" * 9000)),
        "int_prompt": ("malformed_row", row("int_prompt", prompt=42)),
        "dotdot": ("path_outside_root", row("dotdot", image="../secret.png")),
        "absolute": ("path_outside_root", row("absolute", image=str(outside))),
        "symlink": ("path_outside_root", row("symlink", image="link.png")),
        "missing": ("missing_file", row("missing", image="nope.png")),
        "url": ("missing_file", row("url", image="http://example.com/a.png")),
        "empty": ("empty_file", row("empty", image="empty.png")),
        "noise": ("undecodable_image", row("noise", image="noise.png")),
        "cut": ("truncated_image", row("cut", image="cut.png")),
        "tiny": ("image_too_small", row("tiny", image="tiny.png")),
        "bomb": ("image_too_large", row("bomb", image="bomb.png")),
        "cut_again": ("truncated_image", row("cut_again", image="cut.png")),
    }
    lines: list[bytes] = []
    for key, value in list(good.items()) + [(k, v[1]) for k, v in bad.items()]:
        lines.append(json.dumps(value).encode())
    lines.insert(3, b'{"id": "broken", "prompt": ')  # malformed JSON
    lines.insert(5, b'{"id": "latin1", "prompt": "caf\xe9", "chosen": "a", "image": "ok0.png"}')  # not UTF-8
    lines.insert(7, b"[1, 2, 3]")  # JSON but not an object
    lines.insert(9, b'{"id": "surrogate", "prompt": "\\ud800", "chosen": "a", "image": "ok0.png"}')
    lines.insert(11, b'{"prompt": "no id", "chosen": "a", "image": "ok0.png"}')
    manifest = tmp_path / "prefs.jsonl"
    manifest.write_bytes(b"\n".join(lines[:6]) + b"\n\n  \r\n" + b"\n".join(lines[6:]) + b"\n")
    expect: dict[str, str | None] = {k: None for k in good}
    expect.update({k: v[0] for k, v in bad.items()})
    return manifest, root, expect, lines


def _by_row(q: pl.DataFrame) -> list[tuple[str | None, str]]:
    return list(zip(q["id"].to_list(), q["reason"].to_list()))


def test_examples_jsonl(examples) -> None:
    manifest, root, expect, lines = examples
    res = ingest_examples(manifest, image_root=root, shard=0, num_shards=1, progress=False)
    assert res.rows_in == len(lines) == res.rows.height + res.quarantine.height
    assert list(res.rows.columns[: len(EXAMPLE_SCHEMA)]) == list(EXAMPLE_SCHEMA)
    assert {k: res.rows.schema[k] for k in EXAMPLE_SCHEMA} == EXAMPLE_SCHEMA
    assert dict(res.quarantine.schema) == QUARANTINE_SCHEMA
    assert res.rows["example_id"].to_list() == [k for k, v in expect.items() if v is None]

    q = res.quarantine
    assert q["row_index"].is_sorted() and set(q["reason"]) <= set(REASONS)
    keyed = {i: r for i, r in _by_row(q) if i is not None and i != "dup"}
    assert keyed == {k: v for k, v in expect.items() if v and k != "dup#2"}
    assert ("dup", "duplicate_id") in _by_row(q)
    unnamed = sorted(r for i, r in _by_row(q) if i is None)
    assert unnamed == sorted(["malformed_row", "invalid_text", "malformed_row", "invalid_text", "missing_field"])
    dup = q.filter(pl.col("reason") == "duplicate_id").row(0, named=True)
    first = res.rows.filter(pl.col("example_id") == "dup")["row_index"][0]
    assert f"row {first}" in dup["detail"] and json.loads(dup["raw"])["image"] == "ok1.png"
    bad_line = q.filter(pl.col("reason") == "invalid_text")["detail"].to_list()
    assert any("not UTF-8" in d and "line 6" in d for d in bad_line)  # line numbers count the blank lines
    assert all(len(r) <= 2000 for r in q["raw"])

    g = {r["example_id"]: r for r in res.rows.iter_rows(named=True)}
    assert g["g1"]["rejected"] is None and g["g2"]["rejected"] is None and g["g0"]["rejected"] == "A dog."
    assert g["g3"]["image_id"] == "sub/../ok3.png" and g["g3"]["image_path"] == str(root.resolve() / "ok3.png")
    assert g["g0"]["image_sha256"] == g["g4"]["image_sha256"] == sha(root / "ok0.png")
    assert (g["g2"]["width"], g["g2"]["height"]) == (22, 20)
    assert g["g0"]["kind"] == "a" and g["g3"]["kind"] is None  # extra column carried through
    assert g["g0"]["row_index"] == 0 and g["g6"]["row_index"] > g["g5"]["row_index"]


def test_examples_shards_partition_the_unsharded_result(examples) -> None:
    manifest, root, _, _ = examples
    full = ingest_examples(manifest, image_root=root, shard=0, num_shards=1, progress=False)
    parts = [ingest_examples(manifest, image_root=root, shard=s, num_shards=4, progress=False) for s in range(4)]
    assert sum(p.rows_in for p in parts) == full.rows_in
    rows = pl.concat([p.rows for p in parts])
    quarantine = pl.concat([p.quarantine for p in parts])
    assert rows["example_id"].is_unique().all() and quarantine["row_index"].is_unique().all()
    assert rows.drop("shard").sort("row_index").equals(full.rows.drop("shard"))
    assert quarantine.sort("row_index").equals(full.quarantine)
    # Every copy of a duplicated id lands in the shard of the first, which keeps the first.
    dup_shards = {s for s, p in enumerate(parts) if "dup" in p.rows["example_id"].to_list() + p.quarantine["id"].to_list()}
    assert len(dup_shards) == 1


def test_parquet_manifest_matches_jsonl(examples, tmp_path: Path) -> None:
    manifest, root, _, lines = examples
    records = []
    for line in lines:
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and "\\ud800" not in line.decode() and not isinstance(rec.get("prompt"), int):
            records.append(rec)
    jsonl = tmp_path / "clean.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    parquet = tmp_path / "clean.parquet"
    pl.DataFrame(records, infer_schema_length=None).write_parquet(parquet)
    a = ingest_examples(jsonl, image_root=root, shard=0, num_shards=1, progress=False)
    b = ingest_examples(parquet, image_root=root, shard=0, num_shards=1, progress=False)
    assert a.rows.equals(b.rows)
    assert a.quarantine.drop("detail", "raw").equals(b.quarantine.drop("detail", "raw"))
    assert a.counts() == b.counts()


def test_extra_columns_keep_types_and_avoid_clashes(tmp_path: Path) -> None:
    save(rgb(), tmp_path / "a.png")
    rows = [
        {"id": "x", "prompt": "p", "chosen": "c", "image": "a.png", "shard": "train", "score": 1, "mixed": 1, "meta": {"k": 1}},
        {"id": "y", "prompt": "p", "chosen": "c", "image": "a.png", "shard": "test", "score": 2, "mixed": "two", "meta": {"j": "v"}},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    res = ingest_examples(path, shard=0, num_shards=1, progress=False)
    assert res.rows["src_shard"].to_list() == ["train", "test"] and res.rows["shard"].to_list() == [0, 0]
    assert res.rows.schema["score"] == pl.Int64
    assert res.rows["mixed"].to_list() == ["1", '"two"']  # mixed types are kept as JSON text
    assert [json.loads(v) for v in res.rows["meta"]] == [{"k": 1}, {"j": "v"}]
    assert any("renamed" in n for n in res.notes)
    # A shard without rows still has every column, with the types of the whole manifest.
    empty = [ingest_examples(path, shard=s, num_shards=8, progress=False) for s in range(8)]
    schemas = {tuple(r.rows.schema.items()) for r in empty}
    assert len(schemas) == 1


def test_extra_column_types_are_decided_over_the_whole_streamed_manifest(tmp_path: Path) -> None:
    """Shards keep only their rows, yet agree on each extra column's type, across blocks of 1,024 rows: a list that
    is empty in the first block and holds ints later is a list of ints; a column that is an int in the first block
    and text in the last is JSON text in every shard, including shards that only saw ints."""
    save(rgb(), tmp_path / "a.png")
    n = 2500
    rows = [{"id": f"r{i}", "prompt": "p", "chosen": "c", "image": "a.png", "tags": [] if i < 1500 else [i],
             "late": i if i < n - 1 else "last", "nested": {"k": i, "v": None if i % 2 else "x"}} for i in range(n)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    parts = [ingest_examples(path, shard=s, num_shards=3, progress=False) for s in range(3)]
    assert sum(p.rows.height for p in parts) == n
    assert len({tuple(p.rows.schema.items()) for p in parts}) == 1
    schema = parts[0].rows.schema
    assert schema["tags"] == pl.List(pl.Int64) and schema["late"] == pl.String
    assert schema["nested"] == pl.Struct({"k": pl.Int64, "v": pl.String})
    got = {r["example_id"]: r for p in parts for r in p.rows.iter_rows(named=True)}
    assert got["r0"]["tags"] == [] and got["r2000"]["tags"] == [2000] and got["r7"]["late"] == "7"
    assert got[f"r{n - 1}"]["late"] == '"last"' and got["r3"]["nested"] == {"k": 3, "v": None}


def test_manifest_errors(tmp_path: Path) -> None:
    save(rgb(), tmp_path / "a.png")
    kw = dict(shard=0, num_shards=1, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ingest_examples(tmp_path / "missing.jsonl", **kw)
    (tmp_path / "m.csv").write_text("id,prompt\n")
    with pytest.raises(ValueError, match="suffix"):
        ingest_examples(tmp_path / "m.csv", **kw)
    (tmp_path / "broken.json").write_text('[{"id": 1}, ')
    with pytest.raises(ValueError, match="broken.json"):
        ingest_examples(tmp_path / "broken.json", **kw)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no rows"):
        ingest_examples(tmp_path / "empty.jsonl", **kw)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(ValueError, match="bad.parquet"):
        ingest_examples(tmp_path / "bad.parquet", **kw)
    (tmp_path / "one.json").write_text(json.dumps({"id": "1", "prompt": "p"}, indent=2))
    with pytest.raises(ValueError, match="one JSON object"):
        ingest_examples(tmp_path / "one.json", **kw)
    (tmp_path / "ok.jsonl").write_text(json.dumps({"q": "p", "a": "c", "img": "a.png"}))
    with pytest.raises(ValueError, match="absent from every row"):
        ingest_examples(tmp_path / "ok.jsonl", **kw)
    with pytest.raises(FileNotFoundError, match="image root"):
        ingest_examples(tmp_path / "ok.jsonl", image_root=tmp_path / "no_dir", **kw)


# ---------------------------------------------------------------------------------------------- column mapping


def test_mapping_resolve() -> None:
    assert ColumnMapping.resolve("canonical") == ColumnMapping() == ColumnMapping.resolve(None)
    assert ColumnMapping.resolve("RLAIF-V") == PRESETS["rlaif_v"]
    assert ColumnMapping.resolve("mdpo") == PRESETS["vlfeedback_mdpo"]
    m = ColumnMapping.resolve({"prompt": "question", "image": "file"})
    assert (m.prompt, m.image, m.chosen) == ("question", "file", "chosen")
    assert ColumnMapping.resolve('{"preset": "rlhf_v", "id": null}') == ColumnMapping(
        id=None, prompt="text.question", chosen="text.chosen", rejected="text.rejected", image="image_path",
        image_bytes="image",
    )
    assert ColumnMapping.resolve(m) is m
    with pytest.raises(ValueError, match="rlaif_v"):
        ColumnMapping.resolve("hh-rlhf")
    with pytest.raises(ValueError, match="unknown"):
        ColumnMapping.resolve({"question": "prompt"})
    with pytest.raises(ValueError, match="does not parse"):
        ColumnMapping.resolve("{bad json")
    with pytest.raises(ValueError, match="prompt_format"):
        ColumnMapping(prompt_format="chatml")


def test_strip_llava_prompt() -> None:
    full = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nHow many dogs are there? ASSISTANT:"
    )
    assert strip_llava_prompt(full) == "How many dogs are there?"
    assert strip_llava_prompt("Describe it.") == "Describe it."


def test_vlfeedback_mdpo_json_array(tmp_path: Path) -> None:
    """mDPO ships vlfeedback_llava_10k.json: a JSON array of {img_path, prompt, chosen, rejected}, no id."""
    save(rgb(), tmp_path / "images/llava-reasoning-1.jpg")
    template = "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n{} ASSISTANT:"
    items = [
        {"img_path": "images/llava-reasoning-1.jpg", "prompt": template.format("What is here?"), "chosen": "A", "rejected": "B"},
        {"img_path": "images/llava-reasoning-1.jpg", "prompt": template.format("Why?"), "chosen": "C", "rejected": "D"},
        {"img_path": "images/llava-reasoning-1.jpg", "prompt": template.format("What is here?"), "chosen": "A", "rejected": "B"},
        {"img_path": "images/llava-reasoning-1.jpg", "prompt": template.format(""), "chosen": "A", "rejected": "B"},
        "not a row",
    ]
    path = tmp_path / "vlfeedback_llava_10k.json"
    path.write_text(json.dumps(items, indent=4))
    res = ingest_examples(path, mapping="vlfeedback_mdpo", shard=0, num_shards=1, progress=False)
    assert res.rows["prompt"].to_list() == ["What is here?", "Why?"]
    expected_id = derive_id(items[0]["img_path"], items[0]["prompt"], "A", "B")
    assert res.rows["example_id"][0] == expected_id and len(expected_id) == 16
    assert _by_row(res.quarantine) == [(expected_id, "duplicate_id"), (res.quarantine["id"][1], "empty_prompt"), (None, "malformed_row")]
    assert any("derived" in n for n in res.notes)
    again = ingest_examples(path, mapping="vlfeedback_mdpo", shard=0, num_shards=1, progress=False)
    assert again.rows["example_id"].equals(res.rows["example_id"])  # deterministic


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    rgb().save(buf, "PNG")
    return buf.getvalue()


def test_rlhf_v_parquet(tmp_path: Path) -> None:
    """openbmb/RLHF-V-Dataset: ds_name, image{bytes,path}, text (JSON string), origin_dataset, origin_split,
    idx (int64), image_path."""
    save(rgb(), tmp_path / "imgs/coco/1.jpg")
    texts = [
        json.dumps({"question": "What is on the table?", "chosen": "A cup.", "rejected": "A plate and a cup."}),
        "{not json",
        json.dumps({"question": "Describe.", "chosen": "A room."}),  # no rejected: allowed
    ]
    table = pa.table(
        {
            "ds_name": ["RLHF-V"] * 3,
            "image": pa.array([{"bytes": _png_bytes(), "path": None}] * 3, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "text": texts,
            "origin_dataset": ["coco"] * 3,
            "origin_split": ['{"model": "x"}'] * 3,
            "idx": pa.array([10, 11, 12], pa.int64()),
            "image_path": ["coco/1.jpg"] * 3,
        }
    )
    path = tmp_path / "RLHF-V-Dataset.parquet"
    pq.write_table(table, path)
    # The files route (images exported by hand): the bytes column is not read.
    res = ingest_examples(path, image_root=tmp_path / "imgs", mapping={"preset": "rlhf_v", "image_bytes": None},
                          shard=0, num_shards=1, progress=False)
    assert res.rows["example_id"].to_list() == ["10", "12"]
    assert res.rows["prompt"].to_list() == ["What is on the table?", "Describe."]
    assert res.rows["rejected"].to_list() == ["A plate and a cup.", None]
    assert res.rows["origin_dataset"].to_list() == ["coco", "coco"] and "image" not in res.rows.columns
    assert "text" not in res.rows.columns and "idx" not in res.rows.columns
    assert _by_row(res.quarantine) == [(None, "malformed_row")]
    assert any("image" in n and "bytes" in n for n in res.notes)
    with pytest.raises(ValueError, match="image bytes"):
        ingest_examples(path, image_root=tmp_path / "imgs", mapping={"preset": "rlhf_v", "image": "image",
                                                                     "image_bytes": None}, shard=0, num_shards=1)


def test_rlaif_v_parquet(tmp_path: Path) -> None:
    """openbmb/RLAIF-V-Dataset: ds_name, image, question, chosen, rejected, origin_dataset, origin_split,
    idx (string), image_path."""
    save(rgb(), tmp_path / "a/0.png")
    save(rgb(), tmp_path / "a/1.png")
    table = pa.table(
        {
            "ds_name": ["RLAIF-V"] * 3,
            "question": ["Q0", "Q1", "Q2"],
            "chosen": ["C0", "C1", "C2"],
            "rejected": ["R0", "R1", "R2"],
            "origin_dataset": ["x"] * 3,
            "origin_split": ["{}"] * 3,
            "idx": ["OmniLMM_0", "OmniLMM_1", "OmniLMM_0"],
            "image_path": ["a/0.png", "a/1.png", "a/0.png"],
        }
    )
    path = tmp_path / "rlaif.parquet"
    pq.write_table(table, path)
    res = ingest_examples(path, mapping="rlaif_v", shard=0, num_shards=1, progress=False)
    assert res.rows["example_id"].to_list() == ["OmniLMM_0", "OmniLMM_1"]
    assert res.rows["prompt"].to_list() == ["Q0", "Q1"] and res.rows["rejected"].to_list() == ["R0", "R1"]
    assert res.counts() == {"duplicate_id": 1}


def test_pool_odd_names_and_folder_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    save(rgb(), root / "a.png")
    bad_name = os.fsencode(root) + b"/caf\xe9.png"  # a Latin-1 file name: not UTF-8
    with open(bad_name, "wb") as fh:
        rgb().save(fh, "PNG")
    save(rgb(), tmp_path / "elsewhere/b.png")
    os.symlink(tmp_path / "elsewhere", root / "linked")
    res = ingest_pool(root, shard=0, num_shards=1, progress=False)
    assert res.rows["image_id"].to_list() == ["a.png"]
    assert _by_row(res.quarantine) == [("caf\\xe9.png", "invalid_text")]
    assert any("linked" in n and "not followed" in n for n in res.notes)
    res.quarantine.write_parquet(tmp_path / "q.parquet")  # the escaped name is storable


def test_all_lines_bad_are_quarantined_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"{oops\n\xff\xfe\n[]\n")
    res = ingest_examples(path, shard=0, num_shards=1, progress=False)
    assert res.rows.height == 0 and res.counts() == {"malformed_row": 2, "invalid_text": 1}
    assert list(res.rows.columns) == list(EXAMPLE_SCHEMA)


def test_rejected_column_may_be_absent(tmp_path: Path) -> None:
    save(rgb(), tmp_path / "a.png")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "1", "prompt": "p", "chosen": "c", "image": "a.png"}))
    res = ingest_examples(path, shard=0, num_shards=1, progress=False)
    assert res.rows["rejected"].to_list() == [None]
    assert any("rejected" in n for n in res.notes)
