"""RLAIF-V as distributed (issue 12): the image is a Hugging Face `Image` struct {bytes, path} inside the Parquet
file. Ingest writes each distinct image once into a content-addressed folder under the data root and checks it
like any file, so the raw file ingests with no manual export. Column names follow the dataset card of
openbmb/RLAIF-V-Dataset: ds_name, image, question, chosen, rejected, origin_dataset, origin_split, idx (string),
image_path."""

from __future__ import annotations

import hashlib
import io
import os

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from assets.definitions import all_assets
from assets.resources import ClipModel, DataRoot, DataSource
from pipeline.sharding import shard_keys

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_raw_rlaif_v_parquet_ingests_end_to_end(tmp_path):
    red, green = _jpeg((220, 20, 20)), _jpeg((20, 220, 20))
    images = [red, green, red, b"\xff\xd8 not really a jpeg", b""]  # row 2 reuses row 0's image
    n = len(images)
    table = pa.table({
        "ds_name": ["RLAIF-V"] * n,
        "image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)], IMAGE),
        "question": [f"What colour is image {i}?" for i in range(n)],
        "chosen": [f"chosen {i}" for i in range(n)],
        "rejected": [f"rejected {i}" for i in range(n)],
        "origin_dataset": ["VQAv2"] * n,
        "origin_split": ['{"model": "OmniLMM-12B"}'] * n,
        "idx": [f"OmniLMM-12B_{i}" for i in range(n)],
        "image_path": [f"VQAv2/images/{i}.jpg" for i in range(n)],
    })
    raw = tmp_path / "raw" / "RLAIF-V-Dataset_000.parquet"
    raw.parent.mkdir()
    pq.write_table(table, raw, row_group_size=2)  # several row groups, as the real files have
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (0, 0, 80 * i)).save(pool / f"{i}.png")
    data = tmp_path / "data"
    res = {"data_root": DataRoot(path=str(data)), "clip": ClipModel(),
           "source": DataSource(kind="files", pool_dir=str(pool), manifest=str(raw), column_mapping="rlaif_v")}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(all_assets, selection=["source_data"], instance=instance, resources=res).success

    def ingest_all():
        for key in shard_keys():
            assert dg.materialize(all_assets, selection=["preference_examples"], partition_key=key,
                                  instance=instance, resources=res).success
        ingest = data / "ingest"
        return (pl.concat([pl.read_parquet(f) for f in sorted((ingest / "examples").glob("shard=*.parquet"))]),
                pl.concat([pl.read_parquet(f) for f in sorted((ingest / "quarantine").glob("examples-*.parquet"))]))

    rows, quarantine = ingest_all()
    assert rows.height + quarantine.height == n
    assert sorted(rows["example_id"]) == ["OmniLMM-12B_0", "OmniLMM-12B_1", "OmniLMM-12B_2"]
    assert dict(zip(quarantine["id"], quarantine["reason"])) == {"OmniLMM-12B_3": "undecodable_image",
                                                                 "OmniLMM-12B_4": "empty_file"}
    by_id = {r["example_id"]: r for r in rows.iter_rows(named=True)}
    for i, data_bytes in ((0, red), (1, green), (2, red)):
        r = by_id[f"OmniLMM-12B_{i}"]
        sha = hashlib.sha256(data_bytes).hexdigest()
        assert r["image_sha256"] == sha and r["image_path"] == str(data / "ingest" / "images" / sha[:2] / f"{sha}.jpg")
        assert r["image_id"] == f"VQAv2/images/{i}.jpg" and r["prompt"] == f"What colour is image {i}?"
        assert r["origin_dataset"] == "VQAv2" and r["ds_name"] == "RLAIF-V"  # extra columns carried
    store = sorted(p for p in (data / "ingest" / "images").rglob("*") if p.is_file())
    assert len(store) == 3  # red once (two rows share it), green, and the undecodable bytes; empty ones never
    stamps = {p: os.stat(p).st_mtime_ns for p in store}

    # A rerun (for instance after the CLIP changed) writes nothing again and keeps the same tables.
    rows_again, _ = ingest_all()
    assert rows_again.sort("example_id").equals(rows.sort("example_id"))
    assert {p: os.stat(p).st_mtime_ns for p in store} == stamps
