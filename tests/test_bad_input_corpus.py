"""A user's `files` source that mixes every kind of bad input with good rows, materialised through ingest and the
embeddings on a real (temporary) Dagster instance: every bad row is in quarantine with the right reason, every good
row (non-RGB and 16-bit images included) is embedded, rows in = rows out + quarantined in every asset's metadata,
and NaN embeddings from a broken CLIP checkpoint are quarantined instead of written."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
import open_clip
import polars as pl
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from assets.definitions import all_assets
from assets.partitions import partition_keys
from assets.resources import ClipModel, DataRoot, DataSource
from pipeline.checks import check_unique_keys
from world.clip import WorldClipConfig, save_world_clip
from pipeline.embed import NON_FINITE
from pipeline.ingest_schema import QUARANTINE_SCHEMA
from pipeline.sharding import shard_keys
from trainer.shards import load_shards

INGEST = ["pool_images", "preference_examples"]
EMBED = ["pool_embeddings", "positive_embeddings", "prompt_embeddings"]
EMBED_TABLES = {"pool_embeddings": "pool", "positive_embeddings": "positives", "prompt_embeddings": "prompts"}
BANANA = "banana"  # the token whose embedding row the broken checkpoint sets to NaN
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------------- the corpus


def _noise(w: int = 40, h: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(im: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _valid_images(folder: Path) -> dict[str, Path]:
    """Every image mode a user's data holds; all are valid (the embed stage converts them to 8-bit RGB)."""
    noise = Image.fromarray(_noise(), "RGB")
    gray16 = np.linspace(0, 65535, 40 * 32).reshape(32, 40).astype(np.uint16)
    return {
        "rgb_png": _save(noise, folder / "rgb.png"),
        "rgb_jpeg": _save(Image.fromarray(_noise(), "RGB"), folder / "rgb.jpg", quality=90),
        "gray": _save(noise.convert("L"), folder / "gray.png"),
        "palette": _save(noise.convert("P"), folder / "palette.gif"),
        "rgba": _save(noise.convert("RGBA"), folder / "rgba.png"),
        "cmyk": _save(noise.convert("CMYK"), folder / "cmyk.jpg"),
        "gray16": _save(Image.fromarray(gray16), folder / "gray16.png"),  # mode I;16
        "bilevel": _save(noise.convert("1"), folder / "bilevel.png"),
    }


