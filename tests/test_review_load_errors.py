"""Damaged files on the load path: the error is a ChecksumError naming the blob AND what it holds, whichever route read
it (numpy, the threaded span check, the copy path, a decoder that looked at unchecked bytes first), and close() while a
check runs does not turn it into another error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adapterpack
import adapterpack.torch as apt
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader
from adapterpack.container import reader as reader_mod
from adapterpack.errors import ChecksumError, RecordError
from adapterpack.torch import staging
from tests.apack_builders import lora_layers


def _lora(layers: int = 6) -> Adapter:
    return lora_layers(layers, seed=11, name="layers.{k}.q")


def _flip(path: Path, blob: int, at: int = 5, bit: int = 0x08) -> None:
    with ApackReader(path) as r:
        pos = r.data_start + r.blobs[blob].offset + at
    data = bytearray(path.read_bytes())
    data[pos] ^= bit
    path.write_bytes(bytes(data))


def _holder(path: Path, blob: int) -> str:
    with ApackReader(path) as r:
        return r.blob_users()[blob][0]


@pytest.fixture
def threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_mod, "PARALLEL_CRC_BYTES", 0)
    monkeypatch.setattr(staging, "CRC_THREADS", 2)


ROUTES = {
    "numpy": lambda p: [m.delta() for m in adapterpack.open(p)],
    "torch_views": lambda p: apt.load(p),  # threaded spans, the damaged blob in the middle of one
    "torch_copy": lambda p: apt.load(p, zero_copy=False),  # check_blob before each copy
}


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_damaged_blob_is_named_with_its_module(tmp_path: Path, threaded: None, route: str, codec: str) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_lora(), path, codec=codec)
    with ApackReader(path) as r:
        mid = len(r.blobs) // 2 + 1  # in the middle of the first thread's span... or the second's
        assert mid < len(r.blobs) - 1
    if codec == "zstd":
        with ApackReader(path) as r:
            if r.blobs[mid].codec_id == "raw":
                pytest.skip("blob stored raw")
    _flip(path, mid, at=r.blobs[mid].stored_length - 3 if codec == "zstd" else 5)
    holder = _holder(path, mid)
    with pytest.raises(ChecksumError) as info:
        ROUTES[route](path)
    assert type(info.value) is ChecksumError
    msg = str(info.value)
    assert f"blob {mid}:" in msg and holder in msg, msg


def test_a_damaged_prefix_is_named_with_its_module(tmp_path: Path) -> None:
    """read_rows checks a prefix checkpoint only (svd's Ut and Vt): its error names the slot too."""
    path, _ = _svd(tmp_path)
    with ApackReader(path) as r:
        vt = next(i for i, u in r.blob_users().items() if u[0] == "module 'm2' Vt")
        assert r.blobs[vt].prefix_crc32c
    _flip(path, vt, at=1)
    with ApackReader(path) as r:
        with pytest.raises(ChecksumError, match=rf"blob {vt}: checksum mismatch in its first 1 rows.*module 'm2' Vt") as info:
            r.read_rows(vt, 1)
        assert type(info.value) is ChecksumError


def test_verify_names_a_blob_once(tmp_path: Path) -> None:
    """verify() names what a blob holds itself: the read's own naming is not repeated."""
    path = tmp_path / "a.apack"
    adapterpack.save(_lora(), path, codec="raw")
    _flip(path, 3)
    holder = _holder(path, 3)
    with ApackReader(path) as r:
        assert r.verify().problems == [f"blob 3 ({holder}): checksum mismatch (decoded bytes are corrupt)"]


def _svd(tmp_path: Path) -> tuple[Path, int]:
    rng = np.random.default_rng(2)
    mods = {}
    for k in range(4):
        ut, vt = rng.standard_normal((4, 48)).astype(np.float32), rng.standard_normal((4, 40)).astype(np.float32)
        s = np.array([4.0, 3.0, 2.0, 1.0], np.float32)
        mods[f"m{k}"] = Module(f"m{k}", "svd", (48, 40), {"rank": 4}, {"Ut": ut, "S": s, "Vt": vt})
    path = tmp_path / "svd.apack"
    adapterpack.save(Adapter(modules=mods), path, codec="raw")
    with ApackReader(path) as r:
        users = r.blob_users()
        s_blob = next(i for i, u in users.items() if u[0] == "module 'm1' S")
    return path, s_blob


def test_a_decoder_that_sees_a_damaged_blob_first_still_gives_the_checksum_error(tmp_path: Path, threaded: None) -> None:
    """The torch svd decoder checks S (finite, >= 0, descending) on the views while their CRC pass still runs: a damaged
    S was reported as a RecordError about S (a writer's bug), where numpy reads say ChecksumError (a damaged file)."""
    path, s_blob = _svd(tmp_path)
    _flip(path, s_blob, at=3, bit=0x80)  # S[0] = -4.0: no longer >= 0
    with pytest.raises(ChecksumError, match=rf"blob {s_blob}:.*module 'm1' S") as info:
        [m.delta() for m in adapterpack.open(path)]
    with pytest.raises(ChecksumError, match=rf"blob {s_blob}:.*module 'm1' S") as info:
        apt.load(path)
    assert type(info.value) is ChecksumError and "singular values S" in str(info.value.__cause__)
    with pytest.raises(RecordError, match="singular values S"):
        apt.load(path, verify=False)  # unchecked: the decoder's own error is what is left


def test_close_while_a_check_runs_still_names_the_damaged_blob(tmp_path: Path, threaded: None) -> None:
    """A reader closed (every adapter of it closed) between start_raw_check and wait: the span mismatch re-checks blob by
    blob, which raised 'file is closed' instead of the ChecksumError."""
    path = tmp_path / "a.apack"
    adapterpack.save(_lora(), path, codec="raw")
    _flip(path, 7)
    r = ApackReader(path)
    check = r.start_raw_check(range(len(r.blobs)), threads=2)
    r.close()
    with pytest.raises(ChecksumError, match="blob 7:") as info:
        check.wait()
    assert type(info.value) is ChecksumError


def test_close_while_a_check_runs_keeps_sound_views_valid(tmp_path: Path, threaded: None) -> None:
    import torch

    path = tmp_path / "a.apack"
    ref = _lora()
    adapterpack.save(ref, path, codec="raw")
    ad = adapterpack.open(path)
    got = apt.load(ad)
    ad.close()
    ad.close()  # twice: harmless
    for name, m in ref.modules.items():
        assert torch.equal(got[name].B, torch.from_numpy(m.tensors["B"]))  # type: ignore[arg-type]


def test_sibling_adapters_share_the_reader_until_the_last_closes(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_lora(), path, codec="raw")
    with ApackReader(path) as r:
        a, b = r.adapter(), r.adapter()
        a.close()
        a.close()  # a second close must not release b's share
        b.module("layers.0.q").array("A")
        b.close()
        assert r._mm is None


@pytest.mark.parametrize("damage", [None, "after_empty"])
def test_spans_with_zero_length_blobs(tmp_path: Path, threaded: None, damage: str | None) -> None:
    """Rank-0 modules (A [0, in], B [out, 0]: zero-length blobs) first, last and between others in a threaded span: sound
    files load bit-exact, a damaged blob right after an empty one is named."""
    import torch

    rng = np.random.default_rng(4)
    f32 = np.float32
    mods = {}
    for k, r in enumerate([0, 4, 0, 0, 3, 0]):
        if r == 0:  # an svd record may have rank 0; a lora record may not
            mods[f"m{k}"] = Module(
                f"m{k}",
                "svd",
                (24, 40),
                {"rank": 0},
                {"Ut": np.zeros((0, 24), f32), "S": np.zeros(0, f32), "Vt": np.zeros((0, 40), f32)},
            )
        else:
            mods[f"m{k}"] = Module(
                f"m{k}",
                "lora",
                (24, 40),
                {"rank": r, "alpha": 1.0},
                {"A": rng.standard_normal((r, 40)).astype(f32), "B": rng.standard_normal((24, r)).astype(f32)},
            )
    path = tmp_path / "a.apack"
    adapterpack.save(Adapter(modules=mods), path, codec="raw")
    with ApackReader(path) as r:
        lengths = [b.length for b in r.blobs]
        assert lengths[0] == 0 and lengths[-1] == 0 and 0 in lengths[1:-1]
        after = next(i for i in range(1, len(lengths)) if lengths[i - 1] == 0 and lengths[i] > 0)
    if damage is None:
        got = apt.load(path)
        for name, m in mods.items():
            if m.encoding == "lora":
                assert torch.equal(got[name].A, torch.from_numpy(m.tensors["A"]))  # type: ignore[arg-type]
                assert torch.equal(got[name].B, torch.from_numpy(m.tensors["B"]))  # type: ignore[arg-type]
            else:
                assert got[name].A.shape == (0, 40) and got[name].B.shape == (24, 0)
        return
    _flip(path, after, at=0)
    with pytest.raises(ChecksumError, match=f"blob {after}:"):
        apt.load(path)
