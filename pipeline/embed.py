"""Embedding tables of one shard: pool images, unique positive images, unique prompts.

Each table has a `key` column (one row per unique input) and an `embedding` column of type
`Array(Float32, D)`, L2-normalised. See docs/data.md. A row whose embedding is not finite (a broken
checkpoint) is moved to a quarantine table with the ingest schema (`quarantine_non_finite`).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.clip_encoder import ClipEncoder
from store.fingerprint import text_id
from pipeline.ingest_schema import QUARANTINE_SCHEMA, raw_json
from store.safe_image import ImageOpener

NON_FINITE = "non_finite_embedding"
"""Quarantine reason of a row whose embedding holds NaN or inf."""


def embedding_series(matrix: np.ndarray) -> pl.Series:
    """A fixed-size list column: Polars reads it back as a 2-D array with `.to_numpy()`."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pl.Series("embedding", matrix, dtype=pl.Array(pl.Float32, matrix.shape[1]))


def embedding_matrix(df: pl.DataFrame, column: str = "embedding") -> np.ndarray:
    """(N, D) float32 from a fixed-size list column (an empty table gives shape (0, 0))."""
    if df.height == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.ascontiguousarray(df[column].to_numpy(), dtype=np.float32)


def _with_embeddings(table: pl.DataFrame, matrix: np.ndarray, dim: int) -> pl.DataFrame:
    if table.height == 0:
        return table.with_columns(pl.Series("embedding", [], dtype=pl.Array(pl.Float32, dim)))
    return table.with_columns(embedding_series(matrix))


def _loader(opener: ImageOpener | None, paths: list[str], shas: list[str]):
    """path -> upright image, each checked against the sha256 ingest recorded (`store.safe_image`)."""
    opener = opener or ImageOpener({})
    expected = dict(zip(paths, shas))
    return lambda path: opener(str(path), expected.get(str(path)))


def pool_embedding_table(encoder: ClipEncoder, pool: pl.DataFrame, *, batch_size: int = 256,
                         progress: bool = True, opener: ImageOpener | None = None) -> pl.DataFrame:
    """One row per valid pool image (ingest already guarantees unique `image_id`). Images are opened through
    the safe opener: a file changed since ingest raises `ImageChangedError` naming it."""
    table = pool.select(pl.col("image_id").alias("key"), "image_id", "path", "sha256")
    paths = table["path"].to_list()
    matrix = encoder.embed_images(paths, batch_size=batch_size, progress=progress, desc="embed pool",
                                  open_image=_loader(opener, paths, table["sha256"].to_list()))
    return _with_embeddings(table, matrix, encoder.dim)


def positive_embedding_table(encoder: ClipEncoder, examples: pl.DataFrame, *, batch_size: int = 256,
                             progress: bool = True, opener: ImageOpener | None = None) -> pl.DataFrame:
    """One row per unique positive image of the shard, keyed by content hash: several prompts of one
    image, or one image under two names, are embedded once."""
    table = (examples.select(pl.col("image_sha256").alias("key"), "image_id", pl.col("image_path").alias("path"))
             .unique(subset="key", keep="first", maintain_order=True))
    paths = table["path"].to_list()
    matrix = encoder.embed_images(paths, batch_size=batch_size, progress=progress, desc="embed positives",
                                  open_image=_loader(opener, paths, table["key"].to_list()))
    return _with_embeddings(table, matrix, encoder.dim)


def prompt_embedding_table(encoder: ClipEncoder, examples: pl.DataFrame, *, batch_size: int = 512,
                           progress: bool = True, opener: ImageOpener | None = None) -> pl.DataFrame:
    """One row per unique prompt text of the shard, keyed by `prompt_id` = sha1 of the text."""
    prompts = examples.select("prompt").unique(keep="first", maintain_order=True)["prompt"].to_list()
    table = pl.DataFrame({"key": [text_id(p) for p in prompts], "prompt": prompts},
                         schema={"key": pl.String, "prompt": pl.String})
    matrix = encoder.embed_texts(prompts, batch_size=batch_size, progress=progress, desc="embed prompts")
    return _with_embeddings(table, matrix, encoder.dim)


def quarantine_non_finite(table: pl.DataFrame, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows whose embedding is finite, quarantine rows for the others).

    A checkpoint with broken weights (or one that overflows in fp16) gives NaN or inf for some inputs; one such
    vector poisons every distance, index and SAE batch computed from it, so the row leaves the table here with
    reason `non_finite_embedding`. The quarantine has the ingest schema (docs/data.md): `source` is the table
    (`pool`, `positives`, `prompts`), `row_index` the row's position among the stage's unique inputs, `id` its key.
    """
    m = embedding_matrix(table)
    finite = np.isfinite(m).all(axis=1) if table.height else np.zeros(0, dtype=bool)
    bad = table.with_row_index("row_index").filter(pl.Series(~finite))
    n_nan, n_inf = np.isnan(m[~finite]).sum(axis=1), np.isinf(m[~finite]).sum(axis=1)
    details, raws = [], []
    for i, row in enumerate(bad.drop("embedding", "row_index").iter_rows(named=True)):
        what = row.get("path") or repr(row.get("prompt", row["key"]))[:200]
        details.append(f"the CLIP embedding of {what} has {n_nan[i]} NaN and {n_inf[i]} inf of {m.shape[1]} values: "
                       "the checkpoint gives non-finite outputs for this input (broken weights, or fp16 overflow); "
                       "check the CLIP weights and precision, then re-materialise")
        raws.append(raw_json(row))
    quarantine = pl.DataFrame({"source": [source] * bad.height, "row_index": bad["row_index"].cast(pl.Int64),
                               "id": bad["key"], "reason": [NON_FINITE] * bad.height, "detail": details,
                               "raw": raws}, schema=QUARANTINE_SCHEMA)
    return table.filter(pl.Series(finite, dtype=pl.Boolean)), quarantine
