"""Reading .apack files: mmap, validate the index up front, decode blobs lazily.

Opening reads the preamble and index only. Raw blobs come back as zero-copy read-only
numpy views of the mmap; compressed blobs decode into a buffer sized by the validated
index. Each blob's CRC-32C is checked the first time it is read (``verify=True``); a read of
a blob's first rows checks the CRC of a prefix checkpoint, or reads and checks the whole blob.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from adapterpack import codecs, dtypes
from adapterpack.adapter import Adapter, StoredTensor
from adapterpack.checksum import crc32c, crc32c_combine, crc32c_of_zeros
from adapterpack.container import prefix
from adapterpack.container.index import AdapterRecord, BlobEntry, Index, index_text, read_index
from adapterpack.container.preamble import MAGIC, PREAMBLE_SIZE, Preamble, parse_preamble
from adapterpack.container.records import build_adapter
from adapterpack.errors import AdapterNotFoundError, AdapterpackError, ChecksumError, CodecError, TruncatedFileError
from adapterpack.limits import SHARED_CACHE_BYTES


@dataclass
class VerifyReport:
    """What ``verify`` found: problems (empty when the file is sound) and totals."""

    path: str
    problems: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes_checked: int = 0
    skipped: list[str] = field(default_factory=list)
    version: str = ""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (with ``ok``)."""
        return {"path": self.path, "ok": self.ok} | {k: v for k, v in self.__dict__.items() if k != "path"}


#: Spec dtype name -> numpy dtype, for raw blobs read without more checks than the CRC (every dtype but bool);
#: filled as dtypes are first read, so a bfloat16 file imports ml_dtypes on its first read as before.
_NUMPY_RAW: dict[str, np.dtype] = {}

#: Below this many bytes :meth:`ApackReader.check_raw_blobs` uses one thread (starting others costs more).
PARALLEL_CRC_BYTES = 8 << 20
#: A file whose blobs take at most this many bytes has all their pages mapped at once (one system call, see
#: :func:`_populate`) on the first read that checks a CRC: reading an adapter usually reads all of it, and its
#: CRCs read every byte; a larger file maps the pages of each blob as it is read.
POPULATE_BYTES = 16 << 20


#: A verified numpy read checks the file's size (one ``fstat``, against SIGBUS: see :class:`ApackReader`) unless the last
#: such check was less than this many nanoseconds ago: a few checks per load of hundreds of small blobs, not one each.
SIZE_CHECK_NS = 1_000_000


def _split_by_bytes(items: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """``items`` in order, cut into at most ``parts`` runs of about equal total size."""
    total, out, run, acc = sum(sizes), [], [], 0
    for item, size in zip(items, sizes):
        run.append(item)
        acc += size
        if acc * parts >= total * (len(out) + 1) and len(out) < parts - 1:
            out.append(run)
            run = []
    if run:
        out.append(run)
    return out


#: ``madvise`` advice that maps every page of a range in one call, reading it in where needed (Linux 5.14+): the
#: page tables of a pass over every byte are filled in one system call instead of one page fault per few pages.
#: It only reads: on a copy-on-write mapping the pages stay shared with the page cache (``MAP_POPULATE`` would copy them).
MADV_POPULATE_READ = 22
_populate_works = hasattr(mmap.mmap, "madvise") and os.name == "posix"


def _populate(mm: mmap.mmap, start: int, stop: int) -> None:
    """Map the pages of ``mm[start:stop]`` before a pass that reads all of them (a no-op where the kernel cannot)."""
    global _populate_works
    if not _populate_works or stop <= start:
        return
    page = start - start % mmap.PAGESIZE
    try:
        mm.madvise(MADV_POPULATE_READ, page, stop - page)
    except (OSError, ValueError):  # kernel before 5.14, or not Linux: the pass faults the pages in itself
        _populate_works = False


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _crc_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of at least ``workers`` threads, kept for the process (no thread started per load)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            # the smaller pool is not shut down: another thread may hold it and be about to submit; its threads end once
            # it is no longer referenced
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="apack-crc"), workers
        return _pool