def _png_bomb(path: Path, w: int, h: int) -> Path:
    """A real decompression bomb: a valid 1-bit PNG of w x h zeros, a few KB on disk."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row, co = b"\x00" * (1 + (w + 7) // 8), zlib.compressobj(9)
    idat = b"".join(co.compress(row * min(1000, h - i)) for i in range(0, h, 1000)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """Image files that must be quarantined, with the reason each must get."""
    folder.mkdir(parents=True, exist_ok=True)
    truncated = _save(Image.fromarray(_noise(64, 64), "RGB"), folder / "truncated.png")
    truncated.write_bytes(truncated.read_bytes()[:600])
    (folder / "corrupt.jpg").write_bytes(os.urandom(2048))
    (folder / "empty.png").write_bytes(b"")
    return {
        "corrupt": (folder / "corrupt.jpg", "undecodable_image"),
        "truncated": (truncated, "truncated_image"),
        "empty": (folder / "empty.png", "empty_file"),
        "one_pixel": (_save(Image.new("RGB", (1, 1), (255, 0, 0)), folder / "pixel.png"), "image_too_small"),
        "bomb": (_png_bomb(folder / "bomb.png", 20000, 20000), "image_too_large"),  # PIL refuses it
        "big_header": (_png_bomb(folder / "big.png", 10000, 10000), "image_too_large"),  # over max_pixels
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A pool folder and a JSON Lines manifest mixing every bad kind with good rows. Returns the paths and what
    must happen to each row: `pool_bad` / `examples_bad` map image_id / row_index to the reason, `pool_good` /
    `examples_good` list what must come out."""
    base = tmp_path_factory.mktemp("corpus")
    root, pool, outside = base / "root", base / "pool", base / "outside"
    _save(Image.fromarray(_noise(), "RGB"), outside / "secret.png")  # valid, but outside every root

    good = _valid_images(root / "images")
    bad = _bad_images(root / "images")
    rel = {k: p.relative_to(root).as_posix() for k, p in good.items()}

    def row(id_, image, prompt="Describe the image.", chosen="a striped square", rejected="a dotted circle", **kw):
        return {"id": id_, "prompt": prompt, "chosen": chosen, "rejected": rejected, "image": image, **kw}

    good_rows = [row(f"good-{k}", p) for k, p in rel.items()] + [
        row("good-absolute-inside", str(good["rgb_png"])),
        row("good-dotdot-inside", "images/../images/gray.png"),
        row("good-no-rejected", rel["rgba"], rejected=None),
        row("good-long-prompt", rel["cmyk"], prompt="Describe every object. " * 340),  # 7,820 chars: under the limit
        row("good-banana-1", rel["rgb_png"], prompt=f"Is there a {BANANA} in the image?"),
        row("good-banana-2", rel["gray"], prompt=f"Where is the {BANANA}?"),
        row("good-unicode", rel["palette"], prompt="Décris l'image — 画像を説明して 🙂"),
    ]
    bad_rows = [(row(f"bad-{k}", p.relative_to(root).as_posix()), reason) for k, (p, reason) in bad.items()] + [
        (row("bad-missing", "images/nope.png"), "missing_file"),
        (row("bad-url", "https://example.com/cat.png"), "missing_file"),
        (row("bad-empty-prompt", rel["rgb_png"], prompt=""), "empty_prompt"),
        (row("bad-blank-prompt", rel["rgb_png"], prompt=" \n\t "), "empty_prompt"),
        (row("bad-long-prompt", rel["rgb_png"], prompt="x" * 9000), "text_too_long"),
        (row("bad-empty-chosen", rel["rgb_png"], chosen=""), "empty_response"),
        (row("bad-dotdot", "../outside/secret.png"), "path_outside_root"),
        (row("bad-dotdot-deep", "images/" + "../" * 40 + "etc/passwd"), "path_outside_root"),  # /etc/passwd
        (row("bad-absolute-outside", str(outside / "secret.png")), "path_outside_root"),
        (row("good-rgb_png", rel["gray"], prompt="Same id, other content."), "duplicate_id"),
        (row("bad-prompt-type", rel["rgb_png"], prompt=42), "malformed_row"),
        ({"id": "bad-no-image", "prompt": "Describe.", "chosen": "a", "rejected": "b"}, "missing_field"),
    ]
    items = [(json.dumps(r, ensure_ascii=False).encode(), None) for r in good_rows]
    items += [(json.dumps(r, ensure_ascii=False).encode(), reason) for r, reason in bad_rows]
    items += [(b'{"id": "bad-latin1", "prompt": "caf\xe9", "chosen": "a", "image": "images/rgb.png"}', "invalid_text"),
              (b'{"id": "bad-surrogate", "prompt": "\\ud800", "chosen": "a", "image": "images/rgb.png"}',
               "invalid_text"),
              (b'{"id": "bad-json", "prompt": ', "malformed_row"),
              (b'["not", "an", "object"]', "malformed_row")]
    # Bad rows interleaved with good ones (the duplicate id last, after the row that keeps the id), and a blank
    # line between rows, which is not a row: reasons are looked up by row_index.
    order = [items[i] for i in np.random.default_rng(1).permutation(len(items))]
    order.append(order.pop(next(i for i, (_, reason) in enumerate(order) if reason == "duplicate_id")))
    manifest = base / "prefs.jsonl"
    manifest.write_bytes(b"\n\n".join(line for line, _ in order) + b"\n")
    examples_bad = {i: reason for i, (_, reason) in enumerate(order) if reason is not None}
    examples_good = [i for i, (_, reason) in enumerate(order) if reason is None]

    pool_good = {p.name for p in _valid_images(pool).values()}
    _save(Image.fromarray(_noise(), "RGB"), pool / "nested" / "deeper" / "ok.png")
    pool_good.add("nested/deeper/ok.png")
    pool_bad = {p.relative_to(pool).as_posix(): reason for p, reason in _bad_images(pool / "bad").values()}
    (pool / "escape.png").symlink_to(outside / "secret.png")  # a symlinked file that leaves the pool
    pool_bad["escape.png"] = "path_outside_root"
    with open(os.fsencode(pool) + b"/caf\xe9.png", "wb") as fh:  # a Latin-1 file name: not UTF-8
        fh.write((pool / "rgb.png").read_bytes())
    pool_bad["caf\\xe9.png"] = "invalid_text"
    (pool / "README.txt").write_text("not an image: ignored, not a row")
    return {"root": root, "pool": pool, "manifest": manifest, "rows": len(order),
            "pool_files": len(pool_good) + len(pool_bad), "examples_bad": examples_bad,
            "examples_good": examples_good, "examples_good_ids": [json.loads(order[i][0])["id"] for i in examples_good],
            "pool_bad": pool_bad, "pool_good": pool_good}


