"""Pick one shard's rows out of a manifest as it streams past, and fingerprint them.

Ingest of one shard keeps only that shard's rows: each block of the manifest (`ManifestReader.batches`) is parsed,
every row gets its id (or its `#row=` key) and shard, and only the rows of the requested shard are kept. What
every shard must agree on is folded into a small `ManifestLayout` on the way (the columns, one type per extra JSON
column, whether ids are derived), never the rows. Duplicate ids need no global state: all copies of an id share
its shard, so the shard that keeps them finds them, first row in file order first.

`ShardRows.digest` fingerprints the shard's rows as read plus the layout: two manifests with the same digest for a
shard give that shard the same ingest output (its image files aside, which the image ledger covers), so a changed
row re-ingests only its own shard (`shard_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pyarrow as pa

from pipeline.column_mapping import MISSING, ColumnMapping, FieldError, derive_id, lookup
from pipeline.column_types import ColumnTypes
from store.fingerprint import fingerprint
from pipeline.ingest_manifest import ManifestBatch, ManifestReader, ManifestRow, StoredImage, store_image_bytes
from pipeline.ingest_schema import IngestLimits, Quarantined, is_blank, raw_json, short_text
from pipeline.sharding import shard_of


class Candidate(NamedTuple):
    """A row that parsed and has an id; the remaining checks run only for rows of the requested shard."""

    row_index: int
    where: str
    example_id: str
    fields: dict[str, Any]
    data: dict[str, Any]


class ManifestLayout(NamedTuple):
    """What every shard needs to know about the whole manifest (never its rows)."""

    format: str
    columns: list[str]
    """Top-level columns: Parquet schema order, or order of first appearance (JSON)."""
    extra_types: ColumnTypes | None
    """JSON: one type per extra column over the whole manifest. None for Parquet (the Arrow schema is the type)."""
    arrow_schema: pa.Schema | None
    """Parquet: the schema of the columns read as values."""
    derive: bool
    """Ids are derived from content (the mapping has no id column, or no row has it)."""
    rows: int
    parsed: bool
    """Whether any row parsed (when none does, every row is quarantined and column checks are moot)."""
    reasons: Counter
    """Quarantine reasons of the parse and id checks over the whole manifest (every shard)."""
    notes: tuple[str, ...]

    def describe(self) -> list:
        """The parts of the layout that a shard's output depends on (for its fingerprint)."""
        types = self.extra_types.describe() if self.extra_types is not None else str(self.arrow_schema)
        return [self.format, self.columns, types, self.derive]


class ShardRows(NamedTuple):
    candidates: list[Candidate]
    """This shard's rows that passed the parse and id checks, in file order."""
    bad: list[Quarantined]
    """This shard's rows that did not (including `duplicate_id`)."""
    extras: pa.Table | None
    """Parquet: the candidates' columns read as values (row i is candidates[i]); None for JSON."""
    layout: ManifestLayout
    digest: str
    """Fingerprint of this shard's rows as read plus `layout.describe()`."""

    @property
    def rows_in(self) -> int:
        return len(self.candidates) + len(self.bad)


def source_has(columns: list[str], path: str) -> bool:
    return path in columns or path.split(".")[0] in columns


