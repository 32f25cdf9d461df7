"""Read a preference manifest (JSON Lines, a JSON array, or Parquet) block by block, keeping bad rows as rows.

JSON Lines is read as bytes, one line at a time, so that a line that is not UTF-8 (`invalid_text`) or not JSON
(`malformed_row`) costs that line only. Rows come in blocks (`ManifestReader.batches`) that the caller filters
(ingest keeps the rows of one shard), so memory is bounded by a block plus what the caller keeps, never by the
file. A file we cannot read at all (missing, unknown format, a broken JSON array, unreadable Parquet, no rows)
raises an exception that names the file: there is nothing to quarantine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from store.parquet_io import write_bytes_atomic
from store.safe_files import NotRegularFileError, bounded_reader, open_regular

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
BATCH_ROWS = 1024
"""Rows per block: a Parquet read batch, or this many JSON lines."""


class ManifestRow(NamedTuple):
    """One manifest row: parsed `data`, or the `problem` (reason, detail) that kept it from parsing."""

    row_index: int
    where: str
    data: dict[str, Any] | None
    problem: tuple[str, str] | None
    raw: str | None


class ManifestBatch(NamedTuple):
    """A block of consecutive rows."""

    rows: list[ManifestRow]
    arrow: pa.RecordBatch | None
    """Parquet: the block's columns minus the bytes columns (row i is `rows[i]`), to carry extra columns with their
    own Arrow types. None for JSON."""


class ManifestReader:
    """A manifest checked on construction (exists, known suffix, a regular file, for Parquet a readable schema
    whose mapped columns hold no bytes) and read by `batches()`, which reopens the file on every call (a caller
    may read it twice) and never holds more than one block.

    `needed`: the columns the column mapping reads (a Parquet column of bytes among them is an error, except
    `image_bytes`: the column holding Hugging Face `Image` structs {bytes, path}, passed through as read; the
    caller writes the bytes of the rows it keeps, see `store_image_bytes`)."""

    def __init__(self, path: str | os.PathLike, *, needed: set[str] = frozenset(), image_bytes: str | None = None,
                 max_row_bytes: int = 64 * 1024 * 1024):
        path = Path(path).expanduser()
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(f"manifest {path} does not exist; pass the path of a .jsonl, .json or .parquet "
                                    "file")
        suffix = path.suffix.lower()
        if suffix not in PARQUET_SUFFIXES + JSON_SUFFIXES:
            raise ValueError(
                f"manifest {path} has suffix {suffix!r}; supported: {list(JSON_SUFFIXES + PARQUET_SUFFIXES)} "
                "(compressed files: decompress them first)"
            )
        self.path = path
        self.max_row_bytes = max_row_bytes
        self.is_parquet = suffix in PARQUET_SUFFIXES
        self.embedded: str | None = None
        """The Parquet column of image bytes (`image_bytes` when the file has it as bytes), else None."""
        self.keep: list[str] = []
        """Parquet: the columns read as values (all but bytes columns)."""
        self.values_schema: pa.Schema | None = None
        """Parquet: the schema of `keep`."""
        self.notes: tuple[str, ...] = ()
        self.format = "parquet" if self.is_parquet else "json"
        """'parquet', or after the first `batches()` 'jsonl' / 'json-array'."""
        with self._open() as fh:
            if self.is_parquet:
                self._check_parquet(fh, needed, image_bytes)

    def _open(self) -> BinaryIO:
        try:
            return open_regular(self.path, what="manifest")
        except NotRegularFileError as exc:
            raise NotRegularFileError(f"{exc}; pass the path of a .jsonl, .json or .parquet file") from None

    @property
    def columns(self) -> list[str] | None:
        """Parquet: the top-level columns, in schema order (known without reading rows); None for JSON."""
        return self.keep + ([self.embedded] if self.embedded else []) if self.is_parquet else None

    def batches(self) -> Iterator[ManifestBatch]:
        """The rows, a block at a time; raises at the end when the file held no rows."""
        count = 0
        with self._open() as fh:
            blocks = self._parquet_batches(fh) if self.is_parquet else self._json_batches(fh)
            for batch in blocks:
                count += len(batch.rows)
                yield batch
        if not count:
            raise ValueError(f"manifest {self.path} has no rows")

    # -------------------------------------------------------------------------------------------------- JSON

    def _json_batches(self, fh: BinaryIO) -> Iterator[ManifestBatch]:
        path = self.path
        reader = bounded_reader(fh)
        head = reader.peek(1 << 16)[:1 << 16]
        if head.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark written by some editors
            reader.read(3)
            head = head[3:]
        first = head.lstrip()[:1]
        if first == b"[":
            self.format = "json-array"
            try:  # a JSON array is one value: it is parsed whole (docs/ingest.md)
                items = _parse_json_array(path, reader.read())
            except MemoryError:
                raise ValueError(f"manifest {path} is a JSON array too large to parse in memory; convert it to JSON "
                                 "Lines (one object per line), which is read line by line") from None
            for start in range(0, len(items), BATCH_ROWS):
                block = items[start:start + BATCH_ROWS]
                yield ManifestBatch([_with_raw(_parsed(i, f"element {i}", item, None), item)
                                     for i, item in enumerate(block, start)], None)
            return
        self.format = "jsonl"
        rows: list[ManifestRow] = []
        row_index, any_parsed = 0, False
        for line_no, line, length in _lines(reader, self.max_row_bytes):
            row = self._json_line(row_index, line_no, line, length)
            if row is None:
                continue  # blank lines are not rows
            any_parsed = any_parsed or row.data is not None
            rows.append(row)
            row_index += 1
            if len(rows) == BATCH_ROWS:
                yield ManifestBatch(rows, None)
                rows = []
        if rows:
            yield ManifestBatch(rows, None)
        if row_index and not any_parsed and first == b"{":
            # No line parses: perhaps one pretty-printed JSON object (read whole only in this failure case).
            try:
                fh.seek(0)
                whole = json.loads(fh.read(os.fstat(fh.fileno()).st_size).removeprefix(b"\xef\xbb\xbf"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError, MemoryError):
                whole = None
            if isinstance(whole, dict):
                raise ValueError(f"manifest {path} is one JSON object, not JSON Lines or a JSON array of rows; "
                                 "write one object per line")

    def _json_line(self, row_index: int, line_no: int, line: bytes | None, length: int) -> ManifestRow | None:
        where = f"line {line_no}"
        if line is None:
            detail = (f"{where} is {length:,} bytes, over max_row_bytes={self.max_row_bytes:,}; it was skipped "
                      "unread. Split or shorten the row, or raise IngestLimits.max_row_bytes")
            return ManifestRow(row_index, where, None, ("malformed_row", detail), f"<{length} bytes>")
        line = line.rstrip(b"\r")
        if not line.strip():
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = line[:4000].decode("utf-8", "backslashreplace")
            byte = f"byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
            detail = f"{where} is not UTF-8 ({byte}); re-save the file as UTF-8"
            return ManifestRow(row_index, where, None, ("invalid_text", detail), raw)
        try:
            parsed = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = f"{where} is not valid JSON ({exc}); fix or delete the line"
            return ManifestRow(row_index, where, None, ("malformed_row", detail), text[:4000])
        # A lone surrogate can only come from a \\uD800-\\uDFFF escape: lines without one skip the check.
        return _parsed(row_index, where, parsed, text[:4000], check_text=_SURROGATE_ESCAPE.search(text) is not None)

    # ----------------------------------------------------------------------------------------------- Parquet

    def _check_parquet(self, fh: BinaryIO, needed: set[str], image_bytes: str | None) -> None:
        path = self.path
        try:
            schema = pq.ParquetFile(fh).schema_arrow
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise ValueError(f"manifest {path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        binary = [name for name in schema.names if _has_binary(schema.field(name).type)]
        embedded = image_bytes if image_bytes in binary else None
        clash = sorted((set(binary) & set(needed)) - {embedded})
        if clash:
            raise ValueError(
                f"manifest {path}: column(s) {clash} hold bytes (image bytes?), not image paths; map the image-bytes "
                "column as `image_bytes` (the rlaif_v and rlhf_v presets do) or map `image` to a column of relative "
                "paths"
            )
        dropped = [b for b in binary if b != embedded]
        if dropped:
            self.notes = (f"dropped column(s) {dropped} of {path.name}: they hold bytes, never carried",)
        self.embedded = embedded
        self.keep = [n for n in schema.names if n not in binary]
        self.values_schema = pa.schema([schema.field(n) for n in self.keep])

    def _parquet_batches(self, fh: BinaryIO) -> Iterator[ManifestBatch]:
        pf = pq.ParquetFile(fh)
        keep, embedded, row_index = self.keep, self.embedded, 0
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=keep + ([embedded] if embedded else [])):
                values = batch.select(keep)
                records = values.to_pylist() if keep else [{} for _ in range(batch.num_rows)]
                if embedded:  # passed through as read: the caller writes the bytes of the rows it keeps
                    for rec, value in zip(records, batch.column(embedded).to_pylist()):
                        rec[embedded] = value
                rows = [_with_raw(_parsed(i, f"row {i}", rec, None), rec)
                        for i, rec in enumerate(records, row_index)]
                row_index += len(rows)
                yield ManifestBatch(rows, values)
        except Exception as exc:  # noqa: BLE001 - e.g. a string column holding invalid UTF-8, a corrupt row group
            raise ValueError(f"manifest {self.path}: cannot decode its rows ({type(exc).__name__}: {exc})") from None


def _summarised(value: Any) -> Any:
    """JSON fallback: bytes (an embedded image) become `<N bytes>`, anything else its text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return str(value)