# ------------------------------------------------------------------------------------------ a tiny open_clip CLIP


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """A random-init open_clip CLIP in the `local-dir:` layout (what a user's checkpoint looks like), and a copy
    whose weights are broken in two places: the token embedding of BANANA (only prompts with that word give NaN)
    and the vision tower's class embedding (every image gives NaN)."""
    base = tmp_path_factory.mktemp("clip")
    cfg = WorldClipConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, text_width=32,
                          text_layers=1, text_heads=2, embed_dim=16)
    torch.manual_seed(0)
    save_world_clip(open_clip.CLIP(**cfg.model_cfg()), cfg, base / "clean", {})
    shutil.copytree(base / "clean", base / "broken")
    weights = load_file(str(base / "broken" / "open_clip_model.safetensors"))
    (token,) = [t for t in open_clip.get_tokenizer(f"local-dir:{base / 'clean'}")([BANANA])[0].tolist()
                if t not in (0, 49406, 49407)]
    weights["token_embedding.weight"][token] = float("nan")
    weights["visual.class_embedding"][0] = float("nan")
    save_file(weights, str(base / "broken" / "open_clip_model.safetensors"))
    return base / "clean", base / "broken"


def _resources(data: Path, corpus: dict, clip_dir: Path) -> dict:
    return {"data_root": DataRoot(path=str(data)), "clip": ClipModel(model=f"local-dir:{clip_dir}", device="cpu"),
            "source": DataSource(kind="files", pool_dir=str(corpus["pool"]), manifest=str(corpus["manifest"]),
                                 image_root=str(corpus["root"]))}


def _materialise(selection: list[str], resources: dict) -> dict[str, dict]:
    """Materialise `selection` for every shard on one temp instance: {shard: {"meta": {asset: metadata},
    "checks": [asset check evaluations]}}."""
    instance = dg.DagsterInstance.ephemeral()
    out = {}
    for key in shard_keys():
        result = dg.materialize(all_assets, selection=selection, partition_key=key, instance=instance,
                                resources=resources)
        assert result.success
        out[key] = {"meta": {a: result.asset_materializations_for_node(a)[0].metadata for a in selection},
                    "checks": result.get_asset_check_evaluations()}
    return out


@pytest.fixture(scope="module")
def mined_corpus(corpus, clip_dirs, tmp_path_factory):
    """source_data, then ingest and embeddings (clean CLIP) for every shard. Returns (data root, per-shard runs,
    resources)."""
    data = tmp_path_factory.mktemp("data")
    resources = _resources(data, corpus, clip_dirs[0])
    assert dg.materialize(all_assets, selection=["source_data"], instance=dg.DagsterInstance.ephemeral(),
                          resources=resources).success
    return data, _materialise(INGEST + EMBED, resources), resources