def id_text(value: Any) -> str | None:
    """An id as text: strings and integers are ids (RLHF-V's `idx` is int64); anything else is not."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


class _Scan:
    """One pass over the manifest: per block, every row's shard key and its Candidate or Quarantined; the layout
    is accumulated on the way."""

    def __init__(self, reader: ManifestReader, cmap: ColumnMapping, limits: IngestLimits, derive: bool,
                 image_store: Path | None):
        self.reader, self.cmap, self.limits, self.derive = reader, cmap, limits, derive
        self.store = image_store
        self.embedded = reader.embedded if cmap.image_bytes is not None else None
        self.mapped = [f for f in ("prompt", "chosen", "rejected", "image") if getattr(cmap, f) is not None]
        self.top = cmap.top_level_columns()
        self.columns: dict[str, None] = dict.fromkeys(reader.columns or [])
        self.types = None if reader.is_parquet else ColumnTypes()
        self.rows, self.parsed = 0, False
        self.reasons: Counter = Counter()

    def layout(self, notes: tuple[str, ...] = ()) -> ManifestLayout:
        schema = None
        if self.reader.is_parquet:
            schema = self.reader.values_schema
        return ManifestLayout(self.reader.format, list(self.columns), self.types, schema, self.derive, self.rows,
                              self.parsed, self.reasons, notes)

    def batches(self) -> Iterator[tuple[ManifestBatch, list[tuple[str, Candidate | Quarantined]]]]:
        for batch in self.reader.batches():
            items = [self._row(r) for r in batch.rows]
            self.rows += len(batch.rows)
            for _, item in items:
                if isinstance(item, Quarantined):
                    self.reasons[item.reason] += 1
            yield batch, items

    def _row(self, r: ManifestRow) -> tuple[str, Candidate | Quarantined]:
        cmap, row_key = self.cmap, f"#row={r.row_index}"
        if r.data is None:
            reason, detail = r.problem
            return row_key, Quarantined(r.row_index, None, reason, detail, raw_json(r.raw or ""))
        self.parsed = True
        if self.types is not None:
            for key in r.data:
                if key not in self.columns:
                    self.columns[key] = None
            self.types.add(r.data, self.top)
        fields: dict[str, Any] = {}
        try:
            for f in ("id", *self.mapped):
                path = getattr(cmap, f)
                if path is not None and not (f == "id" and self.derive):
                    fields[f] = lookup(r.data, path)
        except FieldError as exc:
            detail = f"{r.where}: {exc}; fix the column or the column mapping"
            return row_key, Quarantined(r.row_index, None, "malformed_row", detail, raw_json(r.data))
        if self.derive:
            image = fields.get("image", MISSING)
            if self.embedded is not None and self.store is not None:
                # A stored image counts by its content-addressed name, so that ids do not depend on the data root.
                stored = store_image_bytes(r.data.get(self.embedded), self.store, self.limits.max_file_bytes,
                                           write=False)
                if stored is not None:
                    image = Path(stored.path).name if stored.path else None
            content = [image, *(fields.get(f, MISSING) for f in ("prompt", "chosen", "rejected"))]
            return self._candidate(r, derive_id(*(None if v is MISSING else v for v in content)), fields)
        value = fields["id"]
        example_id = id_text(value) if value is not MISSING else None
        if value is MISSING or value is None or (example_id is not None and is_blank(example_id)):
            detail = (f"{r.where} has no id in column {cmap.id!r} (or only invisible characters); "
                      "give every row a unique id")
            return row_key, Quarantined(r.row_index, None, "missing_field", detail, raw_json(r.data))
        if example_id is None:
            detail = (f"{r.where}: id {short_text(repr(value))} in column {cmap.id!r} has type "
                      f"{type(value).__name__}; use a string or an integer")
            return row_key, Quarantined(r.row_index, None, "malformed_row", detail, raw_json(r.data))
        if len(example_id) > self.limits.max_id_chars:
            detail = (f"{r.where}: the id in column {cmap.id!r} has {len(example_id):,} characters > "
                      f"max_id_chars={self.limits.max_id_chars:,}; use a short unique id or raise "
                      "IngestLimits.max_id_chars")
            return row_key, Quarantined(r.row_index, short_text(example_id), "text_too_long", detail,
                                        raw_json(r.data))
        return self._candidate(r, example_id, fields)

    def _candidate(self, r: ManifestRow, example_id: str, fields: dict[str, Any]) -> tuple[str, Candidate]:
        return example_id, Candidate(r.row_index, r.where, example_id, fields, r.data)

    def keep_image(self, c: Candidate, write: bool) -> None:
        """Give a kept row its stored image (written to the store with `write`), replacing the bytes in its data
        so that the kept row does not hold them."""
        if self.embedded is None:
            return
        if self.store is None:
            raise ValueError(f"manifest {self.reader.path}: column {self.embedded!r} holds image bytes; pass "
                             "image_store= (a folder under the data root) so that ingest can write them to files")
        stored = store_image_bytes(c.data.get(self.embedded), self.store, self.limits.max_file_bytes, write=write)
        if isinstance(stored, StoredImage):
            c.fields["stored"] = stored
            c.data[self.embedded] = stored


def _digest_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    return str(value)


def _row_digest(h: Any, row: ManifestRow) -> None:
    """Add one row as read (its values, or its parse problem and source text) to the shard digest `h`."""
    blob = json.dumps([row.row_index, row.where, row.problem, row.raw if row.data is None else row.data],
                      sort_keys=True, default=_digest_default)
    h.update(blob.encode("utf-8", "backslashreplace"))
    h.update(b"\x1e")


def read_shard(reader: ManifestReader, cmap: ColumnMapping, limits: IngestLimits, shard: int, num_shards: int,
               *, image_store: Path | None, write_images: bool = True) -> ShardRows:
    """The rows of shard `shard` (of `num_shards`), read in one streaming pass (two when the mapping's id column
    turns out to be absent from every row, so that ids are derived). Rows are sharded by `example_id` (rows
    without a readable id by `#row=<row_index>`); within the shard the first row of an id keeps it and later ones
    are `duplicate_id`. Images given as bytes are written to `image_store` for this shard's rows only
    (`write_images=False`: not at all, for a fingerprint)."""
    derive = cmap.id is None or (reader.is_parquet and not source_has(reader.columns, cmap.id))
    out = _read_shard(reader, cmap, limits, shard, num_shards, derive, image_store, write_images)
    if not derive and not out.layout.parsed:  # no row parses: every row is quarantined, keyed by #row
        out = out._replace(layout=out.layout._replace(derive=True))
    elif not derive and not source_has(out.layout.columns, cmap.id):  # JSON whose rows all lack the id column
        out = _read_shard(reader, cmap, limits, shard, num_shards, True, image_store, write_images)
    return out


def _read_shard(reader: ManifestReader, cmap: ColumnMapping, limits: IngestLimits, shard: int, num_shards: int,
                derive: bool, image_store: Path | None, write_images: bool) -> ShardRows:
    scan = _Scan(reader, cmap, limits, derive, image_store)
    candidates: list[Candidate] = []
    bad: list[Quarantined] = []
    arrow: list[pa.Table] = []
    first_seen: dict[str, tuple[int, str]] = {}
    h = hashlib.sha256()
    for batch, items in scan.batches():
        taken: list[int] = []
        for i, ((key, item), row) in enumerate(zip(items, batch.rows)):
            if shard_of(key, num_shards) != shard:
                continue
            _row_digest(h, row)
            if isinstance(item, Quarantined):
                bad.append(item)
                continue
            if item.example_id in first_seen:
                first, first_where = first_seen[item.example_id]
                detail = (f"{item.where}: id {item.example_id!r} already used by row {first} ({first_where}), which "
                          "is kept; give this row its own id or delete it")
                scan.reasons["duplicate_id"] += 1
                bad.append(Quarantined(item.row_index, item.example_id, "duplicate_id", detail, raw_json(item.data)))
                continue
            first_seen[item.example_id] = (item.row_index, item.where)
            scan.keep_image(item, write_images)
            candidates.append(item)
            taken.append(i)
        if batch.arrow is not None and taken:
            arrow.append(pa.Table.from_batches([batch.arrow]).take(pa.array(taken, type=pa.int64())))
    layout = scan.layout(reader.notes)
    extras = None
    if reader.is_parquet:
        extras = pa.concat_tables(arrow) if arrow else layout.arrow_schema.empty_table()
    h.update(json.dumps(layout.describe(), default=str).encode())
    return ShardRows(candidates, bad, extras, layout, h.hexdigest()[:16])


def other_shard_candidates(reader: ManifestReader, cmap: ColumnMapping, limits: IngestLimits, shard: int,
                           num_shards: int, *, derive: bool, image_store: Path | None) -> Iterator[Candidate]:
    """The candidates of every other shard, streamed (their stored images written on the way, as that shard's
    ingest would): to look for one usable row when this shard has none (stop iterating at the first)."""
    scan = _Scan(reader, cmap, limits, derive, image_store)
    for _, items in scan.batches():
        for key, item in items:
            if isinstance(item, Candidate) and shard_of(key, num_shards) != shard:
                scan.keep_image(item, write=True)
                yield item


def shard_fingerprint(manifest: str | Path, *, mapping: str | dict | ColumnMapping = "canonical", shard: int,
                      num_shards: int, limits: IngestLimits = IngestLimits(),
                      image_store: str | Path | None = None, parts: tuple = ()) -> str:
    """Fingerprint of what the ingest of shard `shard` reads from `manifest`: its own rows as read (any change to
    another shard's rows leaves it alone) and the layout every shard shares (columns, extra column types, derived
    ids), plus the mapping, limits, shard count and `parts` (e.g. the image root). The images' files are not in
    it: the image ledger decides about those (`store.safe_image.ledger_changes`). One streaming pass, no image
    decoded or written."""
    cmap = ColumnMapping.resolve(mapping)
    reader = ManifestReader(manifest, needed=cmap.top_level_columns(), image_bytes=cmap.image_bytes,
                            max_row_bytes=limits.max_row_bytes)
    store = Path(image_store).expanduser().resolve() if image_store is not None else None
    rows = read_shard(reader, cmap, limits, shard, num_shards, image_store=store, write_images=False)
    return fingerprint("examples-shard", rows.digest, cmap, limits, num_shards, shard, str(store), *parts)
