"""Reference log-probs cached on disk: computed once per (reference weights, data), reused by every run and preset.

A Parquet file per fingerprint under <data root>/ref_cache/: rows (example_id, role, image_key, logp). The
fingerprint (`cache_key`) hashes every file of the reference model folder that can hold weights or change the
rows (`*.safetensors`, `*.bin`, `*.pt`, sharded index and config JSON, tokenizer files), the shards' checksums,
the row format, the precision the log-probs were computed under (autocast and weight dtype) and the batch layout
they were computed in, so a change of any of them starts a new cache instead of reusing stale numbers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm

from store.fingerprint import fingerprint, sha256_file
from store.parquet_io import write_parquet_atomic
from trainer.model_loading import response_logps_from_model

Key = tuple[str, str, str]


MODEL_FILE_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".jinja",
                                 ".tiktoken"})
"""Files of a model folder that the reference depends on: weights in any format (`model.safetensors`,
`pytorch_model-00001-of-00002.bin`, ...), their index JSON, configs, tokenizer and chat template."""

ROW_FORMAT = 2
"""Bumped when the meaning of a cached row changes (2: CHiP noise on pixel_values with VCD's schedule, log-probs
under the policy's autocast)."""


def model_fingerprint(model_dir: Path) -> str:
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES
                   and p.name != "base_report.json")
    return fingerprint([(str(p.relative_to(model_dir)), sha256_file(p)) for p in files])


def cache_key(model_fp: str, shard_sha256: list[str], *, max_length: int, seed: int, precision: str,
              dtype: str, layout: dict) -> str:
    """The fingerprint of a reference cache. `precision`: the autocast the policy runs under (`no`, `bf16`,
    `fp16`); `dtype`: the weights' dtype; `layout`: what decides which rows share a forward (batch size,
    processes, accumulation, the loss's row layout), since a row's log-prob depends on its batch to the last bit."""
    return fingerprint("ref", ROW_FORMAT, model_fp, list(shard_sha256), max_length, seed, precision, dtype,
                       sorted(layout.items()))


class RefCache:
    """In-memory dict backed by one Parquet file; `save` writes atomically."""

    def __init__(self, folder: Path, key: str):
        self.path = Path(folder) / f"{key}.parquet"
        self.values: dict[Key, float] = {}
        self.dirty = False
        if self.path.exists():
            df = pl.read_parquet(self.path)
            self.values = {(e, r, k): v for e, r, k, v in df.iter_rows()}

    def __len__(self) -> int:
        return len(self.values)

    def missing(self, keys: list[Key]) -> list[Key]:
        return [k for k in dict.fromkeys(keys) if k not in self.values]

    def lookup(self, keys: list[Key]) -> torch.Tensor:
        return torch.tensor([self.values[k] for k in keys], dtype=torch.float64)

    def add(self, keys: list[Key], logps: torch.Tensor) -> None:
        for k, v in zip(keys, logps.tolist()):
            self.values[k] = float(v)
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        e, r, k = zip(*self.values) if self.values else ((), (), ())
        df = pl.DataFrame({"example_id": list(e), "role": list(r), "image_key": list(k),
                           "logp": list(self.values.values())},
                          schema={"example_id": pl.String, "role": pl.String, "image_key": pl.String,
                                  "logp": pl.Float64})
        write_parquet_atomic(df, self.path, {"rows": len(df)})
        self.dirty = False


@torch.inference_mode()
def fill(cache: RefCache, rows, model, processor, *, max_length: int, batch_rows: int = 64,
         progress: bool = True, desc: str = "reference log-probs", autocast=None) -> int:
    """Compute the reference log-probs of the rows the cache lacks, `batch_rows` distinct rows per forward,
    under `autocast` (a context-manager factory: the policy's, so both sides share one precision). Returns how
    many were computed."""
    from trainer.rows import encode_rows

    todo = [i for i, k in enumerate(rows.keys) if k not in cache.values]
    todo = list({rows.keys[i]: i for i in todo}.values())  # one forward per distinct key
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(todo), batch_rows), desc=desc, unit="batch", disable=not progress or not todo):
        idx = todo[start:start + batch_rows]
        batch = encode_rows(processor, rows, max_length=max_length, index=idx).to(device)
        with (autocast() if autocast else contextlib.nullcontext()):
            cache.add([rows.keys[i] for i in idx], response_logps_from_model(model, batch).double().cpu())
    return len(todo)


@torch.inference_mode()
def fill_batch(cache: RefCache, rows, model, processor, *, max_length: int, autocast=None) -> int:
    """The reference log-probs of one training micro-batch, forwarded exactly as the loop will forward it (same
    rows, order, padding and precision), for the keys the cache lacks: at step 0 the policy then gets bit for
    bit the cached value. Returns how many keys were added."""
    from trainer.rows import encode_rows

    new = {k: i for i, k in enumerate(rows.keys) if k not in cache.values}
    if not new:
        return 0
    device = next(model.parameters()).device
    batch = encode_rows(processor, rows, max_length=max_length).to(device)
    with (autocast() if autocast else contextlib.nullcontext()):
        values = response_logps_from_model(model, batch).double().cpu()
    cache.add(list(new), values[list(new.values())])
    return len(new)
