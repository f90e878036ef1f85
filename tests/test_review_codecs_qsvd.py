"""Review round: hostile qsvd records, read by the numpy reader and by the torch decoder alike (spec/qsvd.md)."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest

from adapterpack.adapter import Module
from adapterpack.encodings import qsvd as Q
from adapterpack.errors import RankError, RecordError
from tests.test_qsvd_memory import record

torch = pytest.importorskip("torch")
from adapterpack.torch import decoders  # noqa: E402


def _numpy(m: Module) -> tuple[bytes, bytes]:
    f = m.factors()
    return f.A.tobytes(), f.B.tobytes()


def _torch(m: Module) -> tuple[bytes, bytes]:
    f = decoders.decode(m, torch.device("cpu"), None)
    return f.A.numpy().tobytes(), f.B.numpy().tobytes()


def _outcome(fn: Callable[[Module], tuple[bytes, bytes]], m: Module) -> tuple[str, tuple[bytes, bytes] | None]:
    try:
        return "ok", fn(m)
    except (RecordError, RankError) as e:
        return type(e).__name__, None


def test_random_damage_reads_the_same_in_numpy_and_torch() -> None:
    """Random widths, shapes and group sizes, bytes of ``data`` overwritten: both readers refuse (RecordError) or
    both return the same bits; nothing else escapes either."""
    rng = random.Random(41)
    refused = 0
    for it in range(150):
        out, n = rng.randint(1, 200), rng.randint(1, 200)
        widths = [rng.choice([*Q.BITS, Q.FLOAT]) for _ in range(rng.randint(0, min(4, out, n)))]
        m = record(out, n, widths, rng.choice([1, 3, 64, 256, Q.MAX_GROUP_SIZE]), seed=it)
        data = m.tensors["data"].copy()
        starts = [at for span in Q.component_spans(widths, out, n, m.params["group_size"]) for at in span[:3]]
        for _ in range(rng.randint(0, 3)):
            if len(data):  # anywhere, or in a singular value or the scales
                at = rng.randrange(len(data)) if rng.random() < 0.5 else min(rng.choice(starts) + rng.randrange(4), len(data) - 1)
                data[at] = rng.randrange(256)
        m.tensors["data"] = data
        a, b = _outcome(_numpy, m), _outcome(_torch, m)
        assert a == b, (it, widths, out, n)
        refused += a[0] != "ok"
    assert refused > 10


def _component0(widths: list[int]) -> tuple[Module, list[tuple[int, int, int, int, int, int]]]:
    m = record(24, 40, widths, 8)
    return m, Q.component_spans(widths, 24, 40, 8)


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        ("S", np.array([np.nan], "<f4"), "singular value"),
        ("S", np.array([np.inf], "<f4"), "singular value"),
        ("S", np.array([-1e-30], "<f4"), "singular value"),
        ("v_scales", np.array([np.nan], "<f2"), "scales"),  # the second vector's scales: checked as well
        ("v_scales", np.array([-np.inf], "<f2"), "scales"),
    ],
)
def test_non_finite_or_negative_values_are_refused_by_both(where: str, value: np.ndarray, match: str) -> None:
    m, spans = _component0([3, 5])
    s0, _su, sv, _cu, _cv, _end = spans[1]
    at = {"S": s0, "v_scales": sv}[where]
    data = m.tensors["data"].copy()
    data[at : at + value.nbytes] = np.frombuffer(value.tobytes(), np.uint8)
    m.tensors["data"] = data
    for fn in (_numpy, _torch):
        with pytest.raises(RecordError, match=match):
            fn(m)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_float_width_value_is_refused_by_both(bad: float) -> None:
    m, spans = _component0([Q.FLOAT, 2])
    _s0, _su, _sv, _cu, cv, _end = spans[0]
    data = m.tensors["data"].copy()
    data[cv + 6 : cv + 8] = np.frombuffer(np.array([bad], "<f2").tobytes(), np.uint8)  # v̂_0's fourth value
    m.tensors["data"] = data
    for fn in (_numpy, _torch):
        with pytest.raises(RecordError, match="non-finite float values"):
            fn(m)


def test_negative_zero_singular_value_and_subnormal_scales_are_read() -> None:
    """Odd but legal: S = -0.0 (not < 0) and binary16 subnormal scales decode, the same bits in both readers."""
    m, spans = _component0([4])
    s0, su, _sv, cu, _cv, _end = spans[0]
    data = m.tensors["data"].copy()
    data[s0:su] = np.frombuffer(np.array([-0.0], "<f4").tobytes(), np.uint8)
    data[su:cu] = np.frombuffer(np.full((cu - su) // 2, 2.0**-24, "<f2").tobytes(), np.uint8)
    m.tensors["data"] = data
    assert _numpy(m) == _torch(m)
    m2, spans2 = _component0([4])
    s0, su, _sv, cu, _cv, _end = spans2[0]
    data = m2.tensors["data"].copy()
    data[su:cu] = np.frombuffer(np.full((cu - su) // 2, 2.0**-24, "<f2").tobytes(), np.uint8)
    m2.tensors["data"] = data
    assert _numpy(m2) == _torch(m2) and np.any(np.frombuffer(_numpy(m2)[0], np.float32) != 0)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"bits": [0]}, RecordError),
        ({"bits": [9]}, RecordError),
        ({"bits": [15]}, RecordError),
        ({"bits": [17]}, RecordError),
        ({"bits": [4.0]}, RecordError),
        ({"bits": [True]}, RecordError),
        ({"bits": [4, 4]}, RecordError),
        ({"group_size": 0}, RecordError),
        ({"group_size": Q.MAX_GROUP_SIZE + 1}, RecordError),
        ({"group_size": 8.0}, RecordError),
        ({"rank": 2, "bits": [4, 4]}, RecordError),  # data of one component
        ({"rank": 25, "bits": [1] * 25}, RankError),  # above min(out, in) = 24
        ({"rank": -1}, RankError),
    ],
)
def test_bad_params_are_refused_by_both(params: dict, error: type[Exception]) -> None:
    m = record(24, 40, [4], 8)
    m.params.update(params)
    for fn in (_numpy, _torch):
        with pytest.raises(error):
            fn(m)


def test_an_unknown_slot_is_refused_by_the_torch_decoder_too() -> None:
    """numpy's reader refuses a qsvd record with a slot besides ``data``; the torch decoder ignores it (in-memory
    modules only: a file's records are validated when the reader builds them)."""
    m = record(24, 40, [4], 8)
    m.tensors["S"] = np.zeros(1, np.float32)
    with pytest.raises(RecordError, match="unknown"):
        _numpy(m)
    with pytest.raises(RecordError, match="unknown"):
        _torch(m)
