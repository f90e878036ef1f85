"""Philox4x32-10 and the NOLA basis layout: Random123's known answers, numpy ≡ torch bit for bit,
and no dependence on chunking."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from adapterpack.errors import RecordError
from adapterpack.rng import KAT, basis, basis_bits, iter_bases, philox4x32_10, seed_key, uniform
from adapterpack.rng import philox as philox_mod
from adapterpack.rng.basis import KIND_A, KIND_A0, KIND_B, KIND_B0
from adapterpack.torch import rng as torch_rng


@pytest.mark.parametrize(("counter", "key", "want"), KAT)
def test_numpy_matches_random123_known_answers(counter: tuple[int, ...], key: tuple[int, int], want: tuple[int, ...]) -> None:
    got = philox4x32_10(np.array([counter, counter], np.uint32), key)
    assert got.dtype == np.uint32
    assert [tuple(int(x) for x in row) for row in got] == [want, want]


def test_known_answers_are_random123s() -> None:
    """The three published rows, spelled out here independently of the module's table."""
    assert KAT[0] == ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8))
    assert KAT[1][2] == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert KAT[2][2] == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize(("counter", "key", "want"), KAT)
def test_torch_matches_random123_known_answers(counter: tuple[int, ...], key: tuple[int, int], want: tuple[int, ...]) -> None:
    c = [torch.tensor([w], dtype=torch.int64) for w in counter]
    assert tuple(int(x) for x in torch_rng.philox4x32_10(*c, key)[0]) == want


def test_numpy_chunking_does_not_change_output(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 2**32, (1000, 4), dtype=np.uint64).astype(np.uint32)
    whole = philox4x32_10(ctr, (123, 0xFFFFFFFF))
    monkeypatch.setattr(philox_mod, "BLOCK_CHUNK", 7)
    assert np.array_equal(philox4x32_10(ctr, (123, 0xFFFFFFFF)), whole)


def test_basis_chunking_does_not_change_output(monkeypatch: pytest.MonkeyPatch) -> None:
    basis_mod = importlib.import_module("adapterpack.rng.basis")  # the package re-exports a function of that name

    whole = basis(4, 2, KIND_B, 3, 8, 101)
    bits = basis_bits(4, 2, KIND_B, 3, 8, 101, 9)
    monkeypatch.setattr(basis_mod, "BLOCK_CHUNK", 7)
    assert np.array_equal(basis(4, 2, KIND_B, 3, 8, 101), whole)
    assert np.array_equal(basis_bits(4, 2, KIND_B, 3, 8, 101, 9), bits)


def test_counter_layout_is_the_specs() -> None:
    """Element e of basis i: counter (e // 4, i, stream, kind), word e mod 4, key from the seed's two halves."""
    seed, stream, n = (7 << 32) | 11, 5, 10
    for kind in (KIND_A, KIND_B, KIND_A0, KIND_B0):
        bits = basis_bits(seed, stream, kind, 3, 5, n)
        for i in (3, 4):
            for e in range(n):
                word = philox4x32_10(np.array([[e // 4, i, stream, kind]], np.uint32), (11, 7))[0, e % 4]
                assert bits[i - 3, e] == word
    assert seed_key(seed) == (11, 7)


def test_uniform_mapping_is_exact() -> None:
    words = np.array([0, 0xFF, 0x100, 0x80000000, 0xFFFFFFFF], np.uint32)
    want = np.array([-1.0, -1.0, -1.0 + 2.0**-23, 0.0, 1.0 - 2.0**-23], np.float64)
    got = uniform(words)
    assert got.dtype == np.float32 and np.array_equal(got.astype(np.float64), want)
    # every value is (x >> 8) / 2^23 - 1 exactly, as a float64 computation confirms
    many = np.random.default_rng(1).integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32)
    assert np.array_equal(uniform(many).astype(np.float64), (many >> 8).astype(np.float64) / 2.0**23 - 1.0)
    assert np.array_equal(torch_rng.uniform(torch.from_numpy(many.astype(np.int64))).numpy(), uniform(many))


def test_first_basis_value_from_the_zero_known_answer() -> None:
    """Seed 0, stream 0, A basis 0, element 0 is Random123's first word 0x6627e8d5 mapped to [-1, 1)."""
    assert basis(0, 0, KIND_A, 0, 1, 1)[0, 0] == np.float32((0x6627E8D5 >> 8) / 2.0**23 - 1.0)


@pytest.mark.parametrize(
    ("seed", "stream", "kind", "start", "stop", "n"),
    [(5, 7, KIND_B, 0, 6, 13), (2**40 + 3, 2**32 - 1, KIND_B0, 2**32 - 5, 2**32, 1001), (0, 0, KIND_A, 0, 2, 2**17 + 3)],
)
def test_torch_is_bit_identical_to_numpy(seed: int, stream: int, kind: int, start: int, stop: int, n: int) -> None:
    want = basis(seed, stream, kind, start, stop, n)
    got = torch_rng.basis(seed, stream, kind, start, stop, n, "cpu")
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def test_torch_chunking_does_not_change_output(monkeypatch: pytest.MonkeyPatch) -> None:
    want = torch_rng.basis(9, 1, KIND_A, 0, 5, 37)
    monkeypatch.setattr(torch_rng, "_chunk", lambda device: 3)
    assert torch.equal(torch_rng.basis(9, 1, KIND_A, 0, 5, 37), want)


def test_bases_do_not_depend_on_how_many_are_asked_for() -> None:
    whole = basis(3, 2, KIND_A, 0, 9, 50)
    assert np.array_equal(np.concatenate([v for _, v in iter_bases(3, 2, KIND_A, 9, 50, budget=3 * 28 * 50)]), whole)
    assert np.array_equal(basis(3, 2, KIND_A, 4, 6, 50), whole[4:6])
    assert np.array_equal(basis(3, 2, KIND_A, 0, 9, 20), whole[:, :20])  # a smaller matrix is a prefix


def test_kinds_streams_and_seeds_give_different_values() -> None:
    vals = {basis(s, st, kd, 0, 1, 8).tobytes() for s in (0, 1) for st in (0, 1) for kd in (KIND_A, KIND_B, KIND_A0, KIND_B0)}
    assert len(vals) == 16


@pytest.mark.parametrize(
    "args",
    [
        (-1, 0, KIND_A, 0, 1, 4),
        (2**53, 0, KIND_A, 0, 1, 4),
        (0, 2**32, KIND_A, 0, 1, 4),
        (0, 0, 4, 0, 1, 4),
        (0, 0, KIND_A, 2, 1, 4),
        (0, 0, KIND_A, 0, 1, (4 << 32) + 1),
    ],
)
def test_out_of_range_requests_are_refused(args: tuple[int, ...]) -> None:
    with pytest.raises(RecordError):
        basis(*args)
    with pytest.raises(RecordError):
        torch_rng.basis(*args)
