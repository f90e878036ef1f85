"""One reader / adapter read from several threads at once (a serving stack, a DataLoader with threads): the interleavings
that broke, made deterministic, and a short stress run over a file with one damaged blob."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.container import ApackReader
from adapterpack.container import reader as reader_mod
from adapterpack.errors import AdapterpackError, ChecksumError
from tests.apack_builders import lora_layers


def _adapter(layers: int = 6) -> Adapter:
    return lora_layers(layers, seed=7)


def _run(n: int, job: Callable[[int], Any]) -> list[Any]:
    """``job(k)`` in ``n`` threads started together; their results or exceptions, in order."""
    out: list[Any] = [None] * n
    go = threading.Barrier(n)

    def run(k: int) -> None:
        go.wait()
        try:
            out[k] = job(k)
        except BaseException as e:  # returned to the test
            out[k] = e

    ts = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    return out


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


# --- the kept pool grown by one thread while another is about to use it ---------------------------------------


def test_a_pool_grown_by_another_thread_still_takes_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread A gets the kept pool, thread B asks for a bigger one before A submits: the old pool was shut down and A's
    submit was a RuntimeError ('cannot schedule new futures after shutdown'). Made deterministic: the pool is grown right
    after it is handed out."""
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    monkeypatch.setattr(reader_mod, "_pool", None)
    monkeypatch.setattr(reader_mod, "_pool_size", 0)
    real = reader_mod._crc_pool

    def raced(workers: int) -> Any:
        pool = real(workers)
        real(workers + 4)  # what another thread does meanwhile
        return pool

    monkeypatch.setattr(reader_mod, "_crc_pool", raced)
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(), path, codec="raw")
    every = list(range(12))
    with ApackReader(path) as r:
        r.check_raw_blobs(every, threads=3)
        assert r._verified == set(every)
    with ApackReader(path) as r:
        r.start_raw_check(every, threads=3).wait()
        assert r._verified == set(every)


# --- the shared-blob cache -------------------------------------------------------------------------------------


def _bank(tmp_path: Path) -> Path:
    from adapterpack.bank.store import Bank, BankMember, BankModule, write_bank

    rng = np.random.default_rng(1)
    u, v = np.tile([0.5, 1.0, -2.0], (200, 1)), np.tile([0.25, 3.0, 1.5], (150, 1))  # compressible: zstd, shared
    path = tmp_path / "bank.apack"
    members = [BankMember(f"m{j}", {"q": rng.standard_normal(3)}) for j in range(3)]
    write_bank(path, Bank({"q": BankModule("q", u, v, "diagonal")}, members), codec="zstd")
    return path


