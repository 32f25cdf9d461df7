"""Ingest: a folder of pool images and a preference manifest become validated per-shard tables plus a quarantine.

Rule: bad input becomes a quarantine row with a reason (docs/data.md), never a crash and never a silent drop.
Every call checks `rows_in == rows_out + rows_quarantined` before it returns. A problem with the input as a
whole (missing folder or manifest, unreadable format, no rows) raises an exception that names the path.

    from pipeline.ingest import ingest_pool, ingest_examples
    res = ingest_examples("prefs.jsonl", image_root="images/", mapping="rlaif_v", shard=0, num_shards=4)
    print(res.summary())   # res.rows, res.quarantine: polars frames (the ingest assets write them)
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.column_mapping import MISSING, ColumnMapping, strip_llava_prompt
from pipeline.image_checks import IMAGE_EXTENSIONS, ImageInfo, ImageProblem, check_image
from pipeline.ingest_manifest import ManifestReader, StoredImage
from pipeline.manifest_shard import Candidate, ShardRows, other_shard_candidates, read_shard, source_has
from pipeline.ingest_schema import (
    EXAMPLE_SCHEMA,
    POOL_SCHEMA,
    IngestLimits,
    IngestResult,
    Quarantined,
    quarantine_frame,
    raw_json,
    is_blank,
    short_text,
)
from store.paths import DATA_ROOT_ENV
from store.safe_image import ledger_frame, ledger_row, stamp
from pipeline.sharding import shard_of

__all__ = [
    "ColumnMapping",
    "IngestLimits",
    "IngestResult",
    "ingest_examples",
    "ingest_pool",
]

log = logging.getLogger(__name__)


def _check_shard(shard: int, num_shards: int) -> tuple[int, int]:
    shard, num_shards = int(shard), int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards}: must be at least 1")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} is outside 0..{num_shards - 1}")
    return shard, num_shards


def _unreadable_key(text: str) -> str:
    """A printable, UTF-8-safe stand-in for a name holding undecodable bytes (Python keeps them as surrogates)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _contained(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


# ----------------------------------------------------------------------------------------------------------- pool


def list_pool(pool_dir: Path) -> tuple[list[str], list[str]]:
    """Image files under `pool_dir` (relative posix paths, sorted) and notes about what the walk could not enter.

    Symlinked folders are not followed (cycles, and a pool should not reach outside itself); symlinked files are
    listed and checked like any other file.
    """
    notes: list[str] = []

    def onerror(exc: OSError) -> None:
        notes.append(f"could not list {exc.filename} ({exc.strerror}); its images are not in the pool")

    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(pool_dir, onerror=onerror, followlinks=False):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                rel = Path(dirpath, d).relative_to(pool_dir).as_posix()
                notes.append(f"symlinked folder {rel!r} was not followed; copy or move its images into the pool")
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(pool_dir).as_posix())
    found.sort()
    return found, notes


