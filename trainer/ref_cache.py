"""Reference log-probs cached on disk: computed once per (reference weights, data), reused by every run and preset.

A Parquet file per fingerprint under <data root>/ref_cache/: rows (example_id, role, image_key, logp). The
fingerprint hashes the reference model's files, the shards' checksums and the row format (max_length, the
prompt template), so a change of any of them starts a new cache instead of reusing stale numbers."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm

from pipeline.fingerprint import fingerprint, sha256_file
from pipeline.parquet_io import write_parquet_atomic
from trainer.model_loading import encode_batch, response_logps_from_model

Key = tuple[str, str, str]


def model_fingerprint(model_dir: Path) -> str:
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix in
                   {".safetensors", ".json", ".model", ".txt", ".jinja"} and p.name != "base_report.json")
    return fingerprint([(str(p.relative_to(model_dir)), sha256_file(p)) for p in files])


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
         progress: bool = True, desc: str = "reference log-probs") -> int:
    """Compute the reference log-probs of the rows the cache lacks. Returns how many were computed."""
    todo = [i for i, k in enumerate(rows.keys) if k not in cache.values]
    todo = list({rows.keys[i]: i for i in todo}.values())  # one forward per distinct key
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(todo), batch_rows), desc=desc, unit="batch", disable=not progress or not todo):
        idx = todo[start:start + batch_rows]
        batch = encode_batch(processor, [rows.images[i] for i in idx], [rows.prompts[i] for i in idx],
                             [rows.responses[i] for i in idx], max_length=max_length,
                             example_ids=[rows.example_ids[i] for i in idx]).to(device)
        cache.add([rows.keys[i] for i in idx], response_logps_from_model(model, batch).double().cpu())
    return len(todo)
