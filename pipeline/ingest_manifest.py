"""Read a preference manifest (JSON Lines, a JSON array, or Parquet) into rows, keeping bad rows as rows.

JSON Lines is read as bytes, one line at a time, so that a line that is not UTF-8 (`invalid_text`) or not JSON
(`malformed_row`) costs that line only. A file we cannot read at all (missing, unknown format, a broken JSON
array, unreadable Parquet, no rows) raises an exception that names the file: there is nothing to quarantine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from store.parquet_io import write_bytes_atomic
from store.safe_files import NotRegularFileError, bounded_reader, open_regular

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


def read_manifest(path: str | Path, *, needed: set[str] = frozenset(), image_bytes: str | None = None,
                  image_store: Path | None = None, max_row_bytes: int = 64 * 1024 * 1024,
                  max_image_bytes: int = 200 * 1024 * 1024) -> Manifest:
    """Read `path`. `needed` are the columns the column mapping reads (a Parquet column of bytes among them is an
    error, except `image_bytes`: the column holding Hugging Face `Image` structs {bytes, path}, whose bytes are
    written once into the content-addressed folder `image_store` and replaced by the stored file's path).

    The file must be a regular file (a FIFO or device raises `NotRegularFileError` at once, never blocks). JSON
    Lines are read one line at a time (a line over `max_row_bytes` is a `malformed_row`, skipped without holding
    it in memory); Parquet is read one row group at a time, so image bytes are never all in memory."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"manifest {path} does not exist; pass the path of a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in PARQUET_SUFFIXES + JSON_SUFFIXES:
        raise ValueError(
            f"manifest {path} has suffix {suffix!r}; supported: {list(JSON_SUFFIXES + PARQUET_SUFFIXES)} "
            "(compressed files: decompress them first)"
        )
    try:
        fh = open_regular(path, what="manifest")
    except NotRegularFileError as exc:
        raise NotRegularFileError(f"{exc}; pass the path of a .jsonl, .json or .parquet file") from None
    with fh:
        if suffix in PARQUET_SUFFIXES:
            manifest = _read_parquet(path, fh, needed, image_bytes, image_store, max_image_bytes)
        else:
            manifest = _read_json(path, fh, max_row_bytes)
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


def _lines(reader: BinaryIO, max_row_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line without its newline or None when longer than `max_row_bytes`, its length). Lines are
    read in blocks of at most 1 MiB; an over-long line is dropped block by block, so memory stays bounded by
    `max_row_bytes` whatever the file holds."""
    line_no = 0
    block = min(max_row_bytes + 1, 1 << 20)
    while True:
        chunk = reader.readline(block)
        if not chunk:
            return
        line_no += 1
        parts, length = [chunk], len(chunk)
        while not chunk.endswith(b"\n") and length <= max_row_bytes:
            chunk = reader.readline(block)
            if not chunk:
                break
            parts.append(chunk)
            length += len(chunk)
        if length <= max_row_bytes or (length == max_row_bytes + 1 and chunk.endswith(b"\n")):
            yield line_no, b"".join(parts).rstrip(b"\n"), length
            continue
        parts.clear()  # over the limit: skip to the end of the line without keeping it
        while chunk and not chunk.endswith(b"\n"):
            chunk = reader.readline(1 << 20)
            length += len(chunk)
        yield line_no, None, length


def _read_json(path: Path, fh: BinaryIO, max_row_bytes: int) -> Manifest:
    reader = bounded_reader(fh)
    head = reader.peek(1 << 16)[:1 << 16]
    if head.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark written by some editors
        reader.read(3)
        head = head[3:]
    first = head.lstrip()[:1]
    if first == b"[":
        try:  # a JSON array is one value: it is parsed whole (docs/ingest.md)
            return _read_json_array(path, reader.read())
        except MemoryError:
            raise ValueError(f"manifest {path} is a JSON array too large to parse in memory; convert it to JSON "
                             "Lines (one object per line), which is read line by line") from None
    rows: list[ManifestRow] = []
    for line_no, line, length in _lines(reader, max_row_bytes):
        where = f"line {line_no}"
        if line is None:
            detail = (f"{where} is {length:,} bytes, over max_row_bytes={max_row_bytes:,}; it was skipped unread. "
                      "Split or shorten the row, or raise IngestLimits.max_row_bytes")
            rows.append(ManifestRow(len(rows), where, None, ("malformed_row", detail), f"<{length} bytes>"))
            continue
        line = line.rstrip(b"\r")
        if not line.strip():
            continue  # blank lines are not rows
        row_index = len(rows)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = line[:4000].decode("utf-8", "backslashreplace")
            byte = f"byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
            detail = f"{where} is not UTF-8 ({byte}); re-save the file as UTF-8"
            rows.append(ManifestRow(row_index, where, None, ("invalid_text", detail), raw))
            continue
        try:
            parsed = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = f"{where} is not valid JSON ({exc}); fix or delete the line"
            rows.append(ManifestRow(row_index, where, None, ("malformed_row", detail), text[:4000]))
            continue
        rows.append(_parsed(row_index, where, parsed, text[:4000]))
    if rows and all(r.data is None for r in rows) and first == b"{":
        # No line parses: perhaps one pretty-printed JSON object (read whole only in this failure case).
        try:
            fh.seek(0)
            whole = json.loads(fh.read(os.fstat(fh.fileno()).st_size).removeprefix(b"\xef\xbb\xbf"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError, MemoryError):
            whole = None
        if isinstance(whole, dict):
            raise ValueError(
                f"manifest {path} is one JSON object, not JSON Lines or a JSON array of rows; write one object per line"
            )
    return Manifest(path, "jsonl", rows, _columns(rows), None, ())


def _read_json_array(path: Path, data: bytes) -> Manifest:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
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


IMAGE_SUFFIXES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
                  (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def _suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in IMAGE_SUFFIXES if data.startswith(magic)), ".img")


class StoredImage(NamedTuple):
    """An image that came as bytes in the manifest: the file ingest wrote it to (inside `root`), or why not."""

    path: str | None
    root: str
    name: str | None
    """The struct's own `path` (the file name it had), when given."""
    problem: tuple[str, str] | None


def store_image_bytes(value: Any, store: Path, max_bytes: int) -> StoredImage | None:
    """Write the bytes of a Hugging Face `Image` value ({bytes, path}, or raw bytes) to
    `<store>/<sha256[:2]>/<sha256><ext>` unless that file exists (content-addressed: each distinct image is
    written once, and parallel shards write the same file atomically). None when the value holds no bytes."""
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    else:
        data, name = value, None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None
    data = bytes(data)
    root = str(store)
    if not data:
        return StoredImage(None, root, name, ("empty_file", "the image bytes are empty (0 bytes); re-export the row"))
    if len(data) > max_bytes:
        return StoredImage(None, root, name, ("image_too_large", f"the image bytes are {len(data):,} bytes > "
                                               f"max_file_bytes={max_bytes:,}; raise IngestLimits.max_file_bytes"))
    sha = hashlib.sha256(data).hexdigest()
    target = store / sha[:2] / f"{sha}{_suffix(data)}"
    if not target.is_file() or target.stat().st_size != len(data):
        write_bytes_atomic(data, target)
    return StoredImage(str(target), root, name, None)


def _read_parquet(path: Path, fh: BinaryIO, needed: set[str], image_bytes: str | None, image_store: Path | None,
                  max_image_bytes: int) -> Manifest:
    try:
        pf = pq.ParquetFile(fh)
        schema = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise ValueError(f"manifest {path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    binary = [name for name in schema.names if _has_binary(schema.field(name).type)]
    embedded = image_bytes if image_bytes in binary else None
    clash = sorted((set(binary) & set(needed)) - {embedded})
    if clash:
        raise ValueError(
            f"manifest {path}: column(s) {clash} hold bytes (image bytes?), not image paths; map the image-bytes "
            "column as `image_bytes` (the rlaif_v and rlhf_v presets do) or map `image` to a column of relative paths"
        )
    if embedded and image_store is None:
        raise ValueError(f"manifest {path}: column {embedded!r} holds image bytes; pass image_store= (a folder "
                         "under the data root) so that ingest can write them to files")
    dropped = [b for b in binary if b != embedded]
    notes: tuple[str, ...] = ()
    if dropped:
        notes = (f"dropped column(s) {dropped} of {path.name}: they hold bytes, never carried",)
    if embedded:
        notes += (f"images of column {embedded!r} written once each to {image_store} (content-addressed)",)
    keep = [n for n in schema.names if n not in binary]
    rows: list[ManifestRow] = []
    tables = []
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=keep + ([embedded] if embedded else [])):
            records = batch.select(keep).to_pylist() if keep else [{} for _ in range(batch.num_rows)]
            if embedded:
                for rec, value in zip(records, batch.column(embedded).to_pylist()):
                    stored = store_image_bytes(value, image_store, max_image_bytes) if value is not None else None
                    if stored is not None:
                        rec[embedded] = stored
            for rec in records:
                i = len(rows)
                rows.append(_with_raw(_parsed(i, f"row {i}", rec, None), rec))
            tables.append(pa.Table.from_batches([batch.select(keep)]) if keep else None)
    except Exception as exc:  # noqa: BLE001 - e.g. a string column holding invalid UTF-8, a corrupt row group
        raise ValueError(f"manifest {path}: cannot decode its rows ({type(exc).__name__}: {exc})") from None
    table = pa.concat_tables([t for t in tables if t is not None]) if keep and tables else schema.empty_table()
    if keep:
        table = table.select(keep)
    columns = keep + ([embedded] if embedded else [])
    return Manifest(path, "parquet", rows, columns, table, notes)


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
