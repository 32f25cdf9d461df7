"""Limits, reasons, table schemas and the result type shared by pool and example ingest (docs/data.md)."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from typing import Any, NamedTuple

import polars as pl

from store.image_policy import IngestLimits  # noqa: F401 - ingest's config, defined with the opener that enforces it

# Every reason a row can be quarantined for, in the order the checks run. docs/data.md lists the same set.
REASONS: tuple[str, ...] = (
    "malformed_row",
    "invalid_text",
    "missing_field",
    "duplicate_id",
    "empty_prompt",
    "empty_response",
    "text_too_long",
    "path_outside_root",
    "missing_file",
    "empty_file",
    "image_too_large",
    "image_too_small",
    "truncated_image",
    "undecodable_image",
    "non_finite_embedding",  # set by the embedding stage, not by ingest
)

RAW_MAX_CHARS = 2000

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String,
    "row_index": pl.Int64,
    "id": pl.String,
    "reason": pl.String,
    "detail": pl.String,
    "raw": pl.String,
}

POOL_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "path": pl.String,
    "sha256": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "shard": pl.Int32,
}

# Manifest extra columns follow these; an extra column whose name collides with one of them is renamed `src_<name>`.
EXAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,
    "prompt": pl.String,
    "chosen": pl.String,
    "rejected": pl.String,
    "image_id": pl.String,
    "image_path": pl.String,
    "image_sha256": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "shard": pl.Int32,
    "row_index": pl.Int64,
}


class IngestResult(NamedTuple):
    """Validated rows of one shard, its quarantine, and how many input rows the shard was given."""

    rows: pl.DataFrame
    quarantine: pl.DataFrame
    rows_in: int
    notes: tuple[str, ...] = ()
    """Things the run did that a user should know (ids derived, columns renamed or dropped)."""
    images: pl.DataFrame | None = None
    """The image ledger of the shard (`store.safe_image.LEDGER_SCHEMA`): every image file checked, with its
    stamp and sha256, so that readers can verify what they open and reruns can tell whether images changed."""

    def counts(self) -> dict[str, int]:
        """Quarantined rows by reason, most frequent first."""
        if self.quarantine.height == 0:
            return {}
        return dict(Counter(self.quarantine["reason"].to_list()).most_common())

    def summary(self) -> dict[str, Any]:
        """Counts for logs and Dagster metadata: rows in, out, quarantined, and quarantined by reason."""
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows.height,
            "rows_quarantined": self.quarantine.height,
            "by_reason": self.counts(),
        }

    def check(self) -> IngestResult:
        """Raise if a row was lost or duplicated: rows in must equal rows out plus rows quarantined."""
        if self.rows_in != self.rows.height + self.quarantine.height:
            raise AssertionError(
                f"ingest lost rows: {self.rows_in} in != {self.rows.height} out + {self.quarantine.height} quarantined"
                " (a bug in pipeline/ingest.py; please report it with the input)"
            )
        return self


class Quarantined(NamedTuple):
    """One quarantine row before it becomes a DataFrame row."""

    row_index: int
    id: str | None
    reason: str
    detail: str
    raw: str

    def as_row(self, source: str) -> dict[str, Any]:
        assert self.reason in REASONS, self.reason
        return {"source": source, **self._asdict()}


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return str(value)


def short_text(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters for a detail or an id column (a 1,000,007-character id stays readable)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"


def raw_json(value: Any) -> str:
    """`value` as JSON for the quarantine's `raw` column (bytes summarised, truncated to 2,000 chars)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=_json_default)
        except (TypeError, ValueError):
            text = repr(value)
    # Lone surrogates (from JSON `\ud800` escapes) cannot be written to Parquet: escape them.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= RAW_MAX_CHARS else text[: RAW_MAX_CHARS - 3] + "..."


def quarantine_frame(items: list[Quarantined], source: str) -> pl.DataFrame:
    """The quarantine table of `items`, sorted by row, with the exact schema of docs/data.md."""
    rows = [q.as_row(source) for q in sorted(items, key=lambda q: q.row_index)]
    return pl.DataFrame(rows, schema=QUARANTINE_SCHEMA)


# Characters that render as nothing: a text made only of these (and whitespace) is empty. Unicode categories
# Cc/Cf (controls, zero-width space/joiners, BOM, bidi marks), Zs/Zl/Zp (separators), Mn/Me (combining marks with
# nothing to combine with), plus the "filler" letters that fonts draw blank.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5")


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: empty, whitespace, or only invisible characters (zero-width spaces...)."""
    return all(ch.isspace() or ch in _BLANK_LETTERS or unicodedata.category(ch) in _INVISIBLE_CATEGORIES
               for ch in text)
