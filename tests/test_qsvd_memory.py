"""qsvd readers decode in bounded blocks: the same bits as the per-vector definition on vectors longer than a
block (every width, group sizes that do and do not divide the block), and temporaries bounded by the block,
not the vector (tracemalloc for numpy; every tensor the torch decoder creates, for torch)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

from adapterpack.adapter import Module
from adapterpack.encodings import qsvd as Q
from adapterpack.errors import RecordError
from adapterpack.linalg.quantize import CODE_BLOCK, SMALL_BLOCK

WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8, Q.FLOAT]


def record(out: int, n: int, widths: list[int], group_size: int, seed: int = 0) -> Module:
    """A linear qsvd record with random codes (padding bits included), positive scales and singular values."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, Q.stream_bytes(widths, out, n, group_size), dtype=np.uint8)
    for w, (s0, su, _sv, cu, _cv, end) in zip(widths, Q.component_spans(widths, out, n, group_size), strict=True):
        data[s0:su] = np.frombuffer(np.float32(rng.uniform(0.1, 3.0)).tobytes(), np.uint8)
        data[su:cu] = np.frombuffer(rng.uniform(1e-4, 1.0, (cu - su) // 2).astype("<f2").tobytes(), np.uint8)
        if w == Q.FLOAT:
            data[cu:end] = np.frombuffer(rng.standard_normal((end - cu) // 2).astype("<f2").tobytes(), np.uint8)
    params = {"rank": len(widths), "bits": list(widths), "group_size": group_size}
    return Module("m", "qsvd", (out, n), params, {"data": data})


def reference(m: Module) -> tuple[np.ndarray, np.ndarray]:
    """A and B by the spec's per-vector definition (spec/qsvd.md §2–3), unpacked bit by bit."""
    p = m.params
    out, n = m.base_shape
    g, data = p["group_size"], m.tensors["data"]
    a, b = np.zeros((p["rank"], n), np.float32), np.zeros((out, p["rank"]), np.float32)
    spans = Q.component_spans(p["bits"], out, n, g)
    for j, (w, (s0, su, sv, cu, cv, end)) in enumerate(zip(p["bits"], spans, strict=True)):
        root = np.float32(np.sqrt(np.float64(np.frombuffer(data[s0:su].tobytes(), "<f4")[0])))
        for count, (c0, c1), (g0, g1), put in ((out, (cu, cv), (su, sv), b[:, j]), (n, (cv, end), (sv, cu), a[j])):
            if w == Q.FLOAT:
                x = np.frombuffer(data[c0:c1].tobytes(), "<f2").astype(np.float32)
            else:
                bits = np.unpackbits(data[c0:c1], bitorder="little", count=count * w).reshape(count, w)
                codes = bits.astype(np.int64) @ (1 << np.arange(w, dtype=np.int64))
                scales = np.frombuffer(data[g0:g1].tobytes(), "<f2").astype(np.float32)
                x = (2 * codes - ((1 << w) - 1)).astype(np.float32) * scales[np.arange(count) // g]
            put[:] = x * root
    return a, b


@pytest.mark.parametrize("group_size", [1, 7, 64, CODE_BLOCK, 1 << 30])
def test_blocked_decode_is_bit_identical_on_long_vectors(group_size: int) -> None:
    # last blocks on the column path (ragged) and on the bit-by-bit path; a vector shorter than one block
    m = record(2 * CODE_BLOCK + SMALL_BLOCK + 13, 5 * SMALL_BLOCK + 3, WIDTHS, group_size, seed=group_size % 1000)
    f = m.factors()
    a, b = reference(m)
    assert f.A.tobytes() == a.tobytes() and f.B.tobytes() == b.tobytes()


def test_torch_blocked_decode_matches_numpy_on_long_vectors() -> None:
    torch = pytest.importorskip("torch")
    from adapterpack.torch.decoders import decode

    for g in (7, 1 << 30):
        m = record(CODE_BLOCK + SMALL_BLOCK + 13, 2 * CODE_BLOCK + 3, WIDTHS, g, seed=3)
        f, lt = m.factors(), decode(m, torch.device("cpu"), None)
        assert lt.A.numpy().tobytes() == f.A.tobytes() and lt.B.contiguous().numpy().tobytes() == f.B.tobytes()


def test_a_bad_value_past_the_first_block_is_refused() -> None:
    m = record(3 * CODE_BLOCK, 8, [Q.FLOAT], 64)
    cu = Q.component_spans([Q.FLOAT], 3 * CODE_BLOCK, 8, 64)[0][3]
    m.tensors["data"][cu + 2 * (2 * CODE_BLOCK + 1) : cu + 2 * (2 * CODE_BLOCK + 2)] = np.frombuffer(
        np.array([np.inf], "<f2").tobytes(), np.uint8
    )
    with pytest.raises(RecordError, match="non-finite"):
        m.factors()
    m = record(3 * CODE_BLOCK, 8, [4], 1)
    su = Q.component_spans([4], 3 * CODE_BLOCK, 8, 1)[0][1]
    m.tensors["data"][su + 2 * (2 * CODE_BLOCK + 1) : su + 2 * (2 * CODE_BLOCK + 2)] = np.frombuffer(
        np.array([-1.0], "<f2").tobytes(), np.uint8
    )
    with pytest.raises(RecordError, match="scales"):
        m.factors()


N_BIG = 1 << 21  # 32 blocks per vector: a per-vector temporary of even 1 byte per value shows up


@pytest.mark.parametrize(("width", "group_size"), [(8, 1 << 30), (3, 1), (Q.FLOAT, 64)])
def test_numpy_decode_peak_is_bounded_by_the_block(width: int, group_size: int) -> None:
    m = record(N_BIG, N_BIG, [width], group_size)
    factor_bytes = 2 * N_BIG * 4
    tracemalloc.start()
    try:
        f = m.factors()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f.A.nbytes + f.B.nbytes == factor_bytes
    # the factors themselves, plus a few bytes per code of one block (the old per-vector unpacking took 48 B/value)
    assert peak - factor_bytes < 32 * CODE_BLOCK + (1 << 16), f"extra peak {peak - factor_bytes} bytes"


def test_torch_decode_creates_no_tensor_larger_than_a_block() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils._pytree import tree_leaves

    from adapterpack.torch.decoders import decode

    class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
        """Shape and bytes of every non-view tensor an aten op creates."""

        def __init__(self) -> None:
            super().__init__()
            self.made: list[tuple[str, tuple[int, ...], int]] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            res = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):  # a view or an in-place op: nothing new
                return res
            for t in tree_leaves(res):
                if isinstance(t, torch.Tensor):
                    self.made.append((str(func), tuple(t.shape), t.numel() * t.element_size()))
            return res

    n = 1 << 20
    for width, g in ((8, 1 << 30), (3, 1), (Q.FLOAT, 64)):
        m = record(n, n, [width], g)
        m.tensors["data"] = torch.from_numpy(m.tensors["data"])  # staged, as the loader hands it over
        with Sizes() as sizes:
            decode(m, torch.device("cpu"), None)
        factors = {(1, n), (n, 1)}
        temps = [(op, shape, size) for op, shape, size in sizes.made if shape not in factors]
        biggest = max(temps, key=lambda x: x[2])
        # at most 8 bytes per value of one block (the old decoder's [bytes, 8] int32 stream was 32 MiB here)
        assert biggest[2] <= 8 * CODE_BLOCK, (width, g, biggest)
