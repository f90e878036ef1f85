"""Property tests: any adapter survives save → open bit-exact; any mutated file is refused cleanly.

Float tensors are drawn as arbitrary bit patterns (NaN payloads, -0.0, subnormals,
infinities), so "bit-exact" means byte comparison, never ``==`` on values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adapterpack
from adapterpack import errors
from adapterpack.adapter import Adapter, Module, as_array
from adapterpack.container import ApackReader
from adapterpack.errors import AdapterpackError
from tests.apack_builders import load_everything, lora_module
from tools.fuzz_open import CODECS as SEED_CODECS
from tools.fuzz_open import exercise, mutations, seed_files

FLOATS = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16, "float64": np.uint64}
NUMPY = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
CODECS = ("raw", "zstd", "byteplanes", "pco")
dims = st.integers(0, 5)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)


def bits_array(dtype: str, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``dtype`` whose elements are arbitrary bit patterns (bool: False/True)."""
    if dtype == "bool":
        return hnp.arrays(np.bool_, shape)
    if dtype in FLOATS:
        carrier = np.dtype(FLOATS[dtype])
        special = {
            np.uint16: [0x8000, 0x7C01, 0xFE01, 0x7F81, 0xFFC1],
            np.uint32: [0x80000000, 0x7F800001, 0xFFC00123],
            np.uint64: [1 << 63, 0x7FF0000000000001],
        }
        elems = st.one_of(st.sampled_from(special[FLOATS[dtype]]), st.integers(0, 2 ** (8 * carrier.itemsize) - 1))
        return hnp.arrays(carrier, shape, elements=elems).map(lambda a: a.view(NUMPY[dtype]))
    return hnp.arrays(NUMPY[dtype], shape)


@st.composite
def lora_modules(draw: st.DrawFn, name: str) -> Module:
    """A lora record of any layout, with random shapes (zero-size included) and bit patterns."""
    rank = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(sorted(FLOATS)))
    layout = draw(st.sampled_from(["linear", "linear-fifo", "embedding", "conv"]))
    out_f, in_f = draw(dims), draw(dims)
    params: dict[str, Any] = {
        "rank": rank,
        "alpha": draw(st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False))),
    }
    if draw(st.booleans()):
        params["rslora"] = draw(st.booleans())
    if layout == "conv":
        kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
        a_shape, b_shape, base = (rank, in_f, *kernel), (out_f, rank) + (1,) * len(kernel), (out_f, in_f, *kernel)
        params["layout"] = "conv"
    elif layout == "embedding":
        a_shape, b_shape, base = (rank, in_f), (out_f, rank), (in_f, out_f)
        params["layout"] = "embedding"
    else:
        fifo = layout == "linear-fifo"
        a_shape, b_shape, base = (rank, in_f), (out_f, rank), ((in_f, out_f) if fifo else (out_f, in_f))
        if fifo or draw(st.booleans()):
            params["fan_in_fan_out"] = fifo
    tensors = {"A": draw(bits_array(dtype, a_shape)), "B": draw(bits_array(dtype, b_shape))}
    if draw(st.booleans()):
        params["dora"] = True
        tensors["magnitude"] = draw(bits_array(draw(st.sampled_from(sorted(FLOATS))), (out_f,)))
    return Module(name, "lora", base, params, tensors)


@st.composite
def adapters(draw: st.DrawFn, name: str = "default") -> Adapter:
    """An adapter: a few lora modules, pass-through tensors of every spec dtype, provenance."""
    mod_names = draw(st.lists(names, max_size=4, unique=True))
    modules = {n: draw(lora_modules(n)) for n in mod_names}
    tensor_names = draw(st.lists(names, max_size=3, unique=True))
    tensors = {}
    for n in tensor_names:
        dtype = draw(st.sampled_from(sorted(NUMPY)))
        shape = tuple(draw(st.lists(dims, max_size=3)))
        tensors[n] = draw(bits_array(dtype, shape))
    json_leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1), st.floats(allow_nan=False, allow_infinity=False), names
    )
    source = draw(
        st.dictionaries(
            names,
            st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(names, c, max_size=3), max_leaves=6),
            max_size=3,
        )
    )
    return Adapter(
        name=name,
        base_model=draw(st.one_of(st.none(), names)),
        base_architecture=draw(st.one_of(st.none(), names)),
        modules=modules,
        tensors=tensors,
        source=source,
        metadata=draw(st.dictionaries(names, st.text(max_size=10), max_size=3)),
    )


