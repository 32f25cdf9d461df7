"""`python -m pipeline.summary`: what the pipeline has produced under the data root, shard by shard."""

from __future__ import annotations

import argparse
import sys

import polars as pl

from pipeline.parquet_io import read_metadata
from pipeline.paths import data_root


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
            rows.append({"table": f"embeddings/{stage}", "shard": f.stem.split("=")[1], "rows_in": None,
                         "rows_out": pl.scan_parquet(f).select(pl.len()).collect().item(), "quarantined": None})
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
        print(table.group_by("table", maintain_order=True).agg(pl.col("rows_in", "rows_out", "quarantined").sum()))
    print(f"data root: {root}\n  ingest:     {root / 'ingest'}\n  embeddings: {root / 'embeddings'}\n"
          f"open one in Polars: pl.read_parquet('{root}/embeddings/pool/shard=000.parquet')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
