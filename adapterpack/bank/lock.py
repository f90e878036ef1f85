"""An exclusive lock that serialises read-modify-write of a bank file (``bank add``, ``bank refit``).

The lock is an ``flock`` on the bank file itself: a rewrite renames a new file over the path, so a
writer that was waiting holds a lock on a file that is no longer the bank; it notices (the path's
device and inode differ from its fd's) and locks the new file instead. Readers take no lock: they see
the old file or the new one, never a mix (the rewrite is atomic).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` names, from before it is read until after its
    replacement is in place (the ``with`` body), so concurrent rewrites apply one after the other."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            mine = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                yield
                return
        finally:
            os.close(fd)  # releases the lock
