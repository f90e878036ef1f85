"""``adapterpack.torch.load``'s one route, the reader's public blob API it uses, and the one factors type."""

from __future__ import annotations

import builtins
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import adapterpack
import adapterpack.torch as apt
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader
from adapterpack.container import reader as reader_mod
from adapterpack.errors import AdapterpackError, BadMagicError, ChecksumError, ConversionError
from adapterpack.factors import Factors
from adapterpack.torch.decoders import base as dbase
from tests.test_torch_load import _adapter, _bits, _corrupt_first_blob

TORCH_DIR = Path(apt.__file__).parent


def test_open_if_apack(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    with ApackReader.open_if_apack(path) as r:  # type: ignore[union-attr]
        assert r.adapter_names == ["default"]
    other = tmp_path / "b.bin"
    other.write_bytes(b"not an apack file at all, longer than a preamble")
    assert ApackReader.open_if_apack(other) is None
    assert ApackReader.open_if_apack(tmp_path) is None
    assert ApackReader.open_if_apack(tmp_path / "missing.apack") is None
    fake = tmp_path / "c.apack"
    fake.write_bytes(other.read_bytes())
    with pytest.raises(BadMagicError, match=str(fake)):
        ApackReader.open_if_apack(fake)


def test_load_opens_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    opened: list[str] = []
    real_open = builtins.open

    def counting(file: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            opened.append(str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", counting)
    apt.load(path)
    assert len(opened) == 1


def test_copy_on_write_reader_gives_read_only_arrays(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    with ApackReader(path, copy_on_write=True) as r:
        arr = r.read_blob(0)
        assert not arr.flags.writeable
        assert r.buffer.readonly is False and r.blob_bytes(0).tobytes() == arr.tobytes()
        assert r.blob_offset(0) == r.data_start + r.blobs[0].offset
    with ApackReader(path) as r:
        assert r.buffer.readonly


@pytest.mark.parametrize("threads", [1, 3])
def test_check_raw_blobs_finds_the_corrupt_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)  # split between threads even for a small file
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    with ApackReader(path) as r:
        r.check_raw_blobs(range(len(r.blobs)), threads=threads)
        assert r._verified == set(range(len(r.blobs)))
    _corrupt_first_blob(path)
    with ApackReader(path) as r, pytest.raises(ChecksumError, match="blob 0"):
        r.check_raw_blobs(list(range(len(r.blobs)))[::-1], threads=threads)


def test_check_raw_blobs_takes_raw_blobs_only(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    zeros = {"A": np.zeros((4, 64), np.float32), "B": np.zeros((64, 4), np.float32)}
    adapterpack.save(Adapter(modules={"m": Module("m", "lora", (64, 64), {"rank": 4, "alpha": 4}, zeros)}), path, codec="zstd")
    with ApackReader(path) as r, pytest.raises(AdapterpackError, match="raw blobs only"):
        assert r.blobs[0].codec_id == "zstd"
        r.check_raw_blobs([0])


def test_split_by_bytes() -> None:
    split = reader_mod._split_by_bytes
    assert split([1, 2, 3, 4], [10, 10, 10, 10], 2) == [[1, 2], [3, 4]]
    assert split([1, 2, 3], [100, 1, 1], 2) == [[1], [2, 3]]
    assert split([7], [5], 4) == [[7]]
    parts = split(list(range(50)), [3] * 50, 3)
    assert [x for part in parts for x in part] == list(range(50)) and len(parts) == 3


def test_an_opened_adapter_takes_the_same_route(tmp_path: Path) -> None:
    """An Adapter read from an .apack is staged like the file: raw slots into one buffer the tensors own, bit-exact."""
    path = tmp_path / "a.apack"
    src = _adapter(np.float32, seed=2)
    adapterpack.save(src, path, codec="raw")
    before = path.read_bytes()
    with adapterpack.open(path) as ad:
        got = apt.load(ad)
    storages = {t.untyped_storage().data_ptr() for f in got.values() for t in (f.A, f.B)}
    assert len(storages) == 1
    for name, m in src.modules.items():
        assert _bits(got[name].A) == m.tensors["A"].tobytes() and _bits(got[name].B) == m.tensors["B"].tobytes()
        got[name].A.fill_(3.0)
    assert path.read_bytes() == before


def test_one_factors_type(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    got = apt.load(path)
    assert all(type(f) is Factors for f in got.values())
    assert dbase.TorchFactors is Factors and apt.Factors is Factors
    with pytest.warns(DeprecationWarning, match="LoraTensors"):
        assert apt.LoraTensors is Factors
    with pytest.warns(DeprecationWarning, match="TorchFactors"):
        assert apt.TorchFactors is Factors
    with pytest.warns(DeprecationWarning):
        from adapterpack.torch.tensors import LoraTensors
    assert LoraTensors is Factors
    conv = got["conv"]
    assert conv.A.dim() == 4  # a conv record keeps its stored shapes; matrices() gives the 2-D ones
    a, b = conv.matrices()
    assert a.dim() == b.dim() == 2 and a.shape[1] == np.prod(conv.A.shape[1:])
    with pytest.raises(ConversionError, match="materialize"):
        conv.delta()


def test_numpy_factors_delta_takes_stored_conv_shapes() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((4, 2, 1, 1))
    flat = Factors(a.reshape(2, 12), b.reshape(4, 2), 0.5, (4, 3, 2, 2), layout="conv")
    shaped = Factors(a, b, 0.5, (4, 3, 2, 2), layout="conv")
    np.testing.assert_array_equal(flat.delta(), shaped.delta())


def test_torch_never_reaches_into_private_reader_state() -> None:
    for py in TORCH_DIR.rglob("*.py"):
        text = py.read_text()
        assert "._mm" not in text and "reader._" not in text, py


def test_load_of_a_non_apack_input_still_works(tmp_path: Path) -> None:
    from tests.test_torch_load import EXAMPLE

    got = apt.load(EXAMPLE)
    ref = adapterpack.open(EXAMPLE)
    assert set(got) == set(ref.modules)
    name = next(iter(got))
    assert torch.equal(got[name].A, torch.from_numpy(np.array(ref.module(name).array("A"))))


def _flip_last_blob_byte(path: Path) -> int:
    """Flip the last byte of the file's last blob; returns that blob's index."""
    with ApackReader(path) as r:
        last = max(range(len(r.blobs)), key=lambda i: r.blobs[i].offset)
        pos = r.data_start + r.blobs[last].offset + r.blobs[last].length - 1
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    return last


@pytest.mark.parametrize("populate", [True, False])
def test_numpy_reads_refuse_a_flipped_byte_in_the_last_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, populate: bool
) -> None:
    """Verified numpy reads (the blob pages mapped at once on the first CRC, or page by page) still check each blob when
    it is read: the damaged last blob is a ChecksumError, every other blob reads bit-exact, without verify it reads."""
    if not populate:
        monkeypatch.setattr(reader_mod, "_populate_works", False)
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    with ApackReader(path) as r:
        want = {i: r.read_blob(i).tobytes() for i in range(len(r.blobs))}
    last = _flip_last_blob_byte(path)
    with ApackReader(path) as r:
        for i in range(len(r.blobs)):
            if i != last:
                assert r.read_blob(i).tobytes() == want[i]
        assert r._populated
        with pytest.raises(ChecksumError, match=f"blob {last}: checksum mismatch") as info:
            r.read_blob(last)
        assert type(info.value) is ChecksumError
    with ApackReader(path, verify=False) as r:
        assert r.read_blob(last).tobytes() != want[last]


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_load_refuses_a_flipped_byte_in_the_last_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """The torch CRC pass (pages mapped first, blobs split between the kept pool's threads) finds a damaged last blob."""
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    from adapterpack.torch import staging

    monkeypatch.setattr(staging, "CRC_THREADS", threads)
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    apt.load(path)
    last = _flip_last_blob_byte(path)
    with pytest.raises(ChecksumError, match=f"blob {last}"):
        apt.load(path)
    apt.load(path, verify=False)


def test_populate_steps_aside_where_the_kernel_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    """MADV_POPULATE_READ refused (a kernel before 5.14): no error, and it is not asked again."""
    monkeypatch.setattr(reader_mod, "_populate_works", True)
    calls: list[tuple[int, int, int]] = []

    class Refuses:
        def madvise(self, option: int, start: int, length: int) -> None:
            calls.append((option, start, length))
            raise OSError(22, "Invalid argument")

    reader_mod._populate(Refuses(), 5000, 9000)  # type: ignore[arg-type]
    assert calls == [(reader_mod.MADV_POPULATE_READ, 4096, 9000 - 4096)]
    assert reader_mod._populate_works is False
    reader_mod._populate(Refuses(), 0, 10)  # type: ignore[arg-type]
    assert len(calls) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_kept_crc_pool_works_in_a_forked_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child forked after a threaded CRC pass has none of the pool's threads: it must start its own, not wait forever."""
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    with ApackReader(path) as r:
        r.check_raw_blobs(range(len(r.blobs)), threads=2)
    assert reader_mod._pool is not None
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the threaded pass completes
        code = 1
        try:
            with ApackReader(path) as r:
                r.check_raw_blobs(range(len(r.blobs)), threads=2)
                code = 0 if r._verified == set(range(len(r.blobs))) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's CRC pass hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def _padded_file(tmp_path: Path) -> tuple[Path, list[int]]:
    """A raw file whose blobs have zero padding between them; the blobs' indices."""
    path = tmp_path / "a.apack"
    rng = np.random.default_rng(3)
    mods = {  # float16 factors of odd sizes: every blob is followed by padding
        f"m{k}": Module(f"m{k}", "lora", (5, 7), {"rank": 3, "alpha": 3.0}, {"A": rng.standard_normal((3, 7)).astype(np.float16),
                                                                             "B": rng.standard_normal((5, 3)).astype(np.float16)})
        for k in range(4)
    }
    adapterpack.save(Adapter(modules=mods), path, codec="raw")
    with ApackReader(path) as r:
        ends = [r.blobs[i].offset + r.blobs[i].length for i in range(len(r.blobs) - 1)]
        assert any(r.blobs[i + 1].offset > e for i, e in enumerate(ends))  # padding somewhere
        return path, list(range(len(r.blobs)))


def test_start_raw_check_one_call_per_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans of blobs and padding checked by one crc32c call per thread against the blobs' CRCs combined."""
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    path, every = _padded_file(tmp_path)
    calls: list[int] = []
    real = reader_mod.crc32c

    def counting(data: Any, **kw: Any) -> int:
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(reader_mod, "crc32c", counting)
    with ApackReader(path) as r:
        calls.clear()  # the index's CRC
        check = r.start_raw_check(every[::-1], threads=2)
        check.wait()
        assert r._verified == set(every)
        assert len(calls) == 2 and sum(b.length for b in r.blobs) < sum(calls) <= r.blobs[-1].offset + r.blobs[-1].length
    last = _flip_last_blob_byte(path)
    calls.clear()
    with ApackReader(path) as r:
        check = r.start_raw_check(every, threads=2)
        with pytest.raises(ChecksumError, match=f"blob {last}: checksum mismatch") as info:
            check.wait()
        assert type(info.value) is ChecksumError and last not in r._verified


def test_start_raw_check_damaged_padding_is_not_a_blob_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-zero padding byte fails the span's combined CRC; each blob is then checked alone and all pass (reads do not
    check padding; verify reports it)."""
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    path, every = _padded_file(tmp_path)
    with ApackReader(path) as r:
        i = next(i for i in range(len(r.blobs) - 1) if r.blobs[i + 1].offset > r.blobs[i].offset + r.blobs[i].length)
        pos = r.data_start + r.blobs[i].offset + r.blobs[i].length
    data = bytearray(path.read_bytes())
    data[pos] = 0x5A
    path.write_bytes(bytes(data))
    with ApackReader(path) as r:
        r.start_raw_check(every, threads=2).wait()
        assert r._verified == set(every)
        assert any("padding" in p for p in r.verify().problems)


def test_start_raw_check_checks_at_once_what_it_cannot_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs that are not one run, one thread, or a small load: checked before start_raw_check returns."""
    path, every = _padded_file(tmp_path)
    last = _flip_last_blob_byte(path)
    with ApackReader(path) as r:
        with pytest.raises(ChecksumError, match=f"blob {last}"):
            r.start_raw_check(every, threads=2)  # under PARALLEL_CRC_BYTES
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    with ApackReader(path) as r:
        with pytest.raises(ChecksumError, match=f"blob {last}"):
            r.start_raw_check([0, last], threads=2)  # not one run
        r.start_raw_check([0, 1], threads=1).wait()
        assert r._verified == {0, 1}


def test_crc32c_combine() -> None:
    from adapterpack.checksum import crc32c, crc32c_combine, crc32c_of_zeros

    rng = np.random.default_rng(5)
    for _ in range(200):
        a = rng.integers(0, 256, int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()
        assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
    for n in (0, 1, 255, 4096, (1 << 20) + 3, (3 << 20) + 17):
        assert crc32c_of_zeros(n) == crc32c(bytes(n))