def _submit(pool: ThreadPoolExecutor, fn: Any, *args: Any, **kw: Any) -> Future[Any]:
    """``pool.submit(fn, ...)``, or ``fn`` run here and now once the interpreter is shutting down (a load from an ``atexit``
    handler), when no pool takes work any more."""
    try:
        return pool.submit(fn, *args, **kw)
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kw))
        except Exception as e:
            f.set_exception(e)
        return f


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it starts a pool of its own when it needs one."""
    global _pool, _pool_lock, _pool_size
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


class BlobLoader:
    """Reads blob ``index`` of an open file: the ``loader`` of every :class:`StoredTensor` a reader hands out.

    Public so that a consumer holding a stored tensor can find the file and blob behind it (the torch
    loader stages all blobs of one file at once through :meth:`ApackReader.blob_bytes`).
    """

    __slots__ = ("index", "reader")

    def __init__(self, reader: ApackReader, index: int) -> None:
        self.reader = reader
        self.index = index

    def __call__(self) -> np.ndarray:
        return self.reader.read_blob(self.index)

    def rows(self, n: int) -> np.ndarray:
        """The first ``n`` rows, as :meth:`ApackReader.read_rows` reads them."""
        return self.reader.read_rows(self.index, n)


class RawCheck:
    """CRC-32C checks of raw blobs running in the kept pool (:meth:`ApackReader.start_raw_check`).

    Waited for in a child forked meanwhile, which has none of the pool's threads (their futures would never finish there),
    it checks the blobs itself."""

    def __init__(self, reader: ApackReader, parts: list[tuple[list[int], Future[int]]], mv: memoryview | None = None) -> None:
        self._reader = reader
        self._parts = parts
        self._pid = os.getpid()
        # the mapping the threads read, held until wait(): a span that does not match is checked blob by blob in it, even
        # once the reader is closed (a view held keeps a mapping open)
        self._mv = mv

    def wait(self) -> None:
        """Wait for the checks; a ChecksumError names the first damaged blob. Every blob checked is marked so."""
        parts, self._parts = self._parts, []
        mv, self._mv = self._mv, None
        reader = self._reader
        if os.getpid() != self._pid:  # a forked child: the threads are not here; each blob is checked in this one
            for part, _ in parts:
                self._each(part, mv)
                reader._verified.update(part)
            return
        blobs = reader.index.blobs
        wants = []
        for part, _ in parts:  # while the threads run
            want, end = 0, None
            for i in part:
                b = blobs[i]
                if end is not None and b.offset > end:  # zero padding before the blob
                    want = crc32c_combine(want, crc32c_of_zeros(b.offset - end), b.offset - end)
                want = crc32c_combine(want, b.crc32c, b.length)
                end = b.offset + b.length
            wants.append(want)
        for _, f in parts:
            f.exception()  # every thread done with the mapping before anything is raised
        for (part, f), want in zip(parts, wants):
            if f.exception() is not None or f.result() != want:
                self._each(part, mv)
            reader._verified.update(part)

    def _each(self, part: list[int], mv: memoryview | None) -> None:
        """Check blobs ``part`` one at a time: a ChecksumError names the damaged one (or the span held damaged padding)."""
        reader = self._reader
        if mv is None:
            reader.check_raw_blobs(part)
            return
        reader._intact(mv.obj)  # type: ignore[arg-type]
        start, blobs = reader.data_start, reader.index.blobs
        for i in part:
            b = blobs[i]
            if crc32c(mv[start + b.offset : start + b.offset + b.length]) != b.crc32c:
                raise reader._damaged(i)

    def drain(self) -> None:
        """Wait for the threads to let go of the mapping, checking nothing (the load failed anyway)."""
        parts, self._parts = self._parts, []
        self._mv = None
        if os.getpid() != self._pid:  # a forked child: no thread of the pool is here to let go of anything
            return
        for _, f in parts:
            f.exception()


class ApackReader:
    """An open .apack file. Use :meth:`adapter` to get an :class:`Adapter`.

    ``copy_on_write`` maps the file privately and writable (``MAP_PRIVATE``): what is written to the mapping
    stays in this process and never reaches the file, so its bytes can back writable tensors (torch has no
    read-only tensors). numpy arrays from :meth:`read_blob` are read-only views either way. A blob's CRC is checked on
    its first read only: bytes written through a writable tensor are what later reads of this reader return.

    The file must not be truncated or rewritten in place while it is open (replacing it, a new file renamed over it as
    ``adapterpack`` writes, is safe: the mapping keeps the old one). A page past the end of a file that has shrunk is
    SIGBUS, which kills the process: every read that touches the mapping first checks the file's size (one ``fstat``)
    and raises TruncatedFileError (a verified numpy read of a raw blob skips the check when the last one was less than
    :data:`SIZE_CHECK_NS` ago); arrays and tensors already handed out are views of the mapping, and unprotected.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True, copy_on_write: bool = False) -> None:
        self._setup(Path(path), verify, copy_on_write)
        try:
            with open(self.path, "rb") as f:
                self._open(f, f.read(PREAMBLE_SIZE))
        except AdapterpackError as e:
            self.close()
            raise type(e)(f"{self.path}: {e}") from None

    @classmethod
    def open_if_apack(
        cls, path: str | os.PathLike[str], *, verify: bool = True, copy_on_write: bool = False
    ) -> ApackReader | None:
        """The file at ``path`` opened as an ``.apack`` when it is one (its magic, or the ``.apack`` suffix), else None
        (a folder, another kind of file, or no file); the file is opened once either way."""
        p = Path(path)
        try:
            f = open(p, "rb")
        except OSError:
            return None
        with f:
            head = f.read(PREAMBLE_SIZE)
            if head[: len(MAGIC)] != MAGIC and p.suffix != ".apack":
                return None
            reader = cls.__new__(cls)
            reader._setup(p, verify, copy_on_write)
            try:
                reader._open(f, head)
            except AdapterpackError as e:
                reader.close()
                raise type(e)(f"{p}: {e}") from None
        return reader

    def _setup(self, path: Path, verify: bool, copy_on_write: bool) -> None:
        self.path = path
        self.verify_checksums = verify
        self.copy_on_write = copy_on_write
        self._verified: set[int] = set()
        #: blob -> rows of its longest prefix checkpoint checked so far (rank-j reads of raw blobs)
        self._verified_rows: dict[int, int] = {}
        self._shared: set[int] = set()
        #: shared blobs decoded and kept (strong references), their bytes at most SHARED_CACHE_BYTES in all
        self._decoded: dict[int, np.ndarray] = {}
        self._decoded_bytes = 0
        #: every shared blob decoded that is still alive somewhere (kept here or held by a caller)
        self._alive: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._mm: mmap.mmap | None = None
        self._populated = False  # the blob pages mapped for CRC reads (files up to POPULATE_BYTES)
        self._users = 0  # adapters handed out and not yet closed (see adapter())
        self._lock = threading.Lock()  # the shared-blob cache's bookkeeping, across threads
        self._sized = -(1 << 62)  # time.monotonic_ns() of the last size check by a numpy read (see SIZE_CHECK_NS)

    def _open(self, f: BinaryIO, head: bytes) -> None:
        size = os.fstat(f.fileno()).st_size
        self.preamble: Preamble = parse_preamble(head, size)  # refuses files under 32 bytes, so the mmap is never empty
        access = mmap.ACCESS_COPY if self.copy_on_write else mmap.ACCESS_READ
        self._mm = mmap.mmap(f.fileno(), 0, access=access)
        self.file_size = size
        pre = self.preamble
        index_bytes = self._mm[PREAMBLE_SIZE : PREAMBLE_SIZE + pre.index_length]
        if crc32c(index_bytes) != pre.index_crc32c:
            raise ChecksumError("index checksum mismatch (file corrupt or edited)")
        self.data_start = pre.data_start
        text = index_text(index_bytes, pre.compressed_index)  # the CRC covers the stored bytes, checked first (spec §10.2)
        #: Bytes of the index's JSON text (``preamble.index_length`` is what the file stores: fewer when compressed).
        self.index_text_length = len(text)
        self.index: Index = read_index(text, pre.data_start, size, pre.packed, pre.implied, pre.unaligned)
        self.version = f"{pre.major}.{pre.minor}"
        blobs = self.index.blobs
        # compressed blobs that several records reference (a bank's U and V) are decoded once and kept
        self._shared = {i for i, n in enumerate(self.index.refs or ()) if n > 1 and blobs[i].codec_id != "raw"}

    # --- blobs ----------------------------------------------------------------------------------

    @property
    def blobs(self) -> list[BlobEntry]:
        """The validated blob table."""
        return self.index.blobs

    def _mapping(self) -> mmap.mmap:
        if self._mm is None:
            raise AdapterpackError(f"{self.path}: file is closed")
        return self._mm

    @property
    def buffer(self) -> memoryview:
        """The whole mapped file (writable only with ``copy_on_write``); blob ``i``'s stored bytes start at
        :meth:`blob_offset`. Views taken from it keep the mapping alive after :meth:`close`."""
        return memoryview(self._mapping())

    def _intact(self, mm: mmap.mmap) -> None:
        """Refuse to touch ``mm`` when its file has shrunk since it was opened (see the class docstring)."""
        try:
            size = mm.size()  # fstat of the mapping's own descriptor
        except (ValueError, OSError):  # closed meanwhile, by another thread
            raise AdapterpackError(f"{self.path}: file is closed") from None
        if size < self.file_size:
            raise TruncatedFileError(
                f"{self.path}: the file has {size} bytes, {self.file_size} when it was opened: truncated or rewritten in place "
                "since (reopen it)"
            )

    def _holds(self, i: int) -> str:
        """``; it holds module 'NAME' A``: what blob ``i`` holds, for the end of an error message about it."""
        u = self.blob_users().get(i, [])
        return "; it holds " + ", ".join(u[:2]) + (f" and {len(u) - 2} more" if len(u) > 2 else "") if u else ""

    def _damaged(self, i: int, what: str = "checksum mismatch (decoded bytes are corrupt)") -> ChecksumError:
        return ChecksumError(f"{self.path}: blob {i}: {what}{self._holds(i)}")

    def blob_offset(self, i: int) -> int:
        """Where blob ``i``'s stored bytes start in the file (for a raw blob a multiple of 8, spec §1.2)."""
        return self.data_start + self.index.blobs[i].offset

    def blob_bytes(self, i: int) -> memoryview:
        """Blob ``i``'s stored bytes, in place (for a ``raw`` blob: its decoded bytes); nothing is checked."""
        start = self.blob_offset(i)
        mm = self._mapping()
        self._intact(mm)  # its caller reads it: a shrunk file would be SIGBUS
        return memoryview(mm)[start : start + self.index.blobs[i].stored_length]

    def check_blob(self, i: int, data: bytes | memoryview) -> None:
        """Check ``data``, blob ``i``'s decoded bytes, against its CRC-32C (once per blob: later calls return)."""
        if i in self._verified:
            return
        if crc32c(data) != self.index.blobs[i].crc32c:
            raise self._damaged(i)
        self._verified.add(i)

    def check_raw_blobs(self, indices: Sequence[int], *, threads: int = 1) -> None:
        """Check the CRC-32C of raw blobs ``indices`` over their bytes in the mapping, in one pass (the first touch
        of those pages); with ``threads`` > 1 and enough bytes, the blobs are split between that many threads of
        a pool kept for the process (the CRC runs without the GIL). Blobs already checked are skipped; a mismatch
        is a ChecksumError.

        The calling thread maps the pages of its own blobs in one system call (:func:`_populate`) before its pass;
        the pool's threads fault theirs in as they go, in parallel with it (``madvise`` holds the GIL, so mapping
        every part first in this thread would make the others wait for it).
        """
        blobs = self.index.blobs
        todo = [i for i in indices if i not in self._verified]
        if any(blobs[i].codec["id"] != "raw" for i in todo):
            raise AdapterpackError("check_raw_blobs takes raw blobs only")
        if not todo:
            return
        mm = self._mapping()
        self._intact(mm)
        start = self.data_start
        mv = memoryview(mm)

        def crcs(part: list[int]) -> list[int]:
            return [crc32c(mv[start + blobs[i].offset : start + blobs[i].offset + blobs[i].length], release=True) for i in part]

        total = sum(blobs[i].length for i in todo)
        parts = [todo]
        if threads > 1 and total >= PARALLEL_CRC_BYTES and len(todo) > 1:
            parts = _split_by_bytes(todo, [blobs[i].length for i in todo], threads)
        later = [_submit(_crc_pool(len(parts) - 1), crcs, part) for part in parts[1:]] if len(parts) > 1 else []
        mine = parts[0]
        _populate(mm, start + min(blobs[i].offset for i in mine), start + max(blobs[i].offset + blobs[i].length for i in mine))
        got = crcs(mine)
        for f in later:
            got += f.result()
        for i, value in zip(todo, got):
            if value != blobs[i].crc32c:
                raise self._damaged(i)
            self._verified.add(i)

    def start_raw_check(self, indices: Sequence[int], *, threads: int) -> RawCheck:
        """Start checking the CRC-32C of raw blobs ``indices`` in the kept thread pool and return at once, so the caller
        can do its own work meanwhile; :meth:`RawCheck.wait` (before any of those bytes is handed out) raises a
        ChecksumError naming a damaged blob, as :meth:`check_raw_blobs` does.

        Each of ``threads`` threads takes one contiguous span of the file (blobs and the zero padding between them)
        in ONE ``crc32c`` call: a thread that went back to Python between blobs would wait for the GIL while the
        caller runs Python. The span's CRC is compared with the one its blobs' CRCs give combined
        (:func:`~adapterpack.checksum.crc32c_combine`: CRC-32C is linear), which differs whenever any one blob or the
        padding differs; on a mismatch every blob of the span is checked on its own to name the damaged one.
        Blobs that are not one run of raw blobs, or too few bytes to split, are checked here and now."""
        blobs = self.index.blobs
        todo = sorted({i for i in indices if i not in self._verified})
        if any(blobs[i].codec["id"] != "raw" for i in todo):
            raise AdapterpackError("check_raw_blobs takes raw blobs only")
        adjacent = bool(todo) and todo[-1] - todo[0] == len(todo) - 1  # one run: blob order is file order (spec §1.2)
        if threads < 2 or len(todo) < 2 or not adjacent or sum(blobs[i].length for i in todo) < PARALLEL_CRC_BYTES:
            self.check_raw_blobs(todo, threads=threads)
            return RawCheck(self, [])
        mm = self._mapping()
        self._intact(mm)
        mv = memoryview(mm)
        start = self.data_start
        parts = _split_by_bytes(todo, [blobs[i].length for i in todo], threads)
        pool = _crc_pool(len(parts))
        spans = [(start + blobs[p[0]].offset, start + blobs[p[-1]].offset + blobs[p[-1]].length) for p in parts]
        futures = [_submit(pool, crc32c, mv[a:b], release=True) for a, b in spans]
        return RawCheck(self, list(zip(parts, futures)), mv)

    def _stored(self, b: BlobEntry) -> memoryview:
        start = self.data_start + b.offset
        return memoryview(self._mapping())[start : start + b.stored_length]

    def read_blob(self, i: int) -> np.ndarray:
        """Blob ``i`` decoded as a numpy array (read-only view for raw blobs).

        A compressed blob that several records reference is decoded once and the read-only array
        kept, so reading every member of a bank decodes its shared bases once, not once per member;
        kept while the kept arrays total at most :data:`~adapterpack.limits.SHARED_CACHE_BYTES`
        (beyond that, one is reused only while a caller still holds it), so memory stays bounded.
        """
        if i not in self._shared:
            return self._read(i, self.verify_checksums)
        arr = self._alive.get(i)
        if arr is not None:
            return arr
        arr = self._read(i, self.verify_checksums)
        arr.flags.writeable = False
        with self._lock:
            kept = self._alive.get(i)
            if kept is not None:  # another thread decoded it meanwhile: one array for all, counted once
                return kept
            self._alive[i] = arr
            if self._decoded_bytes + arr.nbytes <= SHARED_CACHE_BYTES:
                self._decoded[i] = arr
                self._decoded_bytes += arr.nbytes
        return arr

    def _read(self, i: int, check_crc: bool) -> np.ndarray:
        mm = self._mm
        if mm is None:
            raise AdapterpackError(f"{self.path}: file is closed")
        b = self.index.blobs[i]
        npdt = _NUMPY_RAW.get(b.dtype) if b.codec["id"] == "raw" else None
        if npdt is None:  # compressed, bool (its bytes are checked) or not looked up yet
            return self._decode(mm, i, b, check_crc)
        # the common case (a raw blob of numbers), with no more Python per blob than it needs
        # frombuffer holds the mapping's buffer while the array lives (np.ndarray(buffer=...) lets it go,
        # so close() would leave the array dangling)
        try:
            arr = np.frombuffer(mm, npdt, b.length // npdt.itemsize, self.data_start + b.offset).reshape(b.shape)
        except ValueError:  # another thread's close() closed the mapping since it was taken above
            raise AdapterpackError(f"{self.path}: file is closed") from None
        if self.copy_on_write:
            arr.flags.writeable = False
        if check_crc and i not in self._verified:
            now = time.monotonic_ns()
            if now - self._sized > SIZE_CHECK_NS:  # the file's size, once per run of reads (see the class docstring)
                self._intact(mm)
                self._sized = now
            if not self._populated:
                self._populated = True
                if self.file_size - self.data_start <= POPULATE_BYTES:
                    _populate(mm, self.data_start, self.file_size)
            if crc32c(arr) != b.crc32c:  # the array's own buffer: its bytes, in place
                raise self._damaged(i)
            self._verified.add(i)
        return arr

    def _decode(self, mm: mmap.mmap, i: int, b: BlobEntry, check_crc: bool) -> np.ndarray:
        """:meth:`_read` of any blob (compressed, bool, or the first of its dtype: it learns the numpy dtype)."""
        dt = dtypes.by_name(b.dtype)
        self._intact(mm)
        try:
            if b.codec["id"] == "raw":
                if dt.name != "bool":
                    _NUMPY_RAW[dt.name] = dt.numpy
                start = self.data_start + b.offset
                arr = np.frombuffer(mm, dt.numpy, b.length // dt.itemsize, start).reshape(b.shape)
                if self.copy_on_write:
                    arr.flags.writeable = False
                data: memoryview | None = memoryview(mm)[start : start + b.length] if check_crc or dt.name == "bool" else None
            else:  # the codec checks the stored headers against b.length before allocating it (spec §5.1)
                buf = codecs.get_codec(b.codec).decode_new(self._stored(b), b.length, dt.itemsize)
                data = memoryview(buf)
                arr = np.frombuffer(buf, dtype=dt.numpy).reshape(b.shape)
            if check_crc and i not in self._verified:
                if crc32c(data) != b.crc32c:  # type: ignore[arg-type]
                    raise ChecksumError("checksum mismatch (decoded bytes are corrupt)")
                self._verified.add(i)
            if dt.name == "bool" and b.length and np.frombuffer(data, np.uint8).max() > 1:  # type: ignore[arg-type]
                raise CodecError("a bool element is neither 0 nor 1")
        except AdapterpackError as e:
            raise type(e)(f"{self.path}: blob {i}: {e}{self._holds(i)}") from None
        return arr

    def read_rows(self, i: int, rows: int) -> np.ndarray:
        """The first ``rows`` rows (axis 0) of blob ``i``, never unchecked bytes when verifying (spec §2.1, §8).

        A raw blob with prefix CRCs is viewed in place up to the least checkpoint at or past ``rows``,
        whose CRC-32C is checked: only those bytes are touched. Any other blob (compressed, or without
        prefix CRCs) is read whole, its CRC checked as usual, and sliced; zero rows read nothing. Without ``verify`` a raw blob
        is viewed up to ``rows`` and nothing is checked.
        """
        b = self.index.blobs[i]
        rows = max(rows, 0)
        if not rows and b.shape and b.shape[0]:  # nothing to read, so nothing to check, whatever the codec (spec §8.1)
            empty = np.empty((0, *b.shape[1:]), dtypes.by_name(b.dtype).numpy)
            empty.flags.writeable = False
            return empty
        if b.codec_id != "raw" or not b.shape or rows >= b.shape[0]:
            return self.read_blob(i)[:rows]
        check = self.verify_checksums and rows > 0 and i not in self._verified
        stop = prefix.checkpoint(b.shape[0], rows) if check else rows
        if check and (stop == b.shape[0] or not b.prefix_crc32c):
            return self.read_blob(i)[:rows]
        mm = self._mapping()
        if check:
            self._intact(mm)
        dt = dtypes.by_name(b.dtype)
        per_row = int(np.prod(b.shape[1:], dtype=np.int64))
        arr = np.frombuffer(mm, dtype=dt.numpy, count=stop * per_row, offset=self.data_start + b.offset)
        if self.copy_on_write:
            arr.flags.writeable = False
        if check and self._verified_rows.get(i, 0) < stop:
            if crc32c(dtypes.as_bytes(arr)) != b.prefix_crc32c[(stop - 1).bit_length()]:
                raise self._damaged(i, f"checksum mismatch in its first {stop} rows (prefix_crc32c)")
            self._verified_rows[i] = stop
        return arr[: rows * per_row].reshape((rows, *b.shape[1:]))

    def _stored_tensor(self, i: int) -> StoredTensor:
        b = self.index.blobs[i]
        loader = BlobLoader(self, i)
        return StoredTensor(b.dtype, b.shape, b.stored_length, b.codec["id"], loader, loader.rows)

    # --- adapters -------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters in the file, in order."""
        return self.index.adapter_names

    def adapter(self, name: str | None = None) -> Adapter:
        """Build the :class:`Adapter` called ``name`` (the only one when ``None``).

        Closing the adapter releases this reader once every adapter it handed out has been
        closed (sibling adapters of one file share the reader); :meth:`close` closes it at once.
        """
        names = self.adapter_names
        if name is None:
            if len(names) != 1:
                raise AdapterNotFoundError(f"{self.path}: holds {len(names)} adapters ({', '.join(names)}); name one")
            name = names[0]
        if name not in names:
            raise AdapterNotFoundError(f"{self.path}: no adapter {name!r} (has {', '.join(names)})")
        ad = self._build(self.index.records[names.index(name)])
        self._users += 1
        ad.closer = self._release
        return ad

    def _build(self, record: AdapterRecord) -> Adapter:
        try:
            return build_adapter(record, self.index.blobs, self._stored_tensor)
        except AdapterpackError as e:
            raise type(e)(f"{self.path}: {e}") from None

    def _release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self.close()

    # --- whole-file checks ----------------------------------------------------------------------

    def blob_users(self) -> dict[int, list[str]]:
        """What each blob holds, by index: ``module 'NAME' A``, ``tensor 'NAME'`` (with the adapter's name in a
        file of several adapters), for messages that name what is damaged rather than a blob number."""
        users: dict[int, list[str]] = {}
        many = len(self.index.records) > 1
        for rec in self.index.records:
            where = f"adapter {rec.name!r} " if many else ""
            for m in rec.modules:
                for slot, i in m.tensors.items():
                    users.setdefault(int(i), []).append(f"{where}module {m.name!r} {slot}")
            for t in rec.tensors or []:
                users.setdefault(int(t.blob), []).append(f"{where}tensor {t.name!r}")
        return users

    def verify(self) -> VerifyReport:
        """Decode every blob and check its CRC-32C and prefix CRCs, and check that all padding is zero; each
        problem names the module / tensor the blob holds."""
        report = VerifyReport(path=str(self.path), blobs=len(self.blobs), version=self.version)
        users = self.blob_users()

        def holds(i: int) -> str:
            u = users.get(i, [])
            return ", ".join(u[:2]) + (f" and {len(u) - 2} more" if len(u) > 2 else "")

        def named(i: int) -> str:
            return f"blob {i} ({holds(i)})" if holds(i) else f"blob {i}"

        mm = self._mapping()
        self._intact(mm)
        pad_start = PREAMBLE_SIZE + self.preamble.index_length
        if any(mm[pad_start : self.data_start]):
            report.problems.append("padding after the index is not zero")
        prev_end = 0
        for i, b in enumerate(self.blobs):
            if any(mm[self.data_start + prev_end : self.data_start + b.offset]):
                # spec vectors quote "padding before blob N is not zero": what the blob holds comes after it
                report.problems.append(f"padding before blob {i} is not zero" + (f" (blob holds {holds(i)})" if holds(i) else ""))
            prev_end = b.offset + b.stored_length
            if not b.known_codec:
                report.skipped.append(f"{named(i)}: codec {b.codec_id!r} not understood, not checked")
                continue
            self._verified.discard(i)
            try:
                arr = self._read(i, check_crc=True)
                report.bytes_checked += b.length
            except AdapterpackError as e:
                msg = str(e).removeprefix(f"{self.path}: ").removesuffix(self._holds(i))  # named here, in its own words
                report.problems.append(named(i) + msg[len(f"blob {i}") :] if msg.startswith(f"blob {i}:") else f"{named(i)}: {msg}")
                continue
            if b.prefix_crc32c and prefix.prefix_crcs(dtypes.as_bytes(arr), b.shape[0]) != list(b.prefix_crc32c):
                report.problems.append(f"{named(i)}: prefix_crc32c does not match its rows (index or prefix checkpoints corrupt)")
        for record in self.index.records:
            try:
                report.skipped.extend(self._build(record).skipped)
            except AdapterpackError as e:
                report.problems.append(str(e).removeprefix(f"{self.path}: "))
        return report

    def close(self) -> None:
        """Release the mmap (views still held keep it alive until they go)."""
        mm, self._mm = self._mm, None
        with self._lock:
            self._decoded.clear()
            self._decoded_bytes = 0
            self._alive.clear()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still point into it; it is freed with them

    def __enter__(self) -> ApackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
