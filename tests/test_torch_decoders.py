"""The torch decoder registry, the staged (few-large-copies) load path and chunked materialize."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import adapterpack
import adapterpack.torch as apt
from adapterpack.container import ApackReader
from adapterpack.errors import ChecksumError, ConversionError, UnknownEncodingError
from adapterpack.torch import decoders, staging
from adapterpack.torch.decoders import base as dbase
from tests.test_torch_load import _adapter, _bits, _corrupt_first_blob

CODECS = ["raw", "zstd", "byteplanes"]


def test_registry_has_lora_and_refuses_unknown_ids() -> None:
    assert "lora" in decoders.torch_decoder_ids()
    assert decoders.get_torch_decoder("lora") is decoders.lora.decode_lora
    with pytest.raises(UnknownEncodingError, match="nope"):
        decoders.get_torch_decoder("nope")


def test_numpy_fallback_equals_the_lora_decoder() -> None:
    ad = _adapter(ml_dtypes.bfloat16, seed=3)
    dev = torch.device("cpu")
    for m in ad:
        own, fb = decoders.decode(m, dev, None), decoders.numpy_fallback(m, dev, None)
        assert own.A.dim() == own.B.dim() == 2
        assert _bits(own.A) == _bits(fb.A) and _bits(own.B) == _bits(fb.B)
        assert (own.scale, own.base_shape, own.transpose) == (fb.scale, fb.base_shape, fb.transpose)
        np.testing.assert_array_equal(apt.materialize(own).numpy(), m.delta())


def test_load_goes_through_the_registered_decoder(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="zstd")
    seen: list[tuple[str, bool]] = []
    entry = dbase._REGISTRY["lora"]

    def spy(m: object, device: torch.device, dtype: torch.dtype | None) -> decoders.TorchFactors:
        seen.append((m.name, all(isinstance(t, torch.Tensor) for t in m.tensors.values())))  # type: ignore[attr-defined]
        return entry.fn(m, device, dtype)  # type: ignore[arg-type]

    try:
        decoders.register_torch_decoder("lora", staged=True)(spy)
        apt.load(path)
    finally:
        dbase._REGISTRY["lora"] = entry
    assert seen == [(n, True) for n in ("lin", "fifo", "emb", "conv", "dora")]  # slots arrive staged as tensors
    # an unstaged decoder gets the record as opened (numpy / stored tensors)
    seen.clear()
    try:
        decoders.register_torch_decoder("lora")(spy)
        apt.load(path)
    finally:
        dbase._REGISTRY["lora"] = entry
    assert seen == [(n, False) for n in ("lin", "fifo", "emb", "conv", "dora")]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_copied_and_bounced_loads_are_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str, dtype: type
) -> None:
    """The one-buffer copy and the chunked host-staging path (a GPU's, run on the CPU) give the stored bits."""
    monkeypatch.setattr(staging, "CHUNK", 1000)  # many chunks, blobs split across them, alignment gaps at chunk ends
    path = tmp_path / "a.apack"
    src = _adapter(dtype, seed=4)
    adapterpack.save(src, path, codec=codec)
    before = path.read_bytes()
    from adapterpack.torch.mapped import load_apack

    dev = torch.device("cpu")
    for got in (apt.load(path, zero_copy=False), load_apack(path, dev, None, None, True, bounce=True)):
        for name, m in src.modules.items():
            lt = got[name]
            for slot, t in (("A", lt.A), ("B", lt.B), ("magnitude", lt.magnitude)):
                if slot in m.tensors:
                    assert tuple(t.shape) == m.tensors[slot].shape and _bits(t) == m.tensors[slot].tobytes()
            lt.A.fill_(1.0)  # memory the tensors own
    assert path.read_bytes() == before


def test_copied_raw_blobs_share_one_buffer(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec="raw")
    got = apt.load(path, zero_copy=False)
    storages = {t.untyped_storage().data_ptr() for lt in got.values() for t in (lt.A, lt.B)}
    assert len(storages) == 1


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("bounce", [False, True])
def test_staged_paths_verify_checksums(tmp_path: Path, codec: str, bounce: bool) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path, codec=codec)
    _corrupt_first_blob(path)
    from adapterpack.torch.mapped import load_apack

    with pytest.raises(ChecksumError, match="blob 0"):
        load_apack(path, torch.device("cpu"), None, None, True, zero_copy=False, bounce=bounce)


