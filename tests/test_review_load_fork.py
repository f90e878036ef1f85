"""fork (multiprocessing's default start method on Linux) with the load path's kept CRC pool and a pending RawCheck."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader
from adapterpack.container import reader as reader_mod

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _file(tmp_path: Path, flip: bool = False) -> tuple[Path, int]:
    rng = np.random.default_rng(5)
    f32 = np.float32
    mods = {
        f"m{k}": Module(f"m{k}", "lora", (64, 96), {"rank": 8, "alpha": 8.0},
                        {"A": rng.standard_normal((8, 96)).astype(f32), "B": rng.standard_normal((64, 8)).astype(f32)})
        for k in range(6)
    }  # fmt: skip
    path = tmp_path / "a.apack"
    adapterpack.save(Adapter(modules=mods), path, codec="raw")
    with ApackReader(path) as r:
        mid = len(r.blobs) // 2
        pos = r.data_start + r.blobs[mid].offset + 3
    if flip:
        data = bytearray(path.read_bytes())
        data[pos] ^= 0x10
        path.write_bytes(bytes(data))
    return path, mid


def _child_exit_code(child: object, timeout: float = 10) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = child()  # type: ignore[operator]
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return -999  # hung
        time.sleep(0.01)


@pytest.fixture
def busy_pool(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The kept pool's threads all busy, so a check started now is still queued when the process forks."""
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    release = threading.Event()
    pool = reader_mod._crc_pool(2)
    blockers = [pool.submit(release.wait, 30) for _ in range(2)]
    yield release
    release.set()
    for f in blockers:
        f.result()


@pytest.mark.parametrize("flip", [False, True])
def test_a_raw_check_started_in_the_parent_is_waited_in_a_forked_child(
    tmp_path: Path, busy_pool: threading.Event, flip: bool
) -> None:
    """The child has none of the parent's pool threads: waiting on their futures would hang it for ever. It checks the
    blobs itself: sound blobs are verified, a damaged one is a ChecksumError naming it."""
    from adapterpack.errors import ChecksumError

    path, mid = _file(tmp_path, flip)
    with ApackReader(path) as r:
        every = list(range(len(r.blobs)))
        check = r.start_raw_check(every, threads=2)

        def child() -> int:
            try:
                check.wait()
            except ChecksumError as e:
                return 3 if f"blob {mid}:" in str(e) and mid not in r._verified else 4
            return 0 if r._verified == set(every) else 2

        code = _child_exit_code(child)
        assert code == (3 if flip else 0), code
        busy_pool.set()
        check.drain()  # the parent's own threads finish once the pool is free


def test_drain_in_a_forked_child_returns(tmp_path: Path, busy_pool: threading.Event) -> None:
    path, _ = _file(tmp_path)
    with ApackReader(path) as r:
        check = r.start_raw_check(range(len(r.blobs)), threads=2)

        def child() -> int:
            check.drain()
            return 0

        assert _child_exit_code(child) == 0
        busy_pool.set()
        check.wait()
        assert r._verified == set(range(len(r.blobs)))


def test_a_reader_opened_before_fork_reads_and_checks_in_the_child(tmp_path: Path, busy_pool: threading.Event) -> None:
    """A check pending in the parent marks nothing: the child checks what it reads (a damaged blob still refused)."""
    from adapterpack.errors import ChecksumError

    path, mid = _file(tmp_path, flip=True)
    with ApackReader(path) as r:
        check = r.start_raw_check(range(len(r.blobs)), threads=2)

        def child() -> int:
            for i in range(len(r.blobs)):
                if i != mid:
                    r.read_blob(i)
            try:
                r.read_blob(mid)
            except ChecksumError:
                r.check_raw_blobs([i for i in range(len(r.blobs)) if i != mid], threads=2)  # the child's own pool
                return 0
            return 1

        assert _child_exit_code(child) == 0
        busy_pool.set()
        with pytest.raises(ChecksumError, match=f"blob {mid}:"):
            check.wait()
