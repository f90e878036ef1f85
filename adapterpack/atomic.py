"""Atomic output: a file or folder appears whole under its name, or not at all; readers of a folder
see one version of it.

Files are written unnamed in the destination's folder (Linux ``O_TMPFILE``), fsynced, then linked
in, so a killed writer leaves nothing behind. Folders (and files where ``O_TMPFILE`` is missing) are
built under a temp name ``.<name>.<host>-<pid>.<random>.tmp`` beside the destination; a later write to
the same destination removes such leftovers once their writer (same host and PID namespace) is dead.
Where an unnamed file cannot be linked in (no ``/proc/self/fd`` links: gVisor, ``hidepid``), it is
copied to a temp name once, and later writes use temp names.

A folder replaces the old one in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so the name never
points at a mix of old and new files, nor at nothing. Elsewhere the old folder is moved aside first:
for an instant the name is missing, and a crash between the two renames leaves the old folder under
its temp name. :func:`pinned_files` opens a folder's files through one directory descriptor, so a
reader gets one version's files even while a writer swaps another in.

A folder that cannot be swapped is filled in place: a mount point (a container's bind mount), a folder
holding the working directory (a swap would leave the process, and ``.``, in the removed old folder),
or one whose swap fails with EBUSY or EXDEV (a bind mount from the same file system, which
``os.path.ismount`` does not see). This weaker mode still never leaves a mix readable: the
new files are written under a temp folder inside the destination, then the old ``last`` file (a PEFT
config) is moved aside, the other files renamed over the old ones, and ``last`` renamed in at the end
(the old files are held by hard links meanwhile, so that no rename waits for one to be freed). In
between, the folder has no ``last`` file: a reader waits a little and opens it again, then refuses it;
a reader holding the old ``last`` sees it replaced (:func:`pinned_files` checks every file it opened is
still under its name) and opens the folder again. A failure before the first rename puts the old
``last`` back; a kill after the move aside leaves the folder without ``last`` (refused, not mixed) until
the next write. Files of the old folder that the new one does not write stay, as they are carried
over otherwise. Refusing such destinations instead would break the common ``convert … /out --force``
into a bind mount.

Without ``overwrite`` an output is created, never replaced (``link`` for files,
``RENAME_NOREPLACE`` for folders): of two writers creating one path, one wins and the other gets
:class:`~adapterpack.errors.OutputExistsError`. Where the file system has no hard links (files) or
the system no ``renameat2`` (folders), the check and the rename are two steps.

An operating-system error of a write (disk full, permission) is raised as
:class:`~adapterpack.errors.OutputWriteError` naming the destination; folders above the destination
that a failed write created are removed again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from adapterpack.errors import InputError, OutputExistsError, OutputWriteError

#: How many bytes of the destination's name a temp name keeps, so that the whole fits NAME_MAX (255 bytes).
_NAME_KEEP = 200


def _host_tag() -> str:
    """This host and PID namespace, in temp names: a writer's pid means something only there (containers of
    one pod share a host name, not their pids)."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return f"{zlib.crc32(f'{socket.gethostname()}:{ns}'.encode()):08x}"


_HOST = _host_tag()
_TEMP = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")
#: Unnamed temp files need O_TMPFILE and /proc/self/fd (to link one in without privileges).
_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
#: errno values of linking an unnamed file in through /proc/self/fd where that is not allowed.
_NO_PROC_LINK = {errno.ENOENT, errno.EPERM, errno.EACCES}
#: errno values of a folder swap that cannot be done (a mount point, another file system): filled in place.
_NO_SWAP = {errno.EBUSY, errno.EXDEV}
#: errno values saying that a file system cannot do O_TMPFILE, hard links or a renameat2 flag.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EXDEV}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: How often a reader reopens a folder that a writer swapped out while its files were being opened.
_PIN_TRIES = 8
#: Seconds a reader first waits for the last file of a folder a writer fills in place (growing with each try).
_PIN_PAUSE = 0.001
#: Whether files can be opened relative to a folder's descriptor, and reopened by descriptor (/dev/fd/N).
_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
_DEV_FD = _DIR_FD and os.path.isdir("/dev/fd")