def test_stage_returns_requested_blobs_in_order(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float16), path, codec="zstd")
    with ApackReader(path) as r:
        got = staging.stage(r, [3, 1, 3], torch.device("cpu"))
        assert list(got) == [3, 1]
        assert _bits(got[1]) == r.read_blob(1).tobytes()


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
@pytest.mark.parametrize("out", [None, torch.bfloat16, torch.float64])
def test_chunked_materialize_equals_whole(chunk: int, out: torch.dtype | None) -> None:
    """Row blocks of the float32 product, each against the float64 reference (BLAS may sum a block in another order)."""
    ad = _adapter(np.float32, seed=5)
    got = apt.load(ad)
    for name, lt in got.items():
        f = ad.modules[name].factors()
        ref = (f.B.astype(np.float64) @ f.A.astype(np.float64)) * f.scale
        ref = (ref.T if f.transpose else ref).reshape(f.base_shape)
        part = apt.materialize(lt, chunk=chunk, dtype=out)
        assert part.dtype == (out or torch.float32) and tuple(part.shape) == f.base_shape
        assert part.is_contiguous()
        tol = 1e-2 if out is torch.bfloat16 else 1e-5
        np.testing.assert_allclose(part.to(torch.float64).numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max(), err_msg=name)


def test_materialize_refuses_bad_chunk() -> None:
    lt = apt.load(_adapter(np.float32))["lin"]
    with pytest.raises(ConversionError, match="chunk"):
        apt.materialize(lt, chunk=0)


def test_rank_is_refused_for_in_memory_adapters() -> None:
    with pytest.raises(ConversionError, match="rank"):
        apt.load(_adapter(np.float32), rank=2)


def _svd_adapter(dtype: str) -> adapterpack.Adapter:
    from adapterpack.encodings.lower import as_svd

    src = _adapter(np.float32, seed=6)
    mods = {n: as_svd(m, dtype=dtype) for n, m in src.modules.items() if n != "dora"}  # DoRA has no SVD of its own
    return adapterpack.Adapter(name="default", base_model="tiny/base", modules=mods)


@pytest.mark.parametrize("codec", ["raw", "byteplanes"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_svd_decoder_bit_identical_to_numpy(tmp_path: Path, codec: str, dtype: str) -> None:
    assert decoders.get_torch_decoder("svd") is decoders.svd.decode_svd
    path = tmp_path / "s.apack"
    adapterpack.save(_svd_adapter(dtype), path, codec=codec)
    ref = adapterpack.open(path)
    got = apt.load(path)
    for name, m in ref.modules.items():
        f = m.factors()
        lt = got[name]
        assert lt.layout == f.layout and lt.transpose == f.transpose and lt.scale == 1.0
        a2 = lt.A.reshape(lt.A.shape[0], -1)
        assert _bits(a2) == np.ascontiguousarray(f.A).tobytes()
        assert _bits(lt.B.reshape(lt.B.shape[0], lt.B.shape[1])) == np.ascontiguousarray(f.B).tobytes()
        np.testing.assert_allclose(apt.materialize(lt).numpy(), m.delta(), rtol=1e-5, atol=1e-6)


def test_rank_passes_through_to_open(tmp_path: Path) -> None:
    path = tmp_path / "s.apack"
    adapterpack.save(_svd_adapter("float32"), path, codec="raw")
    got = apt.load(path, rank=2)
    with adapterpack.open(path, rank=2) as ref:
        for name, m in ref.modules.items():
            assert got[name].rank == 2
            assert _bits(got[name].A.reshape(2, -1)) == np.ascontiguousarray(m.factors().A).tobytes()
            np.testing.assert_allclose(apt.materialize(got[name]).numpy(), m.delta(), rtol=1e-5, atol=1e-6)


def test_svd_decoder_refuses_unsorted_singular_values() -> None:
    from adapterpack.adapter import Module
    from adapterpack.errors import RecordError

    m = Module(
        "w",
        "svd",
        (3, 4),
        {"rank": 2},
        {"S": np.array([1.0, 2.0], np.float32), "Ut": np.ones((2, 3), np.float32), "Vt": np.ones((2, 4), np.float32)},
    )
    with pytest.raises(RecordError, match="descending"):
        decoders.decode(m, torch.device("cpu"), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA (CI); GPU runs load there")
def test_cuda_without_cuda_is_an_adapterpack_error(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path)
    with pytest.raises(ConversionError, match="not available"):
        apt.load(path, "cuda")
