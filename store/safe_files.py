"""Open a file only when it is a regular file: never block on a FIFO, never read a device forever.

`open()` on a FIFO blocks until a writer appears, and `/dev/zero` (or a symlink to it named `x.jsonl`) never ends,
so every file the pipeline reads or hashes goes through `open_regular`: the file is opened non-blocking, its type
is taken from the open descriptor (no race between the check and the read), and reads stop at the size the
descriptor reported.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotRegularFileError(ValueError):
    """A path that is a FIFO, a device, a socket or a folder where a regular file is needed."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, *, what: str = "file", max_bytes: int | None = None) -> BinaryIO:
    """`path` opened for binary reading, after checking on the open descriptor that it is a regular file of at
    most `max_bytes` bytes. Raises `FileNotFoundError`, `NotRegularFileError` or `ValueError` (too large),
    each naming `what` and the path."""
    shown = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(shown, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {shown} does not exist") from None
    except IsADirectoryError:
        raise NotRegularFileError(f"{what} {shown} is a folder, not a regular file; point at a file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(
                f"{what} {shown} is {_kind(st.st_mode)}, not a regular file; the pipeline reads regular files only "
                "(copy the data into a file first)"
            )
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"{what} {shown} is {st.st_size:,} bytes, over the limit of {max_bytes:,} bytes")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, *, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (see `open_regular`), at most the size it had when opened."""
    with open_regular(path, what=what, max_bytes=max_bytes) as fh:
        size = os.fstat(fh.fileno()).st_size
        return fh.read(size)


def bounded_reader(fh: BinaryIO) -> io.BufferedReader:
    """`fh` wrapped to stop at the size its descriptor has now: a file that grows while read is read as it was."""
    size = os.fstat(fh.fileno()).st_size
    return io.BufferedReader(_Limited(fh, size))


class _Limited(io.RawIOBase):
    def __init__(self, fh: BinaryIO, size: int):
        self._fh, self._left = fh, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - memoryview from BufferedReader
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        n = self._fh.readinto(view)
        self._left -= n or 0
        return n or 0

    def close(self) -> None:
        self._fh.close()
        super().close()