def _utf8_problem(data: Any) -> str | None:
    """Why `data` cannot be stored as UTF-8 text (lone surrogates from `\\ud800` escapes), or None."""
    try:
        json.dumps(data, ensure_ascii=False, default=_summarised).encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate {exc.object[exc.start:exc.end]!r} (a broken \\uXXXX escape)"
    except (TypeError, ValueError):
        return None
    return None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _parsed(row_index: int, where: str, data: Any, raw: str | None, check_text: bool = True) -> ManifestRow:
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        return ManifestRow(row_index, where, None, ("malformed_row", f"{where} is a JSON {kind}, not an object"), raw)
    problem = _utf8_problem(data) if check_text else None
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


def _parse_json_array(path: Path, data: bytes) -> list[Any]:
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
    return items


def _with_raw(row: ManifestRow, item: Any) -> ManifestRow:
    """Rows that failed to parse keep their source text for the quarantine's `raw` column."""
    return row._replace(raw=json.dumps(item, ensure_ascii=False, default=_summarised)) if row.problem else row


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


# ---------------------------------------------------------------------------------------- images as bytes

IMAGE_SUFFIXES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
                  (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def _suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in IMAGE_SUFFIXES if data.startswith(magic)), ".img")


class StoredImage(NamedTuple):
    """An image that came as bytes in the manifest: the file ingest writes it to (inside `root`), or why not."""

    path: str | None
    root: str
    name: str | None
    """The struct's own `path` (the file name it had), when given."""
    problem: tuple[str, str] | None