def exists_error(dest: str | os.PathLike[str]) -> OutputExistsError:
    """The refusal to replace ``dest`` without being asked to."""
    return OutputExistsError(f"{os.fspath(dest)} already exists (use --force to overwrite)")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _about_output(e: OSError, temp: Path | None) -> bool:
    """Whether an OSError from a writer's own code is about its output: it names no file (a write to the
    output's file object), or one under ``temp`` (the temp folder it fills); or a copy into ``temp`` failed
    the way only a write fails (shutil's copies name the source first and the destination second,
    whichever side failed: disk full, file too large)."""
    if e.filename is None:
        return True
    return _under(e.filename, temp) or (e.errno in _WRITE_ERRNOS and _under(e.filename2, temp))


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _under(filename: object, temp: Path | None) -> bool:
    if temp is None or not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    name = Path(os.fsdecode(filename))
    return name == temp or temp in name.parents


@contextlib.contextmanager
def _naming(dest: Path, *, body: bool = False, temp: Path | None = None) -> Iterator[None]:
    """Raise an OSError inside as OutputWriteError naming ``dest``. Around a writer's own code (``body``),
    only one about the output (:func:`_about_output`): a read of an input names its own path."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as e:
        if body and not _about_output(e, temp):
            raise
        raise OutputWriteError(e.errno, e.strerror or str(e), os.fspath(dest)) from e


@contextlib.contextmanager
def _new_parents(dest: Path) -> Iterator[None]:
    """Create the missing folders above ``dest``; if the write inside fails, remove those it created
    (while still empty)."""
    missing, p = [], dest.parent
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        with _naming(dest):
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):  # another writer made it: not ours to remove
                    d.mkdir()
                    made.append(d)
        yield
    except BaseException:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _stem(dest: Path) -> str:
    """The start of ``dest``'s name that its temp names keep (at most ``_NAME_KEEP`` bytes)."""
    name = dest.name
    while len(os.fsencode(name)) > _NAME_KEEP:
        name = name[:-1]
    return name


def _temp_name(dest: Path) -> Path:
    return dest.parent / f".{_stem(dest)}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # elsewhere os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _remove_stale(dest: Path) -> None:
    """Remove temp files and folders that a dead writer of ``dest`` on this host left beside it."""
    prefix = f".{_stem(dest)}."
    with os.scandir(dest.parent) as entries:
        stale = [
            e
            for e in entries
            if e.name.startswith(prefix)
            and (m := _TEMP.fullmatch(e.name, len(prefix))) is not None
            and m["host"] == _HOST
            and not _alive(int(m["pid"]))
        ]
    for e in stale:
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)