@st.composite
def adapter_lists(draw: st.DrawFn) -> list[Adapter]:
    """One or two adapters with distinct names."""
    ad_names = draw(st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=12), min_size=1, max_size=2, unique=True))
    return [draw(adapters(n)) for n in ad_names]


def same_tensor(got: Any, want: np.ndarray) -> None:
    arr = as_array(got)
    assert arr.dtype == want.dtype and arr.shape == want.shape
    assert arr.tobytes() == want.tobytes()


def assert_same(got: Adapter, want: Adapter) -> None:
    """Every field and every tensor byte equal."""
    assert (got.name, got.base_model, got.base_architecture) == (want.name, want.base_model, want.base_architecture)
    assert got.source == want.source and got.metadata == want.metadata and got.skipped == []
    assert list(got.modules) == list(want.modules)
    for name, w in want.modules.items():
        g = got.modules[name]
        assert (g.name, g.encoding, tuple(g.base_shape), g.must_understand) == (
            w.name,
            w.encoding,
            tuple(w.base_shape),
            w.must_understand,
        )
        assert g.params == w.params
        assert {k: type(v) for k, v in g.params.items()} == {k: type(v) for k, v in w.params.items()}  # 2 stays int, 2.0 float
        assert list(g.tensors) == list(w.tensors)
        for slot, t in w.tensors.items():
            same_tensor(g.tensors[slot], t)
    assert list(got.tensors) == list(want.tensors)
    for n, t in want.tensors.items():
        same_tensor(got.tensors[n], t)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hyp")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ads=adapter_lists(), level=st.sampled_from([1, 3]))
def test_save_open_is_bit_exact(ads: list[Adapter], level: int, workdir: Path) -> None:
    for codec in CODECS:
        path = workdir / f"rt-{codec}.apack"
        result = adapterpack.save(ads, path, codec=codec, level=level)
        assert result.file_size == path.stat().st_size
        reader = ApackReader(path)
        assert reader.adapter_names == [a.name for a in ads]
        for want in ads:
            assert_same(reader.adapter(want.name), want)
        report = reader.verify()
        assert report.ok and report.bytes_checked == result.decoded_bytes, report.problems
        assert result.decoded_bytes == sum(a.decoded_bytes for a in ads)
        reader.close()


# --- the writer never writes a file its reader refuses ------------------------------------------------

edge_names = st.one_of(names, st.just(""), st.integers(250, 260).map(lambda n: "é" * n), st.integers(1020, 1030).map("x".__mul__))
odd_values = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and infinities included
    st.sampled_from([np.int64(3), np.float32(0.5), np.bool_(True), np.uint8(7), np.float64("nan"), np.zeros(2), object(), {1}]),
    names,
)


