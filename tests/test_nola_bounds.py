"""Hostile nola files get bounded memory and work: many records referencing one compressed coefficient blob
are decoded a batch at a time (numpy and torch), and the generator work of records decoded together is
bounded (``MAX_NOLA_GENERATED_TOTAL``) besides each record's own (``MAX_NOLA_GENERATED``)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterpack
from adapterpack import errors, limits
from adapterpack.adapter import Adapter, Module
from adapterpack.encodings import nola
from adapterpack.torch.decoders import nola as torch_nola
from tests.apack_builders import split
from tests.test_nola import nola_module

REPO = Path(__file__).resolve().parents[1]


def shared_blob_file(path: Path, records: int, k: int, base: tuple[int, int], rank: int = 1) -> Path:
    """``records`` nola records, each its own seed, all referencing one zstd alpha and one zstd beta blob of ``k`` zeros
    (A0 and B0 zero, so every factor decodes to zeros): a file of about a kilobyte whose coefficients decode to
    ``records · 2k`` values."""
    p = {"generator": "philox4x32-10", "generator_version": 1, "seed": 7, "stream": 0, "rank": rank, "k_A": k, "k_B": k}
    p |= {"A0": "zero", "B0": "zero"}
    m = Module("m0", "nola", base, p | {"scale": 1.0}, {"alpha": np.zeros(k, np.float32), "beta": np.zeros(k, np.float32)})
    src = path.with_suffix(".src.apack")
    adapterpack.save(Adapter(modules={m.name: m}), src, codec="zstd")
    parts = split(src.read_bytes())
    record = parts.index["adapters"][0]["modules"][0]
    mods = []
    for i in range(records):
        r = copy.deepcopy(record)
        r["name"], r["params"]["seed"] = f"model.layers.{i}.self_attn.q_proj", 7 + i
        mods.append(r)
    parts.index["adapters"][0]["modules"] = mods
    path.write_bytes(parts.build(minor=parts.minor))
    return path


PEAK = """
import resource, sys
sys.path.insert(0, {repo!r})
import torch
import adapterpack.torch
from adapterpack.torch.rng import verify_device
verify_device(torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = adapterpack.torch.load(sys.argv[1])
assert all(float(f.A.abs().sum()) == 0 and float(f.B.abs().sum()) == 0 for f in out.values())
print(len(out), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_torch_load_of_records_sharing_one_blob_stays_bounded(tmp_path: Path) -> None:
    """32 records referencing one 2^20-coefficient zstd blob (alpha) and another (beta): the torch decoder decoded
    every record's coefficients onto the device before generating anything (64 slots of 4 MiB, each widened to float64
    twice), so its peak grew with the record count; now a batch's coefficients are decoded, used and dropped.
    The bound is the generator's budget twice plus a few copies of one blob, far under the 64 slots."""
    records, k = 32, 1 << 20
    path = shared_blob_file(tmp_path / "shared.apack", records, k, (1, 1))
    assert path.stat().st_size < 4096
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK).format(repo=str(REPO)), str(path)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    count, growth_kib = map(int, res.stdout.split())
    assert count == records
    one_blob = 4 * k
    every_slot = 2 * records * one_blob
    bound = 2 * nola.DEFAULT_BUDGET + 8 * one_blob
    assert bound < every_slot
    assert growth_kib * 1024 < bound, f"peak grew {growth_kib} KiB, over {bound >> 10} KiB"


@pytest.mark.parametrize("budget", [1, 40 * 8, 1 << 20])
def test_batched_decode_agrees_with_decoding_together(budget: int) -> None:
    """Records sharing a basis, split into batches by a small coefficient budget, decode as all together do (numpy and
    torch; up to float32 summation, as a batch sums in float64 when a member's coefficients are float64)."""
    mods = [
        nola_module("a", 6, 10, 2, 5, 7, seed=3),
        nola_module("b", 6, 10, 2, 9, 3, seed=3),
        nola_module("c", 6, 10, 2, 2, 7, seed=3),
        nola_module("d", 6, 10, 2, 9, 7, seed=3, A0="stored"),
    ]
    mods[2] = Module("c", "nola", mods[2].base_shape, mods[2].params,
                     {k: np.asarray(v, np.float64) for k, v in mods[2].tensors.items()})  # fmt: skip
    whole = nola.decode_many(mods)
    parts = nola.decode_many(mods, budget)
    assert len(nola.plan({m.name: nola.nola_shape(m) for m in mods}, budget)) > 2 or budget == 1 << 20
    t_whole = torch_nola.decode_many(mods)
    t_parts = torch_nola.decode_many(mods, budget=budget)
    for name, f in whole.items():
        for got in (parts[name], t_parts[name], t_whole[name]):
            np.testing.assert_allclose(np.asarray(got.A, np.float64), f.A, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(got.B, np.float64), f.B, rtol=1e-5, atol=1e-6)
        assert t_parts[name].A.dtype == t_whole[name].A.dtype == (torch.float64 if name == "c" else torch.float32)


def test_plan_takes_largest_k_first_and_bounds_each_batch() -> None:
    mods = [nola_module(name, 6, 10, 2, k, 4, seed=3) for name, k in (("a", 3), ("b", 9), ("c", 5))]
    shapes = {m.name: nola.nola_shape(m) for m in mods}
    batches = nola.plan(shapes, budget=12 * 9 * 2)
    alpha = [b for b in batches if b.kind == 0]
    assert [[m[0] for m in b.members] for b in alpha] == [["b", "c"], ["a"]]
    assert [b.k for b in alpha] == [9, 3]
    # three beta slots of k = 4 fit one batch: generated once
    assert [len(b.members) for b in batches if b.kind == 1] == [3]
    assert nola.generated_values(shapes, batches) == 9 * 20 + 3 * 20 + 4 * 12 + 3 * 20  # A0 generated by default


def test_total_limit_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding records whose generator work totals the limit works; one value more is refused before any is generated."""
    mods = [nola_module("a", 6, 10, 2, 5, 7, seed=3), nola_module("b", 6, 10, 2, 5, 7, seed=4)]
    shapes = {m.name: nola.nola_shape(m) for m in mods}
    total = nola.generated_values(shapes, nola.plan(shapes))
    assert total == 2 * (5 * 20 + 7 * 12 + 20)
    monkeypatch.setattr(nola, "MAX_NOLA_GENERATED_TOTAL", total)
    nola.decode_many(mods)
    torch_nola.decode_many(mods)
    monkeypatch.setattr(nola, "MAX_NOLA_GENERATED_TOTAL", total - 1)
    words = rf"decoding 2 nola records together would generate {total} random values, over the limit of {total - 1}"
    with pytest.raises(errors.SizeLimitError, match=words + r" \(the most of one record: module 'a', 204\)"):
        nola.decode_many(mods)
    with pytest.raises(errors.SizeLimitError, match=words):
        torch_nola.decode_many(mods)


def test_many_records_at_the_per_record_limit_are_refused_by_load(tmp_path: Path) -> None:
    """257 records, each generating exactly MAX_NOLA_GENERATED values (valid one by one), referencing one pair of
    blobs: loading them all would generate 257 · 2^30 values (hours on a CPU); refused before generating."""
    k, side = 1 << 15, 1 << 14
    assert 2 * k * side == limits.MAX_NOLA_GENERATED
    path = shared_blob_file(tmp_path / "many.apack", 257, k, (side, side))
    with adapterpack.open(path) as ad:  # each record is valid
        assert len(ad.modules) == 257
    total = 257 * limits.MAX_NOLA_GENERATED
    with pytest.raises(errors.SizeLimitError, match=rf"decoding 257 nola records together would generate {total} random"):
        adapterpack.torch.load(path)


def test_per_record_limit_covers_real_nola_sizes() -> None:
    """NOLA's LLaMA-2 70B recipe (rank 16, 512 bases, every linear weight) is within the per-record limit with room to
    spare, and that whole adapter (80 layers, a basis each) is within the total limit."""
    per_layer = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192), (8192, 28672)]
    each = [16 * 512 * (out + inp) for out, inp in per_layer]
    assert max(each) * 3 < limits.MAX_NOLA_GENERATED
    assert 80 * sum(each) * 2 < limits.MAX_NOLA_GENERATED_TOTAL
    nola.nola_shape(nola_module("mlp", 28672, 8192, 16, 512, 512))
