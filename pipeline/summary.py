"""`python -m pipeline.summary`: what the pipeline has produced under the data root, shard by shard."""

from __future__ import annotations

import argparse
import sys

import polars as pl

from store.parquet_io import read_metadata
from store.paths import data_root


def summarise(root) -> pl.DataFrame:
    rows = []
    for stage in ("pool", "examples"):
        for f in sorted((root / "ingest" / stage).glob("shard=*.parquet")):
            shard = f.stem.split("=")[1]
            q = root / "ingest" / "quarantine" / f"{stage}-shard={shard}.parquet"
            rows.append({"table": f"ingest/{stage}", "shard": shard,
                         "rows_in": int(read_metadata(f).get("rows_in", -1)),
                         "rows_out": pl.scan_parquet(f).select(pl.len()).collect().item(),
                         "quarantined": pl.scan_parquet(q).select(pl.len()).collect().item() if q.exists() else 0})
    for stage in ("pool", "positives", "prompts"):
        for f in sorted((root / "embeddings" / stage).glob("shard=*.parquet")):
            shard = f.stem.split("=")[1]
            q = root / "embeddings" / "quarantine" / f"{stage}-shard={shard}.parquet"
            rows.append({"table": f"embeddings/{stage}", "shard": shard, "rows_in": None,
                         "rows_out": pl.scan_parquet(f).select(pl.len()).collect().item(),
                         "quarantined": pl.scan_parquet(q).select(pl.len()).collect().item() if q.exists() else None})
    for f in sorted((root / "shards").glob("shard=*.parquet")):
        lf = pl.scan_parquet(f)
        rows.append({"table": "shards", "shard": f.stem.split("=")[1], "rows_in": None,
                     "rows_out": lf.select(pl.len()).collect().item(),
                     "quarantined": None})
    return pl.DataFrame(rows, schema={"table": pl.String, "shard": pl.String, "rows_in": pl.Int64,
                                      "rows_out": pl.Int64, "quarantined": pl.Int64})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=None, help="data root (default: $MISP_DATA_ROOT or ./data)")
    args = parser.parse_args(argv)
    root = data_root(args.root)
    table = summarise(root)
    if table.height == 0:
        print(f"nothing under {root} yet: run `make embed`")
        return 1
    with pl.Config(tbl_rows=100, tbl_hide_dataframe_shape=True):
        print(table)
        # A column that no row of a table fills (embeddings have no rows_in) stays empty, not 0.
        print(table.group_by("table", maintain_order=True).agg(
            pl.when(pl.col(c).is_null().all()).then(None).otherwise(pl.col(c).sum()).alias(c)
            for c in ("rows_in", "rows_out", "quarantined")))
    print(f"data root: {root}\n  ingest:     {root / 'ingest'} (quarantine/ holds every rejected row and why)\n"
          f"  embeddings: {root / 'embeddings'}")
    if (root / "shards").exists():
        print(f"  shards:     {root / 'shards'} (manifest.json, contact_sheet-shard=*.png)\n"
              f"open them in Polars: pl.read_parquet('{root}/shards/*.parquet')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