@st.composite
def hostile_adapters(draw: st.DrawFn) -> list[Adapter]:
    """Adapters a caller might build, valid or not: edge-length names, too many dimensions, wrong
    DoRA magnitudes, numpy scalars and non-JSON values in params and source, duplicate names."""
    ads = []
    for ad_name in draw(st.lists(edge_names, min_size=1, max_size=2)):
        modules = {}
        for mname in draw(st.lists(edge_names, max_size=2)):
            m = draw(lora_modules(mname))
            if draw(st.booleans()):
                m.params[draw(st.sampled_from(["rank", "alpha", "rslora", "layout", "fan_in_fan_out", "x"]))] = draw(odd_values)
            if draw(st.booleans()):
                m.params["dora"] = True
                m.tensors["magnitude"] = np.ones(draw(st.integers(0, 6)), np.float32)
            if draw(st.booleans()):
                m.base_shape = tuple(np.int64(d) for d in m.base_shape)
            modules[draw(st.sampled_from([mname, "same"]))] = m
        tensors = {n: np.zeros((1,) * draw(st.integers(0, 10)), np.float32) for n in draw(st.lists(edge_names, max_size=2))}
        source = draw(st.dictionaries(st.one_of(names, st.integers(0, 3)), odd_values, max_size=3))
        ads.append(Adapter(name=ad_name, modules=modules, tensors=tensors, source=source))
    return ads


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ads=hostile_adapters(), codec=st.sampled_from(CODECS))
def test_writer_never_writes_a_file_the_reader_refuses(
    ads: list[Adapter], codec: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Either save refuses with an AdapterpackError and writes nothing, or every adapter opens, reads and verifies."""
    folder = tmp_path_factory.mktemp("w")
    path = folder / "w.apack"
    try:
        adapterpack.save(ads, path, codec=codec)
    except AdapterpackError as e:
        event(f"refused: {type(e).__name__}")
        assert list(folder.iterdir()) == []
        return
    event("written")
    with np.errstate(all="ignore"):  # ΔW of arbitrary bit patterns overflows; computing it is what is tested
        loaded = load_everything(path, delta_limit=1 << 12)
    for ad in loaded:
        ad.close()
    assert ApackReader(path).verify().ok


def test_special_float_bits_survive(tmp_path: Path) -> None:
    """A fixed example of the hard cases, so they are covered even when Hypothesis does not draw them."""
    nan_payloads = {
        np.float32: np.array([0x7FC00001, 0xFF800001, 0x80000000, 0x00000001, 0x7F800000], np.uint32),
        np.float16: np.array([0x7E01, 0xFC01, 0x8000, 0x0001, 0x7C00], np.uint16),
        ml_dtypes.bfloat16: np.array([0x7FC1, 0xFF81, 0x8000, 0x0001, 0x7F80], np.uint16),
        np.float64: np.array([0x7FF8000000000001, 0xFFF0000000000001, 1 << 63, 1, 0x7FF0000000000000], np.uint64),
    }
    for dt, bits in nan_payloads.items():
        m = lora_module("m", rank=1, out_f=5, in_f=5, dtype=dt)
        m.tensors["A"] = bits.view(np.dtype(dt)).reshape(1, 5)
        m.tensors["B"] = bits[::-1].copy().view(np.dtype(dt)).reshape(5, 1)
        ad = Adapter(modules={"m": m})
        for codec in CODECS:
            adapterpack.save(ad, tmp_path / "s.apack", codec=codec)
            assert_same(adapterpack.open(tmp_path / "s.apack"), ad)


# --- mutations: a damaged file is either read or refused with an AdapterpackError -----------------


def open_read_verify(path: Path) -> str:
    """Everything a user might do with a file: open, read every tensor and small ΔW, verify."""
    return exercise(path)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutations())
def test_mutated_file_is_read_or_refused_cleanly(raw: bytes, workdir: Path) -> None:
    """exercise() returns "ok", "verify-problem" or the AdapterpackError class; anything else propagates and fails."""
    path = workdir / "mutated.apack"
    path.write_bytes(raw)
    outcome = exercise(path)
    assert outcome in ("ok", "verify-problem") or issubclass(getattr(errors, outcome), AdapterpackError)


def test_seed_files_are_valid(workdir: Path) -> None:
    seeds = seed_files()
    assert len(seeds) == len(SEED_CODECS) == 4
    for i, raw in enumerate(seeds):
        path = workdir / f"seed{i}.apack"
        path.write_bytes(raw)
        assert exercise(path) == "ok"
        codecs = {b.codec_id for b in ApackReader(path).blobs}
        assert codecs == ({"raw"} if i == 0 else {"raw", SEED_CODECS[i]})


def test_exercise_reports_refusals(workdir: Path) -> None:
    raw = bytearray(seed_files()[1])
    raw[-1] ^= 0xFF  # last blob's bytes
    path = workdir / "bad.apack"
    path.write_bytes(bytes(raw))
    assert exercise(path) in ("ChecksumError", "CodecError")
    path.write_bytes(b"")
    assert exercise(path) == "TruncatedFileError"
