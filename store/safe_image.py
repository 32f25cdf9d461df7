"""The one way to open an image after ingest: what was validated is what is read.

Ingest checks each image once (`pipeline.image_checks`) and records its sha256. Every later reader (the embedding
stage, the contact sheets, the trainer's rows, eval) opens images through `open_image`, which repeats the checks
that make a read safe and ties the bytes to that record:

1. the path, with symlinks resolved, lies inside the image root (when the caller knows the root);
2. it is a regular file (a FIFO or device is refused without blocking) of at most `max_file_bytes`;
3. its bytes hash to the sha256 ingest recorded (when known): a mismatch raises `ImageChangedError`, naming the
   file and telling the user to re-ingest; a changed file is never read silently;
4. only the decoders ingest allows (PNG, JPEG/MPO, WebP, BMP, GIF, TIFF) are tried, with the pixel limit checked
   from the header before decoding;
5. the EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo stored sideways is read upright.

Readers that only have a path (`trainer.rows.load_image`, `eval.run._load_image`) call `open_ingested`, which
looks the path up in the **image ledger** that ingest writes beside its tables (`<data root>/ledger/`; not under
`ingest/` because its stamps are machine-specific state, not data):
a recorded image gets checks 1-5; an image ingest never saw (an eval benchmark's images) gets checks 2, 4 and 5.

The ledger also decides whether a rerun may reuse ingest's output (`ledger_changes`): for every image it records
the file's size, mtime, ctime and inode; an image whose stamp differs is re-hashed, and only a different hash
(or a changed symlink target, or a file that appeared or vanished) makes the shard stale.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple

import polars as pl
from PIL import Image, ImageFile, ImageOps

from store.image_policy import IngestLimits, decode_formats
from store.safe_files import NotRegularFileError, read_regular

LEDGER_SCHEMA: dict[str, pl.DataType] = {
    "path": pl.String,  # as readers are given it (pool `path`, examples `image_path`)
    "root": pl.String,  # the resolved image root it must stay inside
    "target": pl.String,  # the path with symlinks resolved, null when it could not be resolved
    "size": pl.Int64,  # stamp of the target when ingest checked it; all null when it did not exist
    "mtime_ns": pl.Int64,
    "ctime_ns": pl.Int64,
    "inode": pl.Int64,
    "sha256": pl.String,  # null when ingest could not read it (the row was quarantined)
}


class UnsafeImageError(ValueError):
    """An image a reader must not use (outside its root, not a regular file, too large, not an allowed format)."""


class ImageChangedError(UnsafeImageError):
    """An image whose bytes no longer hash to what ingest recorded."""


class LedgerMissingError(UnsafeImageError):
    """A reader that must verify images (the trainer) found no image ledger under the data root."""


class FileStamp(NamedTuple):
    """What `stat` says about a file: a change in any field means its bytes may have changed."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def stamp(path: str | os.PathLike) -> FileStamp | None:
    """The stamp of `path` (symlinks followed), or None when it does not exist or cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return FileStamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def open_image(path: str | os.PathLike, *, root: str | os.PathLike | None = None, sha256: str | None = None,
               limits: IngestLimits = IngestLimits()) -> Image.Image:
    """The decoded image at `path`, upright (EXIF orientation applied), after the checks in this module's
    docstring. Raises `UnsafeImageError` (or `ImageChangedError`) naming the file and what to do."""
    shown = str(path)
    try:
        resolved = Path(path).resolve(strict=True)
    except FileNotFoundError:
        raise UnsafeImageError(f"image {shown} does not exist (moved or deleted since ingest); restore it or "
                               "re-ingest") from None
    except (OSError, RuntimeError) as exc:
        raise UnsafeImageError(f"image {shown} cannot be resolved ({exc}); fix the path or re-ingest") from None
    if root is not None:
        root_resolved = Path(root).resolve()
        if not _inside(resolved, root_resolved):
            raise UnsafeImageError(f"image {shown} now resolves to {resolved}, outside its image root "
                                   f"{root_resolved}; it is not read. Move the image back under the root and "
                                   "re-ingest")
    try:
        data = read_regular(resolved, what="image", max_bytes=limits.max_file_bytes)
    except (NotRegularFileError, FileNotFoundError) as exc:
        raise UnsafeImageError(f"{exc}; re-ingest") from None
    except ValueError as exc:
        raise UnsafeImageError(f"{exc} (IngestLimits.max_file_bytes); re-ingest") from None
    except OSError as exc:
        raise UnsafeImageError(f"image {shown} cannot be read ({exc.strerror or exc}); check permissions") from None
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ImageChangedError(
                f"image {shown} changed since ingest: its sha256 is {actual[:12]}..., ingest recorded "
                f"{sha256[:12]}...; re-ingest (rematerialise pool_images / preference_examples) so that what is "
                "read is what was validated"
            )
    return _decode(data, shown, limits)


def _decode(data: bytes, shown: str, limits: IngestLimits) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data), formats=decode_formats())
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
            raise UnsafeImageError(f"image {shown} is not a readable PNG, JPEG, WebP, BMP, GIF or TIFF image "
                                   f"({type(exc).__name__}: {exc}); re-export it and re-ingest") from None
        width, height = im.size
        if width * height > limits.max_pixels:
            raise UnsafeImageError(f"image {shown} is {width}x{height} pixels > max_pixels={limits.max_pixels:,}; "
                                   "downscale it and re-ingest")
        padding = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
            upright = ImageOps.exif_transpose(im)
        except Exception as exc:  # noqa: BLE001
            raise UnsafeImageError(f"image {shown}: decoding failed ({type(exc).__name__}: {exc}); "
                                   "re-ingest") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = padding
    return upright if upright is not None else im


# ------------------------------------------------------------------------------------------------------- ledger


def ledger_row(path: str, root: Path, target: Path | None, before: FileStamp | None,
               sha256: str | None) -> dict:
    """One ledger row. `before` is the stamp taken before ingest read the file, so that a write racing the check
    makes the next rerun re-hash instead of trusting a stamp newer than the bytes checked."""
    s = before or FileStamp(None, None, None, None)  # type: ignore[arg-type]
    return {"path": path, "root": str(root), "target": None if target is None else str(target),
            "size": s.size, "mtime_ns": s.mtime_ns, "ctime_ns": s.ctime_ns, "inode": s.inode, "sha256": sha256}


def ledger_frame(rows: Iterable[dict]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=LEDGER_SCHEMA)


def _sha256_or_none(path: Path, max_bytes: int) -> str | None:
    try:
        return hashlib.sha256(read_regular(path, what="image", max_bytes=max_bytes)).hexdigest()
    except (OSError, ValueError):
        return None


def _as_recorded_and_now(row: dict) -> tuple[Path, str | None, FileStamp | None, FileStamp | None]:
    """(path, where it resolves now, its stamp now, its stamp at ingest) of one ledger row."""
    path = Path(row["path"])
    try:
        target = str(path.resolve())
    except (OSError, RuntimeError):
        target = None
    was = None if row["size"] is None else FileStamp(row["size"], row["mtime_ns"], row["ctime_ns"], row["inode"])
    return path, target, stamp(path), was


def ledger_changes(ledger: pl.DataFrame, *, max_bytes: int, limit: int = 5) -> list[str]:
    """Why the images recorded in `ledger` no longer match it (empty: unchanged), at most `limit` reasons.

    Per image: the path must still resolve to the recorded target; if its stamp (size, mtime, ctime, inode) is
    unchanged the bytes are taken as unchanged; otherwise the file is re-hashed and must hash as recorded. An
    image that did not exist must still not exist."""
    changes: list[str] = []
    for row in ledger.iter_rows(named=True):
        path, target, now, was = _as_recorded_and_now(row)
        if target != row["target"] and row["target"] is not None:
            changes.append(f"{path} now resolves to {target} (was {row['target']})")
        elif (now is None) != (was is None):
            changes.append(f"{path} {'appeared' if was is None else 'disappeared'}")
        elif now is not None and now != was:
            if row["sha256"] is None or _sha256_or_none(Path(target or path), max_bytes) != row["sha256"]:
                changes.append(f"{path} changed (size/mtime/ctime/inode and content)")
        if len(changes) >= limit:
            break
    return changes


def ledger_fingerprint(ledger: pl.DataFrame, *, max_bytes: int) -> str:
    """A content version of the image files a ledger records, as they are now: per image its path, where it
    resolves and its sha256, taken from the ledger while the stamp (size, mtime, ctime, inode) is unchanged and
    re-hashed where it changed. Equal to the version at ingest exactly when `ledger_changes` finds nothing, so
    `fingerprint(shard_fingerprint(...), ledger_fingerprint(ledger))` is a shard's data version: touching a file
    keeps it, new bytes change it."""
    from store.fingerprint import fingerprint

    parts = []
    for row in ledger.iter_rows(named=True):
        path, target, now, was = _as_recorded_and_now(row)
        if now is None:
            sha = None
        elif now == was and target == row["target"]:
            sha = row["sha256"]
        else:
            sha = _sha256_or_none(Path(target or path), max_bytes)
        parts.append((row["path"], target if row["target"] is not None else None, now is not None, sha))
    return fingerprint(parts)


# ------------------------------------------------------------------------------- readers that only have a path

_lock = threading.Lock()
_registered: list[Path] = []
_cache: dict[Path, tuple[tuple, dict[str, tuple[str, str]]]] = {}


def use_data_root(root: str | os.PathLike) -> None:
    """Make `open_ingested` look up paths in the ledger under `root` (besides `$MISP_DATA_ROOT`, or ./data)."""
    root = Path(root).expanduser().resolve()
    with _lock:
        if root not in _registered:
            _registered.insert(0, root)


def ledger_files(root: Path) -> list[Path]:
    folder = Path(root) / "ledger"
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def _records(root: Path) -> dict[str, tuple[str, str]]:
    """path -> (sha256, image root) of every image the ledger under `root` records, reloaded when it changes."""
    files = ledger_files(root)
    key = tuple((str(f), stamp(f)) for f in files)
    with _lock:
        cached = _cache.get(root)
        if cached is not None and cached[0] == key:
            return cached[1]
    out: dict[str, tuple[str, str]] = {}
    for f in files:
        try:
            table = pl.read_parquet(f, columns=["path", "target", "root", "sha256"])
        except Exception:  # noqa: BLE001 - a ledger being rewritten: the next call reloads it
            continue
        for path, target, image_root, sha in table.filter(pl.col("sha256").is_not_null()).iter_rows():
            out[path] = out[target] = (sha, image_root)  # pool readers get `path`, example readers the target
    with _lock:
        _cache[root] = (key, out)
    return out


def _roots() -> list[Path]:
    from store.paths import DATA_ROOT_ENV, last_data_root

    roots = list(_registered)
    for candidate in (last_data_root(), os.environ.get(DATA_ROOT_ENV) or "data"):
        if candidate is not None:
            path = Path(candidate).expanduser().resolve()
            if path not in roots:
                roots.append(path)
    return roots


def recorded(path: str | os.PathLike) -> tuple[str, str] | None:
    """(sha256, image root) that ingest recorded for `path`, or None when no known ledger holds it."""
    keys = {str(path), str(Path(path).expanduser().absolute())}
    for root in _roots():
        records = _records(root)
        for k in keys:
            if k in records:
                return records[k]
    return None


def _no_ledger(roots: list[Path], reader: str) -> str:
    from store.paths import DATA_ROOT_ENV

    where = ", ".join(str(r) for r in roots)
    env = os.environ.get(DATA_ROOT_ENV)
    return (f"no image ledger under the data root {where} (ingest writes <data root>/ledger/*.parquet when it "
            f"materialises pool_images / preference_examples); {reader} reads only images whose sha256 ingest "
            f"recorded there. Point --data_root or {DATA_ROOT_ENV} (now {env or 'unset'}) at the data root the "
            "shards were mined in, or run ingest into this one")


def require_ledger(root: str | os.PathLike, reader: str = "the trainer") -> None:
    """Raise `LedgerMissingError` (naming `root` and `$MISP_DATA_ROOT`) unless `root` holds an image ledger: a
    reader that must verify every image fails at its start, not at its first image."""
    root = Path(root).expanduser().resolve()
    if not ledger_files(root):
        raise LedgerMissingError(_no_ledger([root], reader))


def open_ingested(path: str | os.PathLike, limits: IngestLimits = IngestLimits(), *,
                  required: bool = False) -> Image.Image:
    """`open_image` for a reader that only has the path: the root and sha256 come from the ingest ledger
    (`use_data_root`, the last `store.paths.data_root()`, `$MISP_DATA_ROOT` or ./data). An image no ledger
    records (a benchmark's images) is still checked for type, size and format, and read upright, unless
    `required` (the trainer, whose every image came through ingest): then it raises `LedgerMissingError` when
    no ledger is found, or `UnsafeImageError` when the ledgers found do not record the image."""
    record = recorded(path)
    if record is None:
        if required:
            roots = _roots()
            found = [r for r in roots if ledger_files(r)]
            if not found:
                raise LedgerMissingError(f"image {path}: " + _no_ledger(roots, "the trainer"))
            raise UnsafeImageError(
                f"image {path} is not recorded in the image ledger of {', '.join(map(str, found))}: it did not come "
                "through ingest there. Point --data_root or MISP_DATA_ROOT at the data root the shards were mined "
                "in, or re-ingest"
            )
        return open_image(path, limits=limits)
    sha, root = record
    return open_image(path, root=root, sha256=sha, limits=limits)


def ledger_file(root: Path, source: str, key: str) -> Path:
    """`<data root>/ledger/<source>-shard=NNN.parquet`: the image ledger of one ingest shard."""
    from store.paths import shard_file

    return shard_file(Path(root) / "ledger", key, prefix=f"{source}-shard=")


class ImageOpener:
    """`open_image` bound to a shard's ledger: each path is checked against the root ingest recorded for it."""

    def __init__(self, roots: dict[str, str], limits: IngestLimits = IngestLimits()):
        self.roots = roots
        self.limits = limits

    @classmethod
    def from_ledger(cls, ledger: pl.DataFrame | None, limits: IngestLimits = IngestLimits()) -> ImageOpener:
        roots: dict[str, str] = {}
        if ledger is not None:
            for path, target, root in ledger.select("path", "target", "root").iter_rows():
                roots[path] = root
                if target is not None:
                    roots[target] = root
        return cls(roots, limits)

    def __call__(self, path: str, sha256: str | None) -> Image.Image:
        return open_image(path, root=self.roots.get(str(path)), sha256=sha256, limits=self.limits)