def ingest_pool(
    pool_dir: str | os.PathLike,
    *,
    shard: int,
    num_shards: int,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
    require_usable: bool = False,
) -> IngestResult:
    """Validate the pool images of one shard (`require_usable`: as for `ingest_examples`).

    Lists png/jpg/jpeg/webp/bmp/gif/tif/tiff files (any case) under `pool_dir`, sorts them by relative path
    (`image_id`; `row_index` is the position in that listing), keeps those with
    `shard_of(image_id, num_shards) == shard` and checks each one (`pipeline.image_checks`).
    """
    shard, num_shards = _check_shard(shard, num_shards)
    given = Path(pool_dir).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"pool folder {given} does not exist; point it at a folder of images")
    if not given.is_dir():
        raise ValueError(f"pool folder {given} is not a folder; point it at a folder of images")
    root = given.resolve()
    listing, notes = list_pool(root)
    if not listing:
        raise ValueError(
            f"pool folder {given} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put the candidate-negative images there"
        )
    for note in notes:
        log.warning("pool %s: %s", given, note)

    rows: list[dict[str, Any]] = []
    bad: list[Quarantined] = []
    ledger: list[dict[str, Any]] = []
    mine = [(i, rel) for i, rel in enumerate(listing) if shard_of(_unreadable_key(rel), num_shards) == shard]
    for row_index, rel in tqdm(mine, desc=f"pool shard {shard:03d}", disable=not progress, unit="img"):
        full = root / rel
        if not _is_utf8(rel):
            key = _unreadable_key(rel)
            detail = f"file name {key!r} is not valid UTF-8; rename the file"
            bad.append(Quarantined(row_index, key, "invalid_text", detail, raw_json({"image_id": key})))
            continue
        raw = raw_json({"image_id": rel, "path": str(full)})
        target = _resolve_inside(full, root, rel)
        if isinstance(target, ImageProblem):
            ledger.append(ledger_row(str(full), root, _resolved_or_none(full), stamp(full), None))
            bad.append(Quarantined(row_index, rel, target.reason, target.detail, raw))
            continue
        before = stamp(target)
        info = check_image(target, limits)
        ledger.append(ledger_row(str(full), root, target, before, getattr(info, "sha256", None)))
        if isinstance(info, ImageProblem):
            bad.append(Quarantined(row_index, rel, info.reason, info.detail, raw))
            continue
        rows.append(
            {
                "image_id": rel,
                "path": str(full),
                "sha256": info.sha256,
                "width": info.width,
                "height": info.height,
                "shard": shard,
            }
        )
    result = IngestResult(
        rows=pl.DataFrame(rows, schema=POOL_SCHEMA),
        quarantine=quarantine_frame(bad, "pool"),
        rows_in=len(mine),
        notes=tuple(notes),
        images=ledger_frame(ledger),
    ).check()
    others = (rel for rel in listing if shard_of(_unreadable_key(rel), num_shards) != shard and _is_utf8(rel))
    if require_usable and not rows and not any(
            not isinstance(_resolve_inside(root / rel, root, rel), ImageProblem)
            and _probe_image(root / rel, limits) is _PROBED for rel in others):
        raise NoUsableRowsError(
            f"pool folder {given}: none of its {len(listing)} image files can be used (this shard: "
            f"{result.counts()}). Read the quarantine tables (<data root>/ingest/quarantine/pool-shard=*.parquet, "
            "column `detail` says what to fix) and fix or replace the images",
            result,
        )
    return result


