"""Atomic output: a temp file (or folder) beside the destination, fsync, rename.

An interrupted write never leaves a partial file under the destination name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it replaces ``dest`` atomically, on error it vanishes."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0o600; give the mode open() would
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


def _refuse_non_folder(dest: Path) -> None:
    if (dest.exists() or dest.is_symlink()) and not dest.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder; not replacing it with one", str(dest))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp folder; on success it becomes ``dest`` (replacing an old folder, with
    everything in it). A ``dest`` that exists and is not a folder is refused (NotADirectoryError),
    before and again after the work, instead of being moved aside and left behind."""
    dest = Path(dest)
    parent = dest.parent
    _refuse_non_folder(dest)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0o700; give the mode mkdir() would
        yield tmp
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        _refuse_non_folder(dest)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=parent))
            old.rmdir()
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
