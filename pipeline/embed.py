"""Embedding tables of one shard: pool images, unique positive images, unique prompts.

Each table has a `key` column (one row per unique input) and an `embedding` column of type
`Array(Float32, D)`, L2-normalised. See docs/data.md.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.clip_encoder import ClipEncoder
from pipeline.fingerprint import text_id


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


def pool_embedding_table(encoder: ClipEncoder, pool: pl.DataFrame, *, batch_size: int = 256,
                         progress: bool = True) -> pl.DataFrame:
    """One row per valid pool image (ingest already guarantees unique `image_id`)."""
    table = pool.select(pl.col("image_id").alias("key"), "image_id", "path", "sha256")
    matrix = encoder.embed_images(table["path"].to_list(), batch_size=batch_size, progress=progress,
                                  desc="embed pool")
    return _with_embeddings(table, matrix, encoder.dim)


def positive_embedding_table(encoder: ClipEncoder, examples: pl.DataFrame, *, batch_size: int = 256,
                             progress: bool = True) -> pl.DataFrame:
    """One row per unique positive image of the shard, keyed by content hash: several prompts of one
    image, or one image under two names, are embedded once."""
    table = (examples.select(pl.col("image_sha256").alias("key"), "image_id", pl.col("image_path").alias("path"))
             .unique(subset="key", keep="first", maintain_order=True))
    matrix = encoder.embed_images(table["path"].to_list(), batch_size=batch_size, progress=progress,
                                  desc="embed positives")
    return _with_embeddings(table, matrix, encoder.dim)


def prompt_embedding_table(encoder: ClipEncoder, examples: pl.DataFrame, *, batch_size: int = 512,
                           progress: bool = True) -> pl.DataFrame:
    """One row per unique prompt text of the shard, keyed by `prompt_id` = sha1 of the text."""
    prompts = examples.select("prompt").unique(keep="first", maintain_order=True)["prompt"].to_list()
    table = pl.DataFrame({"key": [text_id(p) for p in prompts], "prompt": prompts},
                         schema={"key": pl.String, "prompt": pl.String})
    matrix = encoder.embed_texts(prompts, batch_size=batch_size, progress=progress, desc="embed prompts")
    return _with_embeddings(table, matrix, encoder.dim)
