"""adapterpack.torch: bit-exact factors on a device, dtype casts, ΔW, memory safety, errors."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import adapterpack
import adapterpack.torch as apt
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader
from adapterpack.errors import AdapterNotFoundError, ChecksumError, ConversionError

EXAMPLE = Path(adapterpack.__file__).parent / "examples" / "smollm2-pydoc-lora"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}
CODECS = ["raw", "zstd", "byteplanes"]


def _bits(t: torch.Tensor) -> bytes:
    """The tensor's bytes (any dtype, bfloat16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _adapter(dtype: object, seed: int = 0, name: str = "default") -> Adapter:
    """One module of every lora layout (linear, fan_in_fan_out, embedding, conv, DoRA), factors of ``dtype``."""
    rng = np.random.default_rng(seed)

    def arr(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    r = 4
    mods = [
        Module("lin", "lora", (24, 40), {"rank": r, "alpha": 8.0}, {"A": arr(r, 40), "B": arr(24, r, scale=0.1)}),
        Module("fifo", "lora", (40, 24), {"rank": r, "alpha": 4.0, "fan_in_fan_out": True}, {"A": arr(r, 40), "B": arr(24, r)}),
        Module("emb", "lora", (50, 16), {"rank": r, "alpha": 8.0, "layout": "embedding"}, {"A": arr(r, 50), "B": arr(16, r)}),
        Module(
            "conv",
            "lora",
            (8, 3, 3, 3),
            {"rank": r, "alpha": 2.0, "layout": "conv", "rslora": True},
            {"A": arr(r, 3, 3, 3), "B": arr(8, r, 1, 1)},
        ),
        Module(
            "dora",
            "lora",
            (24, 40),
            {"rank": r, "alpha": 8.0, "dora": True},
            {"A": arr(r, 40), "B": arr(24, r), "magnitude": arr(24)},
        ),
    ]
    return Adapter(name=name, base_model="tiny/base", modules={m.name: m for m in mods})


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_factors_bit_identical_to_numpy_decode(tmp_path: Path, codec: str, dtype: str) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(DTYPES[dtype]), path, codec=codec)
    ref = adapterpack.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        got = apt.load(path)
    assert list(got) == list(ref.modules)
    for name, m in ref.modules.items():
        lt = got[name]
        for slot, t in (("A", lt.A), ("B", lt.B), ("magnitude", lt.magnitude)):
            if slot not in m.tensors:
                assert t is None
                continue
            want = m.array(slot)
            assert t.dtype == apt.TORCH_DTYPES[dtype] and t.device.type == "cpu"
            assert tuple(t.shape) == want.shape
            assert _bits(t) == want.tobytes()
        assert lt.scale == m.implementation.scale(m)
        assert lt.base_shape == tuple(m.base_shape)
        assert lt.rank == 4


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_materialize_equals_numpy_delta(tmp_path: Path, codec: str, dtype: str) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(DTYPES[dtype], seed=1), path, codec=codec)
    ref = adapterpack.open(path)
    got = apt.load(path)
    for name, m in ref.modules.items():
        want = m.delta()
        dw = apt.materialize(got[name])
        assert dw.dtype == (torch.float64 if dtype == "float64" else torch.float32)
        assert tuple(dw.shape) == tuple(m.base_shape) == want.shape
        np.testing.assert_allclose(dw.numpy(), want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def test_layout_flags(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path)
    got = apt.load(path)
    assert [(n, lt.layout, lt.transpose, lt.magnitude is not None) for n, lt in got.items()] == [
        ("lin", "linear", False, False),
        ("fifo", "linear", True, False),
        ("emb", "embedding", True, False),
        ("conv", "conv", False, False),
        ("dora", "linear", False, True),
    ]
    assert got["conv"].scale == pytest.approx(2.0 / 2.0)  # rslora: alpha / sqrt(4)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("src", "dst"), [("bfloat16", torch.float32), ("float32", torch.bfloat16), ("float32", "fp16"), ("float16", "float32")]
)
def test_dtype_conversion(tmp_path: Path, codec: str, src: str, dst: torch.dtype | str) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(DTYPES[src]), path, codec=codec)
    ref = adapterpack.open(path)
    got = apt.load(path, dtype=dst)
    want_torch = apt.torch_dtype(dst)
    want_np = DTYPES[{torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[want_torch]]
    for name, m in ref.modules.items():
        for slot in ("A", "B"):
            t = getattr(got[name], slot)
            assert t.dtype == want_torch
            # torch and numpy/ml_dtypes both round to nearest even: the same bits
            assert _bits(t) == m.array(slot).astype(want_np).tobytes()


def test_raw_tensors_are_safe_to_write(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    src = _adapter(np.float32)
    adapterpack.save(src, path, codec="raw")
    before = path.read_bytes()
    got = apt.load(path)
    got["lin"].A.fill_(7.0)  # a private copy-on-write page: neither the file nor later loads see it
    got["lin"].B.add_(1.0)
    assert path.read_bytes() == before
    again = apt.load(path)
    assert _bits(again["lin"].A) == src.modules["lin"].tensors["A"].tobytes()
    assert adapterpack.open(path).module("lin").array("B").tobytes() == src.modules["lin"].tensors["B"].tobytes()


def test_tensors_outlive_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    src = _adapter(ml_dtypes.bfloat16)
    adapterpack.save(src, path, codec="raw")
    a = apt.load(path)["emb"].A
    import gc

    gc.collect()
    assert _bits(a) == src.modules["emb"].tensors["A"].tobytes()


def _corrupt_first_blob(path: Path) -> None:
    with ApackReader(path) as r:
        pos = r.data_start + r.blobs[0].offset
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_verify_catches_corruption(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "a.apack"
    src = _adapter(np.float32)
    adapterpack.save(src, path, codec=codec)
    _corrupt_first_blob(path)
    with pytest.raises(ChecksumError, match="blob 0"):
        apt.load(path)
    if codec == "raw":  # without verification the flipped bit comes through as stored
        got = apt.load(path, verify=False)
        assert _bits(got["lin"].A) != src.modules["lin"].tensors["A"].tobytes()


def test_multi_adapter_file(tmp_path: Path) -> None:
    path = tmp_path / "two.apack"
    one, two = _adapter(np.float32, seed=1, name="one"), _adapter(np.float16, seed=2, name="two")
    adapterpack.save([one, two], path, codec="raw")
    got = apt.load(path, adapter="two")
    assert got["lin"].A.dtype == torch.float16
    assert _bits(got["lin"].A) == two.modules["lin"].tensors["A"].tobytes()
    with pytest.raises(AdapterNotFoundError):
        apt.load(path)  # two adapters: must name one
    with pytest.raises(AdapterNotFoundError):
        apt.load(path, adapter="three")


def test_in_memory_adapter(tmp_path: Path) -> None:
    src = _adapter(ml_dtypes.bfloat16)
    got = apt.load(src, dtype=torch.float32)
    for name, m in src.modules.items():
        assert _bits(got[name].A) == m.tensors["A"].astype(np.float32).tobytes()
        np.testing.assert_allclose(apt.materialize(got[name]).numpy(), m.delta(), rtol=1e-6, atol=1e-7)


def test_tensor_copies_read_only_arrays() -> None:
    base = np.arange(12, dtype=np.float32)
    ro = base.reshape(3, 4)
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = apt.tensor(ro)
    t.fill_(0)
    assert base[5] == 5.0  # a copy, not a view of read-only memory
    rw = np.arange(4, dtype=ml_dtypes.bfloat16)
    tw = apt.tensor(rw)
    assert tw.dtype == torch.bfloat16 and tw.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dtype": torch.int8}, "floating"), ({"dtype": "float8"}, "unknown dtype"), ({"device": "nonsense"}, "bad device")],
)
def test_bad_requests_are_adapterpack_errors(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path)
    with pytest.raises(ConversionError, match=match):
        apt.load(path, **kwargs)


def test_bundled_example_peft_folder_and_apack_agree(tmp_path: Path) -> None:
    st = load_file(str(EXAMPLE / "adapter_model.safetensors"))
    from_peft = apt.load(EXAMPLE)
    path = tmp_path / "example.apack"
    adapterpack.save(adapterpack.open(EXAMPLE), path, codec="byteplanes")
    from_apack = apt.load(path)
    assert len(from_peft) == len(from_apack) == len(st) // 2 == 120
    ref = adapterpack.open(path)
    for name, lt in from_apack.items():
        for slot in ("A", "B"):
            want = st[f"base_model.model.{name}.lora_{slot}.weight"].tobytes()
            assert _bits(getattr(lt, slot)) == _bits(getattr(from_peft[name], slot)) == want
        assert lt.scale == from_peft[name].scale == 2.0  # alpha 16 / r 8
        np.testing.assert_allclose(apt.materialize(lt).numpy(), ref.delta(name), rtol=1e-6, atol=1e-9)


def test_core_imports_without_torch(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(np.float32), path)
    code = (
        "import sys, adapterpack; ad = adapterpack.open(sys.argv[1]); ad.delta('lin');"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int64])
def test_tensor_keeps_0d_arrays_0d(dtype: type) -> None:
    arr = np.array(2.5 if dtype is not np.int64 else 7, dtype=dtype)
    t = apt.tensor(arr)
    assert t.shape == () and float(t) == float(arr)
    ro = np.array(1.5, np.float32)
    ro.flags.writeable = False
    assert apt.tensor(ro).shape == ()


@pytest.mark.parametrize(("out", "inp"), [(0, 6), (5, 0)])
def test_materialize_with_an_empty_dimension(out: int, inp: int) -> None:
    factors = {"A": np.ones((2, inp), np.float32), "B": np.ones((out, 2), np.float32)}
    m = Module("w", "lora", (out, inp), {"rank": 2, "alpha": 2.0}, factors)
    conv = Module(
        "c",
        "lora",
        (out, inp, 3, 3),
        {"rank": 2, "alpha": 2.0, "layout": "conv"},
        {"A": np.ones((2, inp, 3, 3), np.float32), "B": np.ones((out, 2, 1, 1), np.float32)},
    )
    ad = Adapter(modules={"w": m, "c": conv})
    got = apt.load(ad)
    for name, mod in ad.modules.items():
        delta = apt.materialize(got[name])
        assert tuple(delta.shape) == mod.base_shape and np.array_equal(delta.numpy(), mod.delta())