def _concat(folder: Path, pattern: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted(folder.glob(pattern))])


# ------------------------------------------------------------------------------------------------------- the tests


def test_every_bad_row_is_quarantined_with_its_reason(corpus, mined_corpus):
    data, _, _ = mined_corpus
    q = _concat(data / "ingest" / "quarantine", "examples-shard=*.parquet")
    assert dict(zip(q["row_index"].to_list(), q["reason"].to_list())) == corpus["examples_bad"]
    assert q["row_index"].n_unique() == q.height and q.schema == pl.Schema(QUARANTINE_SCHEMA)
    assert q.filter(pl.col("reason") == "path_outside_root")["detail"].str.contains("outside the image root").all()
    examples = _concat(data / "ingest" / "examples", "shard=*.parquet")
    assert sorted(examples["row_index"].to_list()) == corpus["examples_good"]
    assert sorted(examples["example_id"].to_list()) == sorted(corpus["examples_good_ids"])
    # Never read outside the root: every kept image path lies under it.
    assert all(Path(p).is_relative_to(corpus["root"].resolve()) for p in examples["image_path"])

    pq = _concat(data / "ingest" / "quarantine", "pool-shard=*.parquet")
    assert dict(zip(pq["id"].to_list(), pq["reason"].to_list())) == corpus["pool_bad"]
    pool = _concat(data / "ingest" / "pool", "shard=*.parquet")
    assert set(pool["image_id"].to_list()) == corpus["pool_good"]


def test_rows_in_equal_rows_out_plus_quarantined_in_the_metadata(corpus, mined_corpus):
    _, runs, _ = mined_corpus
    totals = {a: [0, 0, 0] for a in INGEST}
    for run in runs.values():
        for asset in INGEST:
            meta = run["meta"][asset]
            rows_in, out, quarantined = (meta[k].value for k in ("rows_in", "dagster/row_count", "rows_quarantined"))
            assert rows_in == out + quarantined, (asset, rows_in, out, quarantined)
            totals[asset] = [a + b for a, b in zip(totals[asset], (rows_in, out, quarantined))]
    # Blank lines are not rows; the README.txt of the pool is not an image.
    assert totals["preference_examples"] == [corpus["rows"], len(corpus["examples_good"]),
                                             len(corpus["examples_bad"])]
    assert totals["pool_images"] == [corpus["pool_files"], len(corpus["pool_good"]), len(corpus["pool_bad"])]


def test_good_rows_of_every_image_mode_are_embedded(corpus, mined_corpus):
    """Non-RGB, 16-bit, 1-bit and CMYK images are valid: each gets a finite unit-norm embedding, every check
    passes and nothing is quarantined by the embedding stage."""
    data, runs, _ = mined_corpus
    for run in runs.values():
        assert all(e.passed for e in run["checks"]), [(e.check_name, e.metadata) for e in run["checks"]
                                                      if not e.passed]
        for asset in EMBED:
            assert run["meta"][asset]["rows_quarantined"].value == 0
    pool = _concat(data / "embeddings" / "pool", "shard=*.parquet")
    assert set(pool["key"].to_list()) == corpus["pool_good"]
    examples = _concat(data / "ingest" / "examples", "shard=*.parquet")
    positives = _concat(data / "embeddings" / "positives", "shard=*.parquet")
    assert set(positives["key"].to_list()) == set(examples["image_sha256"].to_list())
    assert {"gray16.png", "cmyk.jpg", "bilevel.png", "palette.gif"} <= {Path(p).name for p in positives["path"]}
    prompts = _concat(data / "embeddings" / "prompts", "shard=*.parquet")
    assert any(len(p) > 7000 for p in prompts["prompt"])  # CLIP truncates; the prompt itself is kept whole
    emb = np.concatenate([t["embedding"].to_numpy() for t in (pool, positives, prompts)])
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert not _concat(data / "embeddings" / "quarantine", "*.parquet").height


