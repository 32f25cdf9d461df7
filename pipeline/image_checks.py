"""Is this file an image we can use? Header checks before decoding, then one full decode.

Shared by pool and example ingest. Every failure is a (reason, detail) pair for the quarantine table;
nothing PIL raises or warns escapes `check_image`.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageFile

from store.image_policy import IngestLimits, decode_formats


IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ImageInfo(NamedTuple):
    """A usable image: the hash of its bytes and its stored size (before any EXIF rotation)."""

    sha256: str
    width: int
    height: int
    mode: str


class ImageProblem(NamedTuple):
    """Why an image is not usable: a quarantine reason and a detail that says what to do."""

    reason: str
    detail: str


def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _riff_truncated(data: bytes) -> bool:
    """A RIFF (WebP) file shorter than its header says: PIL reports that as a decoder error, not as truncation."""
    if len(data) < 12 or data[:4] != b"RIFF":
        return False
    declared = int.from_bytes(data[4:8], "little") + 8
    return len(data) < declared


def check_image(path: Path, limits: IngestLimits) -> ImageInfo | ImageProblem:
    """Check one image file. The file is read once; header limits are enforced before pixels are decoded."""
    shown = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ImageProblem("missing_file", f"{shown} does not exist; fix the path or add the file")
    except OSError as exc:
        return ImageProblem("missing_file", f"{shown} cannot be read ({exc.strerror or exc}); check permissions")
    if not os.path.isfile(path):
        return ImageProblem("missing_file", f"{shown} is not a regular file (a folder?); point at an image file")
    if st.st_size == 0:
        return ImageProblem("empty_file", f"{shown} is 0 bytes (an interrupted download?); download it again")
    if st.st_size > limits.max_file_bytes:
        return ImageProblem(
            "image_too_large",
            f"{shown} is {_fmt_mb(st.st_size)} > max_file_bytes={_fmt_mb(limits.max_file_bytes)}; "
            "downscale or re-encode it, or raise IngestLimits.max_file_bytes",
        )
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return ImageProblem("missing_file", f"{shown} cannot be read ({exc.strerror or exc}); check permissions")
    if not data:  # emptied between stat and read
        return ImageProblem("empty_file", f"{shown} is 0 bytes (an interrupted download?); download it again")
    sha256 = hashlib.sha256(data).hexdigest()

    with warnings.catch_warnings():
        # We apply our own pixel limit below; PIL's warnings (bomb warning, odd EXIF, palette transparency)
        # are not reasons to reject a file and must not reach the caller's warning filters.
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data), formats=decode_formats())
        except Image.DecompressionBombError as exc:
            return ImageProblem(
                "image_too_large",
                f"{shown}: PIL refused to open it as a decompression bomb ({exc}); if it is genuine, downscale it",
            )
        except Image.UnidentifiedImageError:
            return ImageProblem(
                "undecodable_image",
                f"{shown} is not a readable PNG, JPEG, WebP, BMP, GIF or TIFF image "
                "(corrupt header, or another format); re-export it as PNG or JPEG",
            )
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
            if _riff_truncated(data):  # WebP checks its whole stream when opening
                return ImageProblem(
                    "truncated_image",
                    f"{shown} ({len(data):,} bytes) is shorter than its RIFF header says ({type(exc).__name__}: "
                    f"{exc}); download or copy it again",
                )
            return ImageProblem(
                "undecodable_image", f"{shown}: PIL cannot read the header ({type(exc).__name__}: {exc}); re-export it"
            )
        with im:
            width, height = im.size
            if width * height > limits.max_pixels:
                return ImageProblem(
                    "image_too_large",
                    f"{shown} header says {width}x{height} = {width * height:,} pixels > max_pixels="
                    f"{limits.max_pixels:,}; downscale it or raise IngestLimits.max_pixels",
                )
            if min(width, height) < limits.min_side:
                return ImageProblem(
                    "image_too_small",
                    f"{shown} is {width}x{height}, smaller than min_side={limits.min_side} on a side; "
                    "drop it or lower IngestLimits.min_side",
                )
            fmt = im.format or "?"
            # Another stage may have set LOAD_TRUNCATED_IMAGES (PIL then pads truncated files with grey);
            # ingest must see truncation, so it is off while we decode and restored afterwards.
            padding = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                im.load()
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
                message = f"{type(exc).__name__}: {exc}"
                if "truncat" in str(exc).lower() or isinstance(exc, EOFError) or _riff_truncated(data):
                    return ImageProblem(
                        "truncated_image",
                        f"{shown} ({fmt}, {len(data):,} bytes) ends before its pixel data does ({message}); "
                        "download or copy it again",
                    )
                return ImageProblem(
                    "undecodable_image", f"{shown} ({fmt}): decoding the pixels failed ({message}); re-export it"
                )
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = padding
            return ImageInfo(sha256=sha256, width=int(width), height=int(height), mode=im.mode)