def _temp_file(dest: Path) -> tuple[int, Path | None]:
    """A new file for writing beside ``dest`` with the mode ``open()`` gives: unnamed where the system
    allows (None), else under a temp name."""
    if _TMPFILE:
        try:  # read-write: copied to a temp name where it cannot be linked in (:func:`_named_copy`)
            return os.open(dest.parent, os.O_TMPFILE | os.O_RDWR, 0o666), None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
    tmp = _temp_name(dest)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def _link_unnamed(fd: int, dest: Path) -> None:
    """Give the unnamed file open as ``fd`` the name ``dest`` (FileExistsError when taken)."""
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:  # with a dir fd, os.link is linkat(AT_SYMLINK_FOLLOW): /proc/self/fd/N links the open file itself
        os.link(f"/proc/self/fd/{fd}", dest.name, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def _named_copy(fd: int, dest: Path) -> Path:
    """The unnamed file open as ``fd`` copied (and fsynced) to a temp name beside ``dest``, where it cannot be
    linked in; later writes use temp names from the start."""
    global _TMPFILE
    _TMPFILE = False
    tmp = _temp_name(dest)
    try:
        with os.fdopen(os.dup(fd), "rb") as src, open(tmp, "xb") as dst:
            src.seek(0)
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _create_file(tmp: Path, dest: Path) -> None:
    """Rename the complete file ``tmp`` to ``dest`` unless ``dest`` exists (FileExistsError)."""
    try:
        os.link(tmp, dest)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in _UNSUPPORTED:
            raise
        if os.path.lexists(dest):  # no hard links on this file system: check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dest)) from None
        os.replace(tmp, dest)
    else:
        os.unlink(tmp)


def _publish_file(fd: int, tmp: Path | None, dest: Path, overwrite: bool) -> None:
    """Put the complete file (open as ``fd``, named ``tmp`` or unnamed) in place as ``dest``."""
    if tmp is None:
        try:
            _link_unnamed(fd, dest)
            return
        except FileExistsError:
            if not overwrite:
                raise exists_error(dest) from None
            tmp = _temp_name(dest)  # a name for the rename over the old file
            _link_unnamed(fd, tmp)
        except OSError as e:
            if e.errno not in _NO_PROC_LINK:
                raise
            tmp = _named_copy(fd, dest)
    try:
        if overwrite:
            os.replace(tmp, dest)
        else:
            try:
                _create_file(tmp, dest)
            except FileExistsError:
                raise exists_error(dest) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it becomes ``dest`` in one step (replacing an old file, or with
    ``overwrite`` false raising OutputExistsError if one exists), on error it vanishes."""
    dest = Path(dest)
    with _new_parents(dest):
        with _naming(dest):
            _remove_stale(dest)
            fd, tmp = _temp_file(dest)
        f = os.fdopen(fd, "wb")
        try:
            with _naming(dest, body=True):
                yield f
            with _naming(dest):
                f.flush()
                os.fsync(fd)
                _publish_file(fd, tmp, dest, overwrite)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        finally:
            with contextlib.suppress(OSError):  # flushed on success; on error its buffer is discarded with it
                f.close()
    _fsync_dir(dest.parent)


# --- folders ---------------------------------------------------------------------------------------


@functools.cache
def _renameat2_fn() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc before 2.28, some musl)
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system cannot do it, OSError otherwise."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _create_dir(tmp: Path, dest: Path) -> None:
    """Rename the complete folder ``tmp`` to ``dest`` unless ``dest`` exists (FileExistsError)."""
    if _renameat2(tmp, dest, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dest):  # the fallback: check, then rename, which refuses a non-empty folder
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dest))
    try:
        os.rename(tmp, dest)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dest)) from None
        raise


def _exchange_dir(tmp: Path, dest: Path) -> None:
    """Swap the complete folder ``tmp`` in as ``dest``; the old one ends up at ``tmp`` (or is removed)."""
    if _renameat2(tmp, dest, _RENAME_EXCHANGE):
        return
    old = _temp_name(dest)  # the fallback: the old folder moves aside, the new one in (``dest`` missing in between)
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _swap_in(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Make the complete folder ``tmp`` be ``dest``: created where there is none, else swapped in whole
    (``overwrite``) or refused (OutputExistsError)."""
    if not os.path.lexists(dest):
        try:
            _create_dir(tmp, dest)
            return
        except FileExistsError:
            if not overwrite:
                raise exists_error(dest) from None
    elif not overwrite:
        raise exists_error(dest)
    _exchange_dir(tmp, dest)  # a folder created meanwhile too: replaced as a whole, nothing carried over


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path) -> None:
    """Give ``new`` the mode of ``old`` and every entry of ``old`` it lacks (hard links where possible)."""
    os.chmod(new, stat.S_IMODE(old.stat().st_mode))
    with os.scandir(old) as entries:
        for e in entries:
            target = new / e.name
            if os.path.lexists(target):
                continue
            if e.is_symlink():
                os.symlink(os.readlink(e.path), target)
            elif e.is_dir():
                shutil.copytree(e.path, target, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(e.path, os.fspath(target))


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _refuse_non_folder(dest: Path) -> None:
    if (dest.exists() or dest.is_symlink()) and not dest.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder; not replacing it with one", str(dest))


def _holds_cwd(dest: Path) -> bool:
    try:
        cwd = Path(os.getcwd())
    except OSError:  # the working directory was removed
        return False
    real = Path(os.path.realpath(dest))
    return cwd == real or real in cwd.parents


def _fill_in_place(new: Path, dest: Path, last: str | None, held: Path) -> None:
    """Rename the entries of ``new`` (a folder inside ``dest``) over those of ``dest``: ``last`` is moved aside
    (into ``held``) first and renamed in at the end, so that the folder is never a readable mix."""
    names = sorted(os.listdir(new), key=lambda n: n == last)  # ``last`` at the end
    held.mkdir()
    for n in names[:-1] if last in names else names:  # held open: a rename over them does not free them meanwhile
        with contextlib.suppress(OSError):
            os.link(dest / n, held / n, follow_symlinks=False)
    aside = last is not None and last in names and os.path.lexists(dest / last)
    if aside:
        os.rename(dest / last, held / last)  # type: ignore[operator]
    renamed = False
    try:
        for n in names:
            os.replace(new / n, dest / n)
            renamed = True
    except BaseException:
        if aside and not renamed:  # nothing new is in: the old folder again
            os.rename(held / last, dest / last)  # type: ignore[operator]
        raise
    _fsync_dir(dest)


def _move_into(tmp: Path, names: Sequence[str], new: Path) -> None:
    """Move the entries ``names`` of ``tmp`` into ``new`` (copied where ``new`` is on another file system)."""
    for n in names:
        try:
            os.rename(tmp / n, new / n)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            if (tmp / n).is_dir() and not (tmp / n).is_symlink():
                shutil.copytree(tmp / n, new / n, symlinks=True)
            else:
                shutil.copy2(tmp / n, new / n, follow_symlinks=False)
    _fsync_files(new)


@contextlib.contextmanager
def _in_place(dest: Path, last: str | None) -> Iterator[Path]:
    """:func:`atomic_dir` for a folder that cannot be swapped: filled in place (see the module's text)."""
    inner = _temp_name(dest / dest.name)
    with _naming(dest):
        _remove_stale(dest / dest.name)
        inner.mkdir()
        (inner / "new").mkdir()
    try:
        with _naming(dest, body=True, temp=inner):
            yield inner / "new"
        with _naming(dest):
            _fsync_files(inner / "new")
            _fill_in_place(inner / "new", dest, last, inner / "old")
    finally:
        shutil.rmtree(inner, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    dest: str | os.PathLike[str], *, overwrite: bool = True, carry_over: bool = False, last: str | None = None
) -> Iterator[Path]:
    """Yield an empty temp folder beside ``dest``; on success it becomes ``dest`` in one step.

    An old folder is replaced as a whole (``carry_over``: after the new folder takes its mode and every
    entry it does not write itself; a symbolic link to a folder: the folder it names); with ``overwrite``
    false an existing ``dest`` is OutputExistsError.
    A ``dest`` that exists and is not a folder is refused (NotADirectoryError), before and again after
    the work. On error the old folder is left as it was and the temp folder removed.
    An old folder that cannot be swapped (a mount point, the working directory, EBUSY or EXDEV) is filled
    in place, the new ``last`` file (the one readers check) renamed in at the end (see the module's text).
    """
    dest = Path(os.path.abspath(dest))  # "." has no name to rename, and no parent to build beside
    if dest.is_symlink() and dest.is_dir():
        dest = dest.resolve()  # the folder it names is replaced; the link stays
    _refuse_non_folder(dest)
    if dest.is_dir() and (os.path.ismount(dest) or _holds_cwd(dest)):
        if not overwrite:
            raise exists_error(dest)
        with _in_place(dest, last) as new:
            yield new
        return
    with _new_parents(dest):
        with _naming(dest):
            _remove_stale(dest)
            tmp = _temp_name(dest)
            tmp.mkdir()
        try:
            with _naming(dest, body=True, temp=tmp):
                yield tmp
            _refuse_non_folder(dest)
            with _naming(dest):
                written = os.listdir(tmp)
                if overwrite and carry_over and dest.is_dir():
                    _carry_over(dest, tmp)
                _fsync_files(tmp)
                try:
                    _swap_in(tmp, dest, overwrite)
                except OSError as e:
                    if e.errno not in _NO_SWAP or not overwrite or not dest.is_dir():
                        raise
                    with _in_place(dest, last) as new:
                        _move_into(tmp, written, new)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the new folder after a failure, the old one after a swap
    _fsync_dir(dest.parent)


# --- reading a folder that atomic_dir may swap -----------------------------------------------------


class PinnedFiles:
    """Regular files of one version of a folder, open for reading (:func:`pinned_files`)."""

    def __init__(self, folder: Path, fds: dict[str, int]) -> None:
        self.folder = folder
        self._fds = fds

    def __contains__(self, name: object) -> bool:
        return name in self._fds

    def path(self, name: str) -> str:
        """A path that opens the pinned file ``name`` (``/dev/fd/N``; its plain path where the system has no
        ``/dev/fd``), for readers that take a path."""
        return f"/dev/fd/{self._fds[name]}" if _DEV_FD else os.fspath(self.folder / name)

    def read_bytes(self, name: str) -> bytes:
        """The whole content of the pinned file ``name``."""
        with os.fdopen(os.dup(self._fds[name]), "rb") as f:
            f.seek(0)
            return f.read()

    def close(self) -> None:
        """Close every file."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _open_regular(folder: Path, name: str, dir_fd: int | None) -> int | None:
    """``name`` of ``folder`` (opened in the folder ``dir_fd``) open for reading, or None if it is not there or
    not a regular file (O_NONBLOCK: a FIFO must not block the open); InputError if it cannot be opened."""
    try:
        fd = os.open(name if dir_fd is not None else folder / name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:  # a link loop, a socket (ENXIO), no permission
        raise InputError(f"{folder / name}: cannot open it ({e.strerror or e})") from None
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def _same(fd: int, name: str, dir_fd: int | None, folder: Path) -> bool:
    """Whether the file open as ``fd`` is still ``name`` (of the folder ``dir_fd``)."""
    try:
        now = os.stat(name, dir_fd=dir_fd) if dir_fd is not None else os.stat(folder / name)
    except OSError:
        return False
    was = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (was.st_dev, was.st_ino)


def _open_all(folder: Path, names: Sequence[str]) -> tuple[dict[str, int], bool]:
    """The files ``names`` of ``folder`` that exist, opened through one directory descriptor; and whether
    they may be from two versions: ``folder`` was replaced meanwhile and a file is missing (it may have been
    removed with the old folder), or a file opened is no longer under its name (a writer filling the folder
    in place)."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY) if _DIR_FD else None
    fds: dict[str, int] = {}
    try:
        for n in names:
            if (fd := _open_regular(folder, n, dir_fd)) is not None:
                fds[n] = fd
        moved = not all(_same(fd, n, dir_fd, folder) for n, fd in fds.items())
        pinned = os.fstat(dir_fd) if dir_fd is not None else None
    except BaseException:
        PinnedFiles(folder, fds).close()
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    if pinned is None:
        return fds, moved
    try:
        now = os.stat(folder)
    except OSError:
        return fds, True
    if (now.st_dev, now.st_ino) != (pinned.st_dev, pinned.st_ino):  # one version, unless files were removed with it
        return fds, len(fds) < len(names)
    return fds, moved


@contextlib.contextmanager
def pinned_files(folder: str | os.PathLike[str], names: Sequence[str], *, last: str | None = None) -> Iterator[PinnedFiles]:
    """Open the files ``names`` of ``folder`` (those that exist) through one directory descriptor, so that
    all come from one version of the folder even while :func:`atomic_dir` swaps a new one in.

    A folder swapped out and removed while its files were being opened, or a file replaced meanwhile (a
    writer filling the folder in place), is opened again; InputError if that keeps happening, or if a
    file cannot be opened (naming it). Other files without ``last`` (the file a writer in place renames
    in at the end) are opened again a few times, after short pauses, before they are returned as they are.
    Where the system cannot open files relative to a folder, they are opened by name.
    """
    folder = Path(folder)
    for attempt in range(_PIN_TRIES):
        try:
            fds, mixed = _open_all(folder, names)
        except OSError as e:  # the folder itself
            raise InputError(f"{folder}: cannot open it ({e.strerror or e})") from None
        between = last is not None and last not in fds and bool(fds)  # maybe a write in place between its renames
        if not mixed and (not between or attempt == _PIN_TRIES - 1):
            break
        PinnedFiles(folder, fds).close()
        if between:
            time.sleep(_PIN_PAUSE * (attempt + 1))
    else:
        raise InputError(f"{folder}: its files kept changing while being opened ({_PIN_TRIES} tries); read it again")
    pinned = PinnedFiles(folder, fds)
    try:
        yield pinned
    finally:
        pinned.close()