def _resolved_or_none(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def _resolve_inside(path: Path, root: Path, shown: str) -> Path | ImageProblem:
    """`path` with symlinks and `..` resolved, or `path_outside_root` when the result leaves `root`."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop (RuntimeError before Python 3.13)
        return ImageProblem("missing_file", f"{shown} cannot be resolved ({exc}); fix the symlink")
    if not _contained(resolved, root):
        return ImageProblem(
            "path_outside_root",
            f"{shown} resolves to {resolved}, outside the image root {root}; move the image under the root "
            "(ingest never reads files outside it)",
        )
    return resolved


# ------------------------------------------------------------------------------------------------------- examples


class NoUsableRowsError(ValueError):
    """No row of the whole input survives ingest. `result` is this shard's result (its quarantine says why)."""

    def __init__(self, message: str, result: IngestResult):
        super().__init__(message)
        self.result = result


def default_image_store() -> Path:
    """Where image bytes from a manifest are written when no `image_store` is given: `<data root>/ingest/images`."""
    return Path(os.environ.get(DATA_ROOT_ENV) or "data").expanduser().resolve() / "ingest" / "images"


def ingest_examples(
    manifest: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    mapping: str | Mapping[str, Any] | ColumnMapping = "canonical",
    shard: int,
    num_shards: int,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
    image_store: str | os.PathLike | None = None,
    require_usable: bool = False,
) -> IngestResult:
    """Validate the preference examples of one shard.

    `manifest`: JSON Lines (`.jsonl`, `.ndjson`, `.json`), a top-level JSON array (`.json`) or Parquet.
    `image_root`: the folder image paths are relative to (default: the manifest's folder); no image outside it
    is read. `mapping`: a `ColumnMapping`, a preset name, or a dict / JSON text (`ColumnMapping.resolve`).
    `image_store`: where images given as bytes in the manifest (`ColumnMapping.image_bytes`) are written, one file
    per distinct image (default `<data root>/ingest/images`); they are then checked like any file, with the store
    as their root.
    The manifest is streamed and only this shard's rows are kept (memory: a block of rows plus the shard, see
    `pipeline.manifest_shard`). Rows are sharded by `example_id` (rows without a readable id by
    `#row=<row_index>`), so all copies of an id share a shard: the first row in file order keeps the id.
    `require_usable`: raise `NoUsableRowsError` (carrying this shard's result) when no row of the whole manifest
    can be used, instead of returning empty tables that later stages would fail on with less useful advice.
    """
    shard, num_shards = _check_shard(shard, num_shards)
    cmap = ColumnMapping.resolve(mapping)
    manifest_path = Path(manifest).expanduser()
    root_given = Path(image_root).expanduser() if image_root is not None else manifest_path.parent
    if not root_given.is_dir():
        raise FileNotFoundError(f"image root {root_given} is not an existing folder; pass image_root=")
    root = root_given.resolve()
    store = Path(image_store).expanduser().resolve() if image_store is not None else default_image_store()
    reader = ManifestReader(manifest_path, needed=cmap.top_level_columns(), image_bytes=cmap.image_bytes,
                            max_row_bytes=limits.max_row_bytes)
    # One streaming pass keeps this shard's rows only (manifest_shard.py); the layout is the whole manifest's.
    sel = read_shard(reader, cmap, limits, shard, num_shards, image_store=store)
    layout = sel.layout
    notes = list(layout.notes)
    if reader.embedded:
        notes.append(f"images of column {reader.embedded!r} written once each to {store} (content-addressed)")
    if layout.derive:
        why = "the mapping has no id column" if cmap.id is None else f"column {cmap.id!r} is absent from the manifest"
        notes.append(f"{why}: example ids are derived from content (sha1 of image, prompt, chosen, rejected; 16 hex)")
    has_bytes = cmap.image_bytes is not None and cmap.image_bytes in layout.columns
    if layout.parsed:  # when no row parses, each is quarantined instead
        absent = [getattr(cmap, f) for f in ("prompt", "chosen", "image")
                  if not source_has(layout.columns, getattr(cmap, f)) and not (f == "image" and has_bytes)]
        if absent:
            raise ValueError(
                f"manifest {manifest_path}: mapped column(s) {absent} are absent from every row (its columns: "
                f"{layout.columns[:20]}); pick the right preset or pass mapping={{'prompt': ..., 'chosen': ..., "
                "'image': ...}"
            )
        if cmap.rejected is not None and not source_has(layout.columns, cmap.rejected):
            notes.append(f"column {cmap.rejected!r} is absent: no example has a rejected response")
    for note in notes:
        log.info("examples %s: %s", manifest_path.name, note)

    # This shard only: text checks, path checks, image checks (each distinct image once).
    bad = list(sel.bad)
    n_parse_bad = len(bad)  # reasons found while reading; the checks below append this shard's own
    checked: dict[str, ImageInfo | ImageProblem] = {}
    ledger: dict[str, dict[str, Any]] = {}
    kept: list[tuple[int, dict[str, Any]]] = []  # (position in sel.candidates, output row)
    for i, c in enumerate(tqdm(sel.candidates, desc=f"examples shard {shard:03d}", disable=not progress,
                               unit="row")):
        out = _check_example(c, cmap, limits, root, checked, ledger)
        if isinstance(out, Quarantined):
            bad.append(out)
        else:
            kept.append((i, out))

    rows = pl.DataFrame([{**row, "shard": shard} for _, row in kept], schema=EXAMPLE_SCHEMA)
    extras = [c for c in layout.columns if c not in cmap.top_level_columns()]
    if extras:
        frame = _extra_columns(sel, extras, [i for i, _ in kept])
        renames = {}
        for name in extras:
            new = name
            while new in EXAMPLE_SCHEMA or (new != name and new in extras):
                new = f"src_{new}"
            if new != name:
                renames[name] = new
        if renames:
            notes.append(f"extra column(s) renamed to avoid clashing with ingest's own columns: {renames}")
            frame = frame.rename(renames)
        rows = rows.hstack(frame)
    result = IngestResult(
        rows=rows,
        quarantine=quarantine_frame(bad, "examples"),
        rows_in=sel.rows_in,
        notes=tuple(notes),
        images=ledger_frame(ledger.values()),
    ).check()
    if require_usable and not kept and not _any_usable(reader, cmap, limits, root, shard, num_shards,
                                                        layout.derive, store):
        reasons = layout.reasons + Counter(q.reason for q in bad[n_parse_bad:])
        raise NoUsableRowsError(
            f"manifest {manifest_path}: none of its {layout.rows} rows can be used (quarantine reasons, this shard "
            f"and the whole manifest's parse/id checks: {dict(reasons.most_common())}). Read the quarantine tables "
            "(<data root>/ingest/quarantine/examples-shard=*.parquet, column `detail` says what to fix), fix the "
            "manifest, the column mapping or the image root, and re-run",
            result,
        )
    return result


def _extra_columns(sel: ShardRows, columns: list[str], positions: list[int]) -> pl.DataFrame:
    """The extra (unmapped) columns of the kept candidates `positions`, typed as over the whole manifest (every
    shard's table has the same schema): Parquet columns keep their Arrow types, JSON ones `ColumnTypes`."""
    if sel.extras is not None:
        taken = sel.extras.select(columns).take(pa.array(positions, type=pa.int64()))
        return pl.DataFrame(pl.from_arrow(taken))
    types = sel.layout.extra_types
    data = [sel.candidates[i].data for i in positions]
    return pl.DataFrame([types.series(name, (d.get(name) for d in data)) for name in columns])


def _any_usable(reader: ManifestReader, cmap: ColumnMapping, limits: IngestLimits, root: Path, shard: int,
                num_shards: int, derive: bool, store: Path) -> bool:
    """Whether a row of another shard passes every check short of decoding its image (text, path, a regular
    non-empty file of allowed size): the manifest is read again, and only until the first such row."""
    for c in other_shard_candidates(reader, cmap, limits, shard, num_shards, derive=derive, image_store=store):
        if not isinstance(_check_example(c, cmap, limits, root, {}, {}, probe=True), Quarantined):
            return True
    return False


_PROBED = ImageProblem("", "passes the checks short of decoding")  # a probe's "looks usable"


def _probe_image(target: Path, limits: IngestLimits) -> ImageInfo | ImageProblem:
    """`check_image` without reading the file: exists, regular, non-empty, within `max_file_bytes`."""
    st = stamp(target)
    if st is None or not target.is_file():
        return ImageProblem("missing_file", f"{target} is missing or not a regular file")
    if st.size == 0 or st.size > limits.max_file_bytes:
        return ImageProblem("empty_file" if st.size == 0 else "image_too_large", f"{target} has {st.size} bytes")
    return _PROBED


def _check_example(
    c: Candidate,
    cmap: ColumnMapping,
    limits: IngestLimits,
    root: Path,
    checked: dict[str, ImageInfo | ImageProblem],
    ledger: dict[str, dict[str, Any]],
    probe: bool = False,
) -> Quarantined | dict[str, Any]:
    """The output row of candidate `c`, or the first problem found, in the order of docs/ingest.md. Images
    checked are recorded in `ledger` (path as joined -> ledger row). `probe`: skip decoding (see `_any_usable`)."""

    def q(reason: str, detail: str) -> Quarantined:
        return Quarantined(c.row_index, c.example_id, reason, f"{c.where}: {detail}", raw_json(c.data))

    stored: StoredImage | None = c.fields.get("stored")
    values: dict[str, Any] = {}
    for f in ("prompt", "chosen", "image"):
        value = c.fields.get(f, MISSING)
        if f == "image" and stored is not None:
            value = value if isinstance(value, str) and value.strip() else (stored.name or stored.path or "")
        if value is MISSING or value is None:
            return q("missing_field", f"no {f} (column {getattr(cmap, f)!r}); fill it in or fix the column mapping")
        values[f] = value
    rejected = c.fields.get("rejected", MISSING)
    values["rejected"] = None if rejected is MISSING else rejected
    for f in ("prompt", "chosen", "rejected", "image"):
        if values[f] is not None and not isinstance(values[f], str):
            kind = type(values[f]).__name__
            return q("malformed_row", f"{f} has type {kind}, expected a string (column {getattr(cmap, f)!r})")

    prompt = strip_llava_prompt(values["prompt"]) if cmap.prompt_format == "llava" else values["prompt"]
    if is_blank(prompt):
        return q("empty_prompt", "the prompt is empty, blank or only invisible characters; write the instruction "
                 "or drop the row")
    if is_blank(values["chosen"]):
        return q("empty_response", "the chosen response is empty, blank or only invisible characters; fill it in "
                 "or drop the row")
    if values["rejected"] is not None and is_blank(values["rejected"]):
        return q("empty_response", "the rejected response is empty or only invisible characters; fill it in, or "
                 "use null if there is none")
    for f, text in (("prompt", prompt), ("chosen", values["chosen"]), ("rejected", values["rejected"])):
        if text is not None and len(text) > limits.max_text_chars:
            return q(
                "text_too_long",
                f"{f} has {len(text):,} characters > max_text_chars={limits.max_text_chars:,}; "
                "shorten it or raise IngestLimits.max_text_chars",
            )

    image_id = values["image"]
    if stored is not None:
        if stored.problem is not None:
            return q(*stored.problem)
        image_root, joined = Path(stored.root), Path(stored.path)
    else:
        if not image_id.strip():
            return q("missing_field",
                     f"the image path is empty (column {cmap.image!r}); give a path under the image root")
        if "://" in image_id:
            return q("missing_file",
                     f"image {image_id!r} is a URL; download the images, give paths under the image root")
        if "\x00" in image_id:
            return q("missing_file", f"image path {image_id!r} contains a NUL byte; fix the path")
        given = Path(image_id)
        image_root, joined = root, (given if given.is_absolute() else root / given)
    target = _resolve_inside(joined, image_root, f"image {short_text(image_id)!r}")
    if isinstance(target, ImageProblem):
        if not probe:
            ledger.setdefault(str(joined), ledger_row(str(joined), image_root, _resolved_or_none(joined),
                                                      stamp(joined), None))
        return q(target.reason, target.detail)
    key = str(target)
    before = None
    if key not in checked:
        before = stamp(target)
        checked[key] = _probe_image(target, limits) if probe else check_image(target, limits)
    info = checked[key]
    if probe:
        return q(*info) if info is not _PROBED else {}
    if str(joined) not in ledger:
        ledger[str(joined)] = ledger_row(str(joined), image_root, target, before or stamp(target),
                                         getattr(info, "sha256", None))
    if isinstance(info, ImageProblem):
        return q(info.reason, info.detail)
    return {
        "example_id": c.example_id,
        "prompt": prompt,
        "chosen": values["chosen"],
        "rejected": values["rejected"],
        "image_id": image_id,
        "image_path": key,
        "image_sha256": info.sha256,
        "width": info.width,
        "height": info.height,
        "shard": None,  # set by the caller
        "row_index": c.row_index,
    }

