"""Turn tables and counts into Dagster metadata a user wants to look at."""


from typing import Mapping

import dagster as dg
import polars as pl


def _cell(value: object, width: int = 60) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(df: pl.DataFrame, n: int = 5, drop: tuple[str, ...] = ("embedding",)) -> dg.MetadataValue:
    """The first `n` rows as a markdown table (long cells shortened, vectors left out)."""
    cols = [c for c in df.columns if c not in drop]
    if not cols or df.height == 0:
        return dg.MetadataValue.md("_(empty)_")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.select(cols).head(n).iter_rows():
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def counts_table(counts: Mapping[str, int], key: str = "reason") -> dg.MetadataValue:
    if not counts:
        return dg.MetadataValue.md("_none_")
    lines = [f"| {key} | rows |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    return dg.MetadataValue.md("\n".join(lines))


def table_schema(df: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in df.schema.items()])
