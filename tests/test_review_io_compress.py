"""Hostile and odd budgets and options of ``adapterpack compress`` (review round): adapterpack errors, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.cli import main
from adapterpack.errors import ConversionError
from adapterpack.ops import compress as comp
from adapterpack.ops.budget import apack_file_size
from tests.apack_builders import lora_gguf
from tests.factories import qv_modules


def _adapter(seed: int = 0) -> Adapter:
    rng = np.random.default_rng(seed)
    mods = qv_modules(rng, layers=1, rank=4, in_features=128, q_out=128, v_out=64, b_scale=0.05)
    return Adapter("a", "base/model", "LlamaForCausalLM", mods)


def _float_file(ad: Adapter) -> int:
    """Size of the file with every component kept in float (the most any budget buys)."""
    _out, rep = comp.compress(ad, 10**9)
    return rep.file_bytes


@pytest.mark.parametrize("budget", [10**19, 10**30, 2**64 + 5, 10**400])
def test_a_budget_beyond_int64_buys_the_float_file(budget: int) -> None:
    """A budget no file can reach is as good as the largest file (was OverflowError deep in the knapsack)."""
    ad = _adapter()
    out, rep = comp.compress(ad, budget)
    assert rep.file_bytes == _float_file(ad) == apack_file_size([out], "raw")
    assert rep.budget == budget and all(b == 16 for m in rep.modules for b in m.bits)


def test_cli_budget_1e30_is_not_a_traceback(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.apack", tmp_path / "out.apack"
    adapterpack.save(_adapter(), src)
    r = CliRunner().invoke(main, ["compress", str(src), str(dst), "--budget", "1e30", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["dst_bytes"] == dst.stat().st_size


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), float("-inf"), "5000", None.__class__, [5000]])
def test_library_budget_that_is_not_a_number_of_bytes(budget: object) -> None:
    with pytest.raises(ConversionError, match="budget"):
        comp.compress(_adapter(), budget)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [5000.7, np.float32(5000), np.int64(5000), 5000])
def test_library_budget_as_a_finite_float_or_numpy_number(budget: object) -> None:
    """Whole bytes: a float is floored (was a numpy TypeError from the knapsack)."""
    ad = _adapter()
    out, rep = comp.compress(ad, budget)  # type: ignore[arg-type]
    assert rep.budget == 5000 and rep.file_bytes == apack_file_size([out], "raw") <= 5000


@pytest.mark.parametrize("ratio", ["0.1", float("inf")])
def test_library_budget_ratio_not_a_fraction(ratio: object) -> None:
    with pytest.raises(ConversionError, match="budget_ratio"):
        comp.compress(_adapter(), budget_ratio=ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [[2.5], ["x"], [True, 4]])
def test_library_bits_must_be_integers(bits: list[object]) -> None:
    """2.5 was truncated to 2 silently, 'x' a ValueError."""
    with pytest.raises(ConversionError, match="bits"):
        comp.compress(_adapter(), budget_ratio=0.25, bits=bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"group_size": 2.5}, {"min_rank": 1.5}, {"max_rank": "3"}])
def test_library_integer_options_must_be_integers(kw: dict[str, object]) -> None:
    with pytest.raises(ConversionError):
        comp.compress(_adapter(), budget_ratio=0.25, **kw)  # type: ignore[arg-type]


def test_cli_failures_leave_dst_and_folder_untouched(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.apack", tmp_path / "out.apack"
    adapterpack.save(_adapter(), src)
    dst.write_bytes(b"the user's file")
    cases = [
        ["--budget", "300", "--force"],  # below the smallest file
        ["--budget", "5KB"],  # exists, no --force
        ["--budget", "5KB", "--force", "--modules", "("],  # bad regex
        ["--budget", "5KB", "--force", "--min-rank", "3", "--max-rank", "1"],
        ["--budget", "5KB", "--force", "--bits", "9"],
        ["--budget", "5KB", "--force", "--adapter", "nope"],
    ]
    for extra in cases:
        r = CliRunner().invoke(main, ["compress", str(src), str(dst), *extra])
        assert r.exit_code == 1, (extra, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (extra, r.exception)
        assert "Traceback" not in r.output and r.output.startswith("adapterpack: "), (extra, r.output)
        assert dst.read_bytes() == b"the user's file"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.apack", "src.apack"], extra


def test_an_all_dora_adapter_says_why_nothing_is_compressed() -> None:
    ad = _adapter()
    mods = {}
    for n, m in ad.modules.items():
        f = m.factors()
        out = int(np.asarray(f.B).shape[0])
        params = {**m.params, "dora": True}
        mods[n] = type(m)(n, "lora", m.base_shape, params, {"A": f.A, "B": f.B, "magnitude": np.ones(out, np.float32)})
    with pytest.raises(ConversionError, match=r"no module to compress: 2 DoRA module"):
        comp.compress(ad.derived(mods), budget_ratio=0.5)




@pytest.mark.parametrize("kw", [{"min_rank": 4}, {"min_rank": 3, "max_rank": 3}])
def test_min_rank_does_not_pin_the_leading_components_to_their_cheapest_width(kw: dict[str, int]) -> None:
    """A budget far above the all-float file: every kept component in float, whatever the rank bounds
    (found: --min-rank 4 on rank-4 modules wrote 1-4 bit components and 50x the error, a quarter of the budget used)."""
    ad = _adapter()
    _out, free = comp.compress(ad, 10**6, max_rank=kw.get("max_rank"))
    _out, bound = comp.compress(ad, 10**6, **kw)
    assert all(b == 16 for m in bound.modules for b in m.bits)
    assert bound.total["rel_error"] == pytest.approx(free.total["rel_error"], rel=1e-9)


@pytest.mark.parametrize("lo", [2, 3])
def test_module_choices_with_min_rank_is_the_hull_of_its_configurations(lo: int) -> None:
    """module_choices(min_rank=lo) against brute force over every configuration of rank >= lo."""
    import itertools

    from adapterpack.linalg.bitalloc import configuration_cost, lower_hull, module_choices

    rng = np.random.default_rng(lo)
    k, c = 4, 3
    nb = np.sort(rng.integers(1, 40, size=(k, c)), axis=1)
    err = np.sort(rng.random((k, c)), axis=1)[:, ::-1] * np.linspace(3, 1, k)[:, None]
    cut = np.append(np.cumsum((err[:, 0] * 2)[::-1])[::-1], 0.0)
    pts = [configuration_cost(nb, err, cut, cols) for j in range(lo, k + 1) for cols in itertools.product(range(c), repeat=j)]
    x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts])
    ref = lower_hull(x, y)
    ch = module_choices(nb, err, cut, min_rank=lo)
    assert sorted(zip(ch.nbytes.tolist(), np.round(ch.dist, 12).tolist())) == sorted(
        zip(x[ref].astype(int).tolist(), np.round(y[ref], 12).tolist())
    )


def test_cli_compress_reads_a_llamacpp_gguf_given_its_base(tmp_path: Path) -> None:
    """A llama.cpp LoRA GGUF holds q/k rows in rotary order and no head counts: the error says to give --base,
    which compress did not accept ('No such option'). With it the file compresses, ΔW within the reported error."""

    from adapterpack.formats.gguf import permute_rows

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), (rng.standard_normal((64, 4)) * 0.1).astype(np.float32)
    lora_gguf(tmp_path / "l.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": permute_rows(b, 4)})
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 4}))
    dst = tmp_path / "c.apack"
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "l.gguf"), str(dst), "--budget", "1MB", "--json"])
    assert r.exit_code == 1 and "--base" in r.output and not dst.exists()
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "l.gguf"), str(dst), "--budget", "1MB", "--base", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    rel = json.loads(r.output)["modules"][0]["rel_error"]
    got = adapterpack.open(dst).module("model.layers.0.self_attn.q_proj").delta().astype(np.float64)
    ref = b.astype(np.float64) @ a.astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) == pytest.approx(rel, rel=1e-3, abs=1e-6) and rel < 1e-3


def test_a_budget_below_the_kept_tensors_says_so() -> None:
    """modules_to_save / saved embeddings ride along uncompressed: a budget_ratio of the factors alone cannot hold
    them, and the refusal says how many bytes are kept as they are (was only 'budget X B is below Y B')."""
    ad = _adapter()
    big = ad.derived(dict(ad.modules), {"base_model.model.lm_head.weight": np.zeros((256, 128), np.float32)})
    with pytest.raises(ConversionError, match=r"below .*; 131,072 B of tensors \(decoded, before the codec\) are kept as they are"):
        comp.compress(big, budget_ratio=0.25)
    with pytest.raises(ConversionError, match=r"below [0-9,]+ B, the whole file[^;]*$"):
        comp.compress(ad, 300)
