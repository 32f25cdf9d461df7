"""Read a preference manifest (JSON Lines, a JSON array, or Parquet) into rows, keeping bad rows as rows.

JSON Lines is read as bytes, one line at a time, so that a line that is not UTF-8 (`invalid_text`) or not JSON
(`malformed_row`) costs that line only. A file we cannot read at all (missing, unknown format, a broken JSON
array, unreadable Parquet, no rows) raises an exception that names the file: there is nothing to quarantine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class ManifestRow(NamedTuple):
    """One manifest row: parsed `data`, or the `problem` (reason, detail) that kept it from parsing."""

    row_index: int
    where: str
    data: dict[str, Any] | None
    problem: tuple[str, str] | None
    raw: str | None


class Manifest(NamedTuple):
    path: Path
    format: str
    rows: list[ManifestRow]
    columns: list[str]
    """Top-level columns, in schema order (Parquet) or order of first appearance (JSON)."""
    arrow: pa.Table | None
    """The Parquet table minus image-bytes columns, to carry extra columns with their own types."""
    notes: tuple[str, ...]


def read_manifest(path: str | Path, *, needed: set[str] = frozenset()) -> Manifest:
    """Read `path`. `needed` are the columns the column mapping reads (a Parquet column of image bytes among
    them is an error: such sets must be exported to image files first, see docs/ingest.md)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist; pass the path of a .jsonl, .json or .parquet file")
    if not path.is_file():
        raise ValueError(f"manifest {path} is not a file; pass the path of a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        manifest = _read_parquet(path, needed)
    elif suffix in JSON_SUFFIXES:
        manifest = _read_json(path)
    else:
        raise ValueError(
            f"manifest {path} has suffix {suffix!r}; supported: {list(JSON_SUFFIXES + PARQUET_SUFFIXES)} "
            "(compressed files: decompress them first)"
        )
    if not manifest.rows:
        raise ValueError(f"manifest {path} has no rows")
    return manifest


def _utf8_problem(data: Any) -> str | None:
    """Why `data` cannot be stored as UTF-8 text (lone surrogates from `\\ud800` escapes), or None."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate {exc.object[exc.start:exc.end]!r} (a broken \\uXXXX escape)"
    except (TypeError, ValueError):
        return None
    return None


def _parsed(row_index: int, where: str, data: Any, raw: str) -> ManifestRow:
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        return ManifestRow(row_index, where, None, ("malformed_row", f"{where} is a JSON {kind}, not an object"), raw)
    problem = _utf8_problem(data)
    if problem:
        detail = f"{where} {problem}; fix the text and re-export"
        return ManifestRow(row_index, where, None, ("invalid_text", detail), raw)
    return ManifestRow(row_index, where, data, None, None)


def _read_json(path: Path) -> Manifest:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark written by some editors
        data = data[3:]
    head = data.lstrip()[:1]
    if head == b"[":
        return _read_json_array(path, data)
    rows: list[ManifestRow] = []
    for line_no, line in enumerate(data.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue  # blank lines are not rows
        row_index = len(rows)
        where = f"line {line_no}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = line.decode("utf-8", "backslashreplace")
            byte = f"byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
            detail = f"{where} is not UTF-8 ({byte}); re-save the file as UTF-8"
            rows.append(ManifestRow(row_index, where, None, ("invalid_text", detail), raw))
            continue
        try:
            parsed = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = f"{where} is not valid JSON ({exc}); fix or delete the line"
            rows.append(ManifestRow(row_index, where, None, ("malformed_row", detail), text))
            continue
        rows.append(_parsed(row_index, where, parsed, text))
    if rows and all(r.data is None for r in rows) and head == b"{":
        try:
            whole = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            raise ValueError(
                f"manifest {path} is one JSON object, not JSON Lines or a JSON array of rows; write one object per line"
            )
    return Manifest(path, "jsonl", rows, _columns(rows), None, ())


def _read_json_array(path: Path, data: bytes) -> Manifest:
    try:
        items = json.loads(data)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"manifest {path} is not UTF-8 (at byte {exc.start}); re-save it as UTF-8, or convert it to JSON Lines "
            "so that bad rows are quarantined one by one"
        ) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(
            f"manifest {path} starts with '[' but is not a valid JSON array ({exc}); fix it, or convert it to JSON "
            "Lines so that bad rows are quarantined one by one"
        ) from None
    if not isinstance(items, list):
        raise ValueError(f"manifest {path} is not a JSON array of rows")
    rows = [_with_raw(_parsed(i, f"element {i}", item, None), item) for i, item in enumerate(items)]
    return Manifest(path, "json-array", rows, _columns(rows), None, ())


def _with_raw(row: ManifestRow, item: Any) -> ManifestRow:
    """Rows that failed to parse keep their source text for the quarantine's `raw` column."""
    return row._replace(raw=json.dumps(item, ensure_ascii=False, default=str)) if row.problem else row


def _columns(rows: list[ManifestRow]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        if r.data is not None:
            for key in r.data:
                seen.setdefault(key, None)
    return list(seen)


def _has_binary(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if getattr(pa.types, "is_binary_view", lambda _: False)(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _has_binary(t.value_type)
    if pa.types.is_struct(t):
        return any(_has_binary(t.field(i).type) for i in range(t.num_fields))
    return False


def _read_parquet(path: Path, needed: set[str]) -> Manifest:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise ValueError(f"manifest {path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    binary = [name for name in table.column_names if _has_binary(table.schema.field(name).type)]
    clash = sorted(set(binary) & set(needed))
    if clash:
        raise ValueError(
            f"manifest {path}: column(s) {clash} hold image bytes; ingest reads images from files. Export them "
            "to files and map `image` to a column of relative paths (docs/ingest.md, 'Images embedded in Parquet')"
        )
    notes = ()
    if binary:
        notes = (f"dropped column(s) {binary} of {path.name}: they hold bytes (embedded images), never carried",)
        table = table.drop_columns(binary)
    try:
        records = table.to_pylist()
    except Exception as exc:  # noqa: BLE001 - e.g. a string column holding invalid UTF-8
        raise ValueError(f"manifest {path}: cannot decode its rows ({type(exc).__name__}: {exc})") from None
    rows = [_with_raw(_parsed(i, f"row {i}", rec, None), rec) for i, rec in enumerate(records)]
    return Manifest(path, "parquet", rows, list(table.column_names), table, notes)


def extra_columns_frame(manifest: Manifest, columns: list[str], row_indices: list[int]) -> pl.DataFrame:
    """The extra (unmapped) columns of the rows `row_indices`, with one dtype per column for the whole manifest,
    so that every shard's table has the same schema."""
    if not columns:
        return pl.DataFrame()
    if manifest.arrow is not None:
        taken = manifest.arrow.select(columns).take(pa.array(row_indices, type=pa.int64()))
        return pl.DataFrame(pl.from_arrow(taken))
    parsed = {r.row_index: r.data for r in manifest.rows if r.data is not None}
    order = list(parsed)
    position = {ri: i for i, ri in enumerate(order)}
    picks = [position[ri] for ri in row_indices]
    out = {}
    for name in columns:
        series = _series(name, [parsed[ri].get(name) for ri in order])
        out[name] = series.gather(picks) if picks else series.clear()
    return pl.DataFrame(out)


def _series(name: str, values: list[Any]) -> pl.Series:
    """A typed column when polars can hold the values exactly; otherwise their JSON text (mixed types, structs
    whose keys differ between rows)."""
    if all(v is None for v in values):
        return pl.Series(name, values, dtype=pl.String)
    try:
        series = pl.Series(name, values, strict=True)
        if series.dtype != pl.Int128 and series.to_list() == values:
            return series
    except Exception:  # noqa: BLE001 - polars raises TypeError/OverflowError/ComputeError for mixed values
        pass
    return pl.Series(
        name, [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values], dtype=pl.String
    )