def test_the_mining_chain_finishes_on_the_good_rows(corpus, mined_corpus):
    """Index, candidates, SAE, shards and manifest on top: the shards hold exactly the good examples, and the
    manifest counts the quarantined ones."""
    data, _, resources = mined_corpus
    instance = dg.DagsterInstance.ephemeral()
    for selection in (["pool_index"], ["candidates"], ["sae"], ["mining_recipe"], ["preference_shards"],
                      ["shards_manifest"]):
        for key in partition_keys(selection[0]):
            assert dg.materialize(all_assets, selection=selection, partition_key=key, instance=instance,
                                  resources=resources).success
    shards = load_shards(data / "shards")
    assert sorted(shards["example_id"].to_list()) == sorted(corpus["examples_good_ids"])
    assert (shards["n_negatives"] + shards["shortfall"] == 3).all()
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["examples_quarantined"] == len(corpus["examples_bad"])


def test_nan_embeddings_from_a_broken_checkpoint_are_quarantined(corpus, clip_dirs, mined_corpus, tmp_path):
    """The same ingest, embedded with the broken checkpoint: rows whose embedding is NaN leave the table for
    `embeddings/quarantine/` (reason non_finite_embedding), the rest are kept, and every check passes."""
    shutil.copytree(mined_corpus[0] / "ingest", tmp_path / "ingest")
    runs = _materialise(EMBED, _resources(tmp_path, corpus, clip_dirs[1]))
    for key, run in runs.items():
        assert all(e.passed for e in run["checks"]), [(e.check_name, e.metadata) for e in run["checks"]]
        for asset, table in EMBED_TABLES.items():
            meta = run["meta"][asset]
            q = pl.read_parquet(tmp_path / "embeddings" / "quarantine" / f"{table}-shard={key}.parquet")
            kept = pl.read_parquet(tmp_path / "embeddings" / table / f"shard={key}.parquet")
            assert q.schema == pl.Schema(QUARANTINE_SCHEMA) and set(q["reason"]) <= {NON_FINITE}
            assert (meta["rows_quarantined"].value, meta["dagster/row_count"].value) == (q.height, kept.height)
            assert meta["rows_in"].value == kept.height + q.height
            assert np.isfinite(kept["embedding"].to_numpy()).all()
            if table != "prompts":  # the class embedding is in every image's forward: all of them are NaN
                assert kept.height == 0 and (q["source"] == table).all()
    prompts = _concat(tmp_path / "embeddings" / "prompts", "shard=*.parquet")
    q = _concat(tmp_path / "embeddings" / "quarantine", "prompts-shard=*.parquet")
    assert sorted(json.loads(r)["prompt"] for r in q["raw"]) == [f"Is there a {BANANA} in the image?",
                                                                 f"Where is the {BANANA}?"]
    assert prompts.height > 0 and not prompts["prompt"].str.contains(BANANA).any()
    assert q["detail"].str.contains("NaN").all()
    pool_q = _concat(tmp_path / "embeddings" / "quarantine", "pool-shard=*.parquet")
    assert set(pool_q["id"].to_list()) == corpus["pool_good"]


def test_one_row_per_input_counts_quarantined_keys_once():
    table = pl.DataFrame({"key": ["a", "b"]})
    assert check_unique_keys(table, ["a", "b", "c"], ["c"]).passed
    assert not check_unique_keys(table, ["a", "b", "c"]).passed  # c is lost
    assert not check_unique_keys(table, ["a", "b"], ["b"]).passed  # b both kept and quarantined
    assert not check_unique_keys(table, ["a", "b"], ["z"]).passed  # z was never an input