def _image_bytes(value: Any) -> tuple[bytes | None, str | None]:
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
    else:
        data, name = value, None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, name
    return bytes(data), name


def store_image_bytes(value: Any, store: Path, max_bytes: int, *, write: bool = True) -> StoredImage | None:
    """Where the bytes of a Hugging Face `Image` value ({bytes, path}, or raw bytes) go:
    `<store>/<sha256[:2]>/<sha256><ext>`, written (with `write`) unless that file exists (content-addressed: each
    distinct image is written once, and parallel shards write the same file atomically). `write=False` names the
    file without writing it (a derived id needs the name of every row's image, the store only this shard's).
    None when the value holds no bytes."""
    data, name = _image_bytes(value)
    if data is None:
        return None
    root = str(store)
    if not data:
        return StoredImage(None, root, name, ("empty_file", "the image bytes are empty (0 bytes); re-export the row"))
    if len(data) > max_bytes:
        return StoredImage(None, root, name, ("image_too_large", f"the image bytes are {len(data):,} bytes > "
                                               f"max_file_bytes={max_bytes:,}; raise IngestLimits.max_file_bytes"))
    sha = hashlib.sha256(data).hexdigest()
    target = store / sha[:2] / f"{sha}{_suffix(data)}"
    if write and (not target.is_file() or target.stat().st_size != len(data)):
        write_bytes_atomic(data, target)
    return StoredImage(str(target), root, name, None)
