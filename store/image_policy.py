"""What an image file may be: the decoders we let Pillow use and the limits ingest and every later reader enforce.

Defined here, at the bottom, because two layers enforce it: ingest (`pipeline.image_checks`) when it validates a
file, and the safe opener (`store.safe_image`) each time a validated file is read again.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

# Formats we let PIL try. Restricting them keeps PIL's rarer decoders (EPS through Ghostscript, PSD, ...) away
# from untrusted files; every extension the pool lists maps to one of these (MPO is multi-frame JPEG from cameras).
DECODE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF", "TIFF")


def decode_formats() -> list[str]:
    """DECODE_FORMATS that this Pillow registers (newer Pillow opens MPO through its JPEG plugin)."""
    Image.init()
    return [f for f in DECODE_FORMATS if f in Image.OPEN]


@dataclass(frozen=True)
class IngestLimits:
    """What ingest accepts. Rows beyond a limit are quarantined with the reason named in each field's note."""

    max_pixels: int = 50_000_000
    """Largest width*height, read from the header before decoding (`image_too_large`): stops decompression bombs."""
    min_side: int = 8
    """Smallest accepted min(width, height) (`image_too_small`): thumbnails and 1x1 tracking pixels carry no content."""
    max_text_chars: int = 8192
    """Longest prompt or response, in characters (`text_too_long`)."""
    max_file_bytes: int = 200 * 1024 * 1024
    """Largest image file in bytes (`image_too_large`); each file is read into memory once to hash and decode it."""
    max_id_chars: int = 512
    """Longest example id, in characters (`text_too_long`): ids are keys in every table, log line and cache."""
    max_row_bytes: int = 64 * 1024 * 1024
    """Longest JSON Lines line in bytes (`malformed_row`); a longer line is skipped without being held in memory."""

    def __post_init__(self) -> None:
        for name in ("max_pixels", "min_side", "max_text_chars", "max_file_bytes", "max_id_chars", "max_row_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"IngestLimits.{name}={value!r}: must be a positive integer")