def test_concurrent_reads_of_a_shared_blob_count_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads miss the cache for the same shared blob together (both decode it): it was kept once but counted twice
    against SHARED_CACHE_BYTES, and the threads got different arrays. The decode is made slow so they overlap."""
    path = _bank(tmp_path)
    with ApackReader(path) as r:
        shared = sorted(r._shared)
        assert shared
        both_in = threading.Barrier(4)
        real = r._read

        def slow(i: int, check_crc: bool) -> np.ndarray:
            both_in.wait(10)  # every thread is past the cache lookup before any decode finishes
            return real(i, check_crc)

        monkeypatch.setattr(r, "_read", slow)
        got = _run(4, lambda k: r.read_blob(shared[0]))
        assert not any(isinstance(g, BaseException) for g in got), got
        assert all(g is got[0] for g in got)  # one array for everyone, as without threads
        assert r._decoded_bytes == sum(a.nbytes for a in r._decoded.values()) == got[0].nbytes


# --- close() racing a read -------------------------------------------------------------------------------------


def test_a_read_that_loses_a_race_with_close_is_an_adapterpack_error(tmp_path: Path) -> None:
    """Thread A took the mapping, thread B closed it (no view held, so it really closes) before A viewed it: numpy's
    ValueError ('mmap closed or invalid') came out. The state A sees is made directly."""
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(), path, codec="raw")
    for verify in (True, False):
        r = ApackReader(path, verify=verify)
        r.read_blob(0)  # learns the dtype: the fast path from now on
        assert r._mm is not None
        r._mm.close()  # B's close, after A read self._mm
        with pytest.raises(AdapterpackError, match="closed"):
            r.read_blob(1)
        r._mm = None


# --- a short stress run: every way of reading, in threads, one blob damaged ------------------------------------


def _damaged(tmp_path: Path) -> tuple[Path, int, dict[int, bytes]]:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(), path, codec="raw")
    with ApackReader(path) as r:
        want = {i: r.read_blob(i).tobytes() for i in range(len(r.blobs))}
        bad = len(r.blobs) // 2 + 1
        pos = r.data_start + r.blobs[bad].offset + 17
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x04
    path.write_bytes(bytes(data))
    return path, bad, want


@pytest.mark.parametrize("cow", [False, True])
def test_threads_reading_one_reader_never_get_unchecked_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_switching: None, cow: bool
) -> None:
    """Eight threads, each by another route (read_blob, read_rows, check_raw_blobs, start_raw_check in threads), over one
    reader, many rounds: every sound blob reads bit-exact, the damaged one is always a ChecksumError naming it."""
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    path, bad, want = _damaged(tmp_path)
    n = len(want)

    def job(k: int) -> list[str]:
        seen = []
        for i in [*range(k % n, n), *range(k % n)]:
            try:
                if k % 4 == 0:
                    got = r.read_blob(i).tobytes()
                elif k % 4 == 1:
                    got = r.read_rows(i, 3).tobytes()
                    assert want[i].startswith(got)
                    got = want[i] if got else got
                elif k % 4 == 2:
                    r.check_raw_blobs([i, (i + 1) % n], threads=2)
                    got = r.read_blob(i).tobytes()
                else:
                    r.start_raw_check(list(range(i, n)), threads=2).wait()
                    got = r.read_blob(i).tobytes()
                seen.append("ok" if got == want[i] else f"blob {i} WRONG BYTES")
            except ChecksumError as e:
                seen.append("bad" if f"blob {bad}" in str(e) and i <= bad else f"blob {i}: {e}")
        return seen

    for _ in range(15):
        with ApackReader(path, copy_on_write=cow) as r:
            for k, got in enumerate(_run(8, job)):
                assert not isinstance(got, BaseException), got
                assert bad not in r._verified
                # start_raw_check from blob i on covers the damaged one for every i up to it: refused there
                expect = {i: "bad" if i == bad or (k % 4 == 3 and i < bad) else "ok" for i in range(n)}
                if k % 4 == 2:
                    expect[(bad - 1) % n] = "bad"
                order = [*range(k % n, n), *range(k % n)]
                assert got == [expect[i] for i in order], (k, got)


def test_threads_loading_one_adapter_into_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_switching: None) -> None:
    """adapterpack.torch.load of one Adapter (copy-on-write reader, threaded CRC spans) from four threads at once: all
    bit-exact when sound; each a ChecksumError naming the damaged blob when one is damaged."""
    torch = pytest.importorskip("torch")
    import adapterpack.torch as apt

    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    path = tmp_path / "a.apack"
    ref = _adapter()
    adapterpack.save(ref, path, codec="raw")
    for _ in range(5):
        with ApackReader(path, copy_on_write=True) as r:
            ad = r.adapter()
            for got in _run(4, lambda k, ad=ad: apt.load(ad)):
                assert not isinstance(got, BaseException), got
                for name, m in ref.modules.items():
                    assert torch.equal(got[name].A, torch.from_numpy(m.tensors["A"]))  # type: ignore[arg-type]
    path, bad, _ = _damaged(tmp_path)
    for _ in range(5):
        with ApackReader(path, copy_on_write=True) as r:
            ad = r.adapter()
            for got in _run(4, lambda k, ad=ad: apt.load(ad)):
                assert isinstance(got, ChecksumError) and f"blob {bad}" in str(got), got


# --- a load from an atexit handler -----------------------------------------------------------------------------

ATEXIT = """
import atexit, sys
import numpy as np
import adapterpack, adapterpack.torch as apt
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader, reader as reader_mod
from adapterpack.torch import staging

reader_mod.PARALLEL_CRC_BYTES = 0
staging.CRC_THREADS = 2
rng = np.random.default_rng(0)
f32 = np.float32
mods = {f"m{k}": Module(f"m{k}", "lora", (64, 96), {"rank": 8, "alpha": 8.0},
        {"A": rng.standard_normal((8, 96)).astype(f32), "B": np.tile(np.arange(8, dtype=f32), (64, 1))}) for k in range(6)}
paths = {c: f"{sys.argv[1]}/{c}.apack" for c in ("raw", "zstd")}
for c, p in paths.items():
    adapterpack.save(Adapter(modules=mods), p, codec=c)

def late():
    for c, p in paths.items():
        try:
            got = apt.load(p)
            assert all(np.array_equal(got[n].B.numpy(), m.tensors["B"]) for n, m in mods.items())
            with ApackReader(p) as r:
                r.check_raw_blobs([i for i, b in enumerate(r.blobs) if b.codec_id == "raw"], threads=2)
            print(c, "ok", flush=True)
        except Exception as e:
            print(c, type(e).__name__, e, flush=True)

atexit.register(late)
"""


def test_a_load_from_an_atexit_handler(tmp_path: Path) -> None:
    """At interpreter shutdown no thread pool takes work ('cannot schedule new futures after interpreter shutdown', a
    RuntimeError): the CRC spans and the decodes run in the calling thread instead."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", ATEXIT, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split("\n")[:-1] == ["raw ok", "zstd ok"], (r.stdout, r.stderr[-2000:])


def test_an_adapter_closed_by_two_threads_at_once_releases_its_reader_once(tmp_path: Path) -> None:
    """Adapter.close() called the closer and only then forgot it: a second close() meanwhile (another thread) released
    the shared reader a second time, closing it under a sibling adapter still in use. Both threads are held inside the
    release (for half a second at most) so that they overlap."""
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(), path, codec="raw")
    with ApackReader(path) as r:
        a, b = r.adapter(), r.adapter()
        release = a.closer
        assert release is not None
        both = threading.Barrier(2)

        def slow_release() -> None:
            try:
                both.wait(0.5)
            except threading.BrokenBarrierError:
                pass
            release()

        a.closer = slow_release
        got = _run(2, lambda k: a.close())
        assert got == [None, None]
        assert r._users == 1
        b.module("m0").array("A")  # the sibling still reads


def test_threads_reading_every_member_of_a_bank(tmp_path: Path, fast_switching: None) -> None:
    """Six threads read every member's ΔW of one bank through one reader (its U and V shared, compressed, cached): every
    result equals the one read alone, and the cache counts each shared blob once."""
    path = _bank(tmp_path)
    with ApackReader(path) as r:
        want = {name: r.adapter(name).delta("q") for name in r.adapter_names}
    for _ in range(10):
        with ApackReader(path) as r:
            names = r.adapter_names
            adapters = {n: r.adapter(n) for n in names}

            def job(k: int, adapters: dict[str, Adapter] = adapters, names: list[str] = names) -> list[bool]:
                return [np.array_equal(adapters[n].delta("q"), want[n]) for n in names[k % len(names) :] + names[: k % len(names)]]

            got = _run(6, job)
            assert all(g == [True] * len(names) for g in got), got
            assert r._decoded_bytes == sum(a.nbytes for a in r._decoded.values())
            assert len({id(r.read_blob(i)) for i in r._shared for _ in range(2)}) == len(r._shared)
