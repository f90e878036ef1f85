"""Non-finite factors and overflowing products are refused wherever they enter a fit, naming adapter and module.

Fits (bank build / add / refit, rerank by every rule, nola, audit, importance) refuse a NaN or infinity in a
factor, a non-finite scale, and ΔW = s·B·A too large for binary64 (or for the dtype a bank stores Σᵢ in),
before any output is written and without a numpy warning; bit-exact storage and conversion keep such
values as they are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import load_file, save_file

import adapterpack
from adapterpack import Adapter
from adapterpack.bank import add_to_bank, build_bank, extract_member, read_bank, refit_bank
from adapterpack.bank.store import write_bank
from adapterpack.cli import main
from adapterpack.encodings.nola_fit import fit_adapter
from adapterpack.errors import ConversionError
from adapterpack.examples import example_path
from adapterpack.linalg.finite import MAX_NORM, check_product
from adapterpack.ops.audit import audit_input
from adapterpack.ops.convert import adapter_differences, cast_adapter, convert, safetensors_differences
from adapterpack.ops.rerank import RerankPolicy, rerank
from tests.factories import example_with_alpha, qv_adapter

pytestmark = pytest.mark.filterwarnings("error")  # a numpy RuntimeWarning escaping is a failure

REPO = Path(__file__).resolve().parent.parent
BAD_MODULE = "model.layers.1.self_attn.q_proj"
#: ``lora_alpha`` of the issue: finite in JSON and binary64, but scale·B·A overflows it.
HUGE_ALPHA = 1e308


def toy(seed: int) -> Adapter:
    return qv_adapter(seed, layers=2, rank=4, in_features=24, q_out=32, v_out=16, b_scale=0.05)


def poisoned(seed: int = 9, value: float = np.nan) -> Adapter:
    """A toy adapter whose ``BAD_MODULE`` holds one ``value`` in B."""
    a = toy(seed)
    a.modules[BAD_MODULE].tensors["B"][3, 1] = value
    return a


def huge(seed: int = 9, alpha: float = HUGE_ALPHA) -> Adapter:
    """A toy adapter whose ``BAD_MODULE`` has a finite alpha that makes ΔW overflow."""
    a = toy(seed)
    a.modules[BAD_MODULE].params["alpha"] = alpha
    return a


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(r: Result, *needles: str) -> None:
    """Exit 1, nothing on stdout, one ``adapterpack:`` line on stderr naming every needle."""
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapterpack: "), r.stderr
    for n in needles:
        assert n in lines[0], r.stderr


def names(adapter: str, module: str = BAD_MODULE) -> tuple[str, str]:
    return f"adapter {adapter!r}", f"module {module!r}"


def saved(tmp: Path, adapter: Adapter, name: str) -> Path:
    path = tmp / f"{name}.apack"
    adapterpack.save(adapter, path)
    return path


#: (how to make the bad adapter, what its refusal says), by kind of defect.
BAD = [
    pytest.param(poisoned, "B holds non-finite values", id="nan"),
    pytest.param(lambda: poisoned(value=np.inf), "B holds non-finite values", id="inf"),
    pytest.param(huge, "too large", id="alpha-1e308"),
]


# --- the one check ---------------------------------------------------------------------------------


def test_check_product_refuses_what_a_fit_cannot_use_and_accepts_the_rest() -> None:
    a, b = np.ones((2, 5), np.float32), np.ones((3, 2), np.float32)
    check_product(a, b, 2.0, where="w")
    check_product(np.zeros((0, 5)), np.zeros((3, 0)), 1.0, where="w")  # rank 0
    check_product(np.full((2, 5), 1e300), np.zeros((3, 2)), 1.0, where="w")  # a zero factor: ΔW is 0
    for scale in (np.nan, np.inf, -np.inf):
        with pytest.raises(ConversionError, match=r"^w: scale .* is not finite$"):
            check_product(a, b, scale, where="w")
    for bad in (np.nan, np.inf):
        x = a.copy()
        x[1, 4] = bad
        with pytest.raises(ConversionError, match=r"^w: A holds non-finite values"):
            check_product(x, b, 1.0, where="w")
    # finite factors whose squares overflow binary64 are too large, not non-finite
    with pytest.raises(ConversionError, match="too large"):
        check_product(np.full((2, 5), 1e200), b, 1.0, where="w")
    # the bound |s|·‖B‖_F·‖A‖_F against the limit: ‖A‖_F = √10, ‖B‖_F = √6 here
    edge = MAX_NORM / np.sqrt(60.0)
    check_product(a.astype(np.float64), b.astype(np.float64), edge * (1 - 1e-12), where="w")
    with pytest.raises(ConversionError, match="too large"):
        check_product(a.astype(np.float64), b.astype(np.float64), edge * (1 + 1e-12), where="w")
    # a dtype the fit stores ΔW-sized values in lowers the limit to its range
    with pytest.raises(ConversionError, match="the limit for float32"):
        check_product(a, b, 1e38, where="w", dtype="float32")
    check_product(a, b, 1e38, where="w", dtype="float64")


# --- banks: one bad member must not poison the others ------------------------------------------------


@pytest.mark.parametrize(("make", "why"), BAD)
def test_bank_build_refuses_a_bad_member_before_writing_anything(tmp_path: Path, make, why: str) -> None:
    good = [saved(tmp_path, toy(s), f"good{s}") for s in (1, 2)]
    bad = saved(tmp_path, make(), "bad")
    out = tmp_path / "bank.apack"
    r = run("bank", "build", out, good[0], bad, good[1], "--rank", "4")
    assert_refused(r, *names("bad"), why)
    assert not out.exists()
    with pytest.raises(ConversionError) as e:
        build_bank(out, [good[0], bad, good[1]], rank=4)
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("bad"))
    assert not out.exists()
    # without the bad member every member's ΔW is finite (the poisoning needed the bad member in the fit)
    build_bank(out, good, rank=4)
    for s in (1, 2):
        with adapterpack.open(out, adapter=f"good{s}") as a:
            assert all(np.isfinite(m.delta()).all() for m in a)


def test_bank_build_refuses_a_sigma_that_would_overflow_the_bank_dtype(tmp_path: Path) -> None:
    """alpha 1e40 is fine for binary64 but Σᵢ (of ΔW's size) cannot be stored in float32."""
    good = saved(tmp_path, toy(1), "good1")
    bad = saved(tmp_path, huge(alpha=1e40), "bad")
    out = tmp_path / "bank.apack"
    with pytest.raises(ConversionError, match="the limit for float32") as e:
        build_bank(out, [good, bad], rank=4)
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("bad"))
    assert not out.exists()


@pytest.mark.parametrize(("make", "why"), BAD)
def test_bank_add_refuses_a_bad_adapter_and_leaves_the_bank_as_it_was(tmp_path: Path, make, why: str) -> None:
    out = tmp_path / "bank.apack"
    build_bank(out, [saved(tmp_path, toy(s), f"good{s}") for s in (1, 2)], rank=4)
    before = out.read_bytes()
    bad = saved(tmp_path, make(), "bad")
    assert_refused(run("bank", "add", out, bad), *names("bad"), why)
    with pytest.raises(ConversionError) as e:
        add_to_bank(out, [bad])
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("bad"))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.apack", "bank.apack", "good1.apack", "good2.apack"]


def damaged_bank(tmp: Path) -> Path:
    """A bank whose member ``good2`` holds a NaN in one S (written before this check, or by another tool)."""
    good = tmp / "bank.apack"
    build_bank(good, [saved(tmp, toy(s), f"good{s}") for s in (1, 2, 3)], rank=4)
    bank = read_bank(good)
    bank.members[1].S[BAD_MODULE][0, 0] = np.nan
    damaged = tmp / "damaged.apack"
    write_bank(damaged, bank)
    return damaged


def test_bank_refit_refuses_a_member_holding_nan(tmp_path: Path) -> None:
    damaged, out = damaged_bank(tmp_path), tmp_path / "refit.apack"
    r = run("bank", "refit", damaged, "--out", out)
    assert_refused(r, *names("good2"), "non-finite")
    with pytest.raises(ConversionError) as e:
        refit_bank(damaged, out=out)
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("good2"))
    assert not out.exists()


@pytest.mark.parametrize("to", ["apack", "svd", "peft"])
def test_bank_extract_refuses_a_member_holding_nan(tmp_path: Path, to: str) -> None:
    """Extracting re-factors S by an SVD: a NaN is refused (not LinAlgError), the other members extract."""
    damaged, out = damaged_bank(tmp_path), tmp_path / "member"
    assert_refused(run("bank", "extract", damaged, "good2", out, "--to", to), *names("good2"), "non-finite")
    assert not out.exists()
    with pytest.raises(ConversionError) as e:
        extract_member(damaged, "good2")
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("good2"))
    member, _ = extract_member(damaged, "good1")
    assert all(np.isfinite(m.delta()).all() for m in member)


# --- rerank, every rule ------------------------------------------------------------------------------

RULES = [["--rank", "2"], ["--energy", "0.9"], ["--sv-ratio", "4"], ["--budget", "4KB"], ["--budget-ratio", "0.5"]]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r[0])
@pytest.mark.parametrize(("make", "why"), BAD)
def test_rerank_refuses_by_every_rule(tmp_path: Path, rule: list[str], make, why: str) -> None:
    src = saved(tmp_path, make(), "bad")
    dst = tmp_path / "out.apack"
    assert_refused(run("rerank", src, dst, *rule), *names("default"), why)
    assert not dst.exists()
    policy = {"--rank": RerankPolicy(rank=2), "--energy": RerankPolicy(energy=0.9), "--sv-ratio": RerankPolicy(sv_ratio=4.0),
              "--budget": RerankPolicy(budget=4000), "--budget-ratio": RerankPolicy(budget_ratio=0.5)}[rule[0]]  # fmt: skip
    with pytest.raises(ConversionError) as e:
        rerank(make(), policy)
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("default"))


def test_rerank_refuses_singular_values_that_overflow_the_output_dtype() -> None:
    """alpha 1e40: binary64 holds the spectrum, float32 (the S of the written svd records) does not."""
    with pytest.raises(ConversionError, match="the limit for float32") as e:
        rerank(huge(alpha=1e40), RerankPolicy(rank=2))
    assert all(n in str(e.value) for n in names("default"))
    out, _ = rerank(huge(alpha=1e40), RerankPolicy(rank=2, dtype="float64"))
    assert np.isfinite(out.module(BAD_MODULE).delta()).all()


def test_rerank_refuses_a_non_finite_svd_record() -> None:
    from adapterpack.encodings.lower import as_svd

    a = toy(1)
    a.modules[BAD_MODULE] = as_svd(a.modules[BAD_MODULE])
    a.modules[BAD_MODULE].tensors["Vt"][0, 2] = np.nan
    with pytest.raises(ConversionError, match="non-finite") as e:
        rerank(a, RerankPolicy(energy=0.9))
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("default"))


def test_convert_rank_refuses(tmp_path: Path) -> None:
    """``convert --rank`` cuts by an SVD of the factors: refused like every fit (naming the module)."""
    for make, why in ((poisoned, "non-finite"), (huge, "too large")):
        src, dst = saved(tmp_path, make(), "bad"), tmp_path / "out.apack"
        with pytest.raises(ConversionError, match=f"module '{BAD_MODULE}'.*{why}") as e:
            convert(src, dst, rank=2)
        assert type(e.value) is ConversionError and not dst.exists()


@pytest.mark.parametrize(("make", "why"), BAD)
def test_convert_dtype_refuses_what_its_error_report_cannot_measure(tmp_path: Path, make, why: str) -> None:
    """A cast is not bit-exact and reports the ΔW error it costs: no "nan" error, no overflow warning."""
    src, dst = saved(tmp_path, make(), "bad"), tmp_path / "out.apack"
    assert_refused(run("convert", src, dst, "--dtype", "bf16"), *names("default"), why)
    assert not dst.exists()
    with pytest.raises(ConversionError) as e:
        cast_adapter(make(), "bf16")
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("default"))


# --- nola -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", [["--k", "4"], ["--target-error", "0.5"]], ids=lambda h: h[0])
@pytest.mark.parametrize(("make", "why"), BAD)
def test_convert_to_nola_refuses(tmp_path: Path, how: list[str], make, why: str) -> None:
    src, dst = saved(tmp_path, make(), "bad"), tmp_path / "out.apack"
    assert_refused(run("convert", src, dst, "--to", "nola", *how), *names("default"), why)
    assert not dst.exists()
    kw = {"k": 4} if how[0] == "--k" else {"target_error": 0.5}
    with pytest.raises(ConversionError) as e:
        fit_adapter(make(), **kw)
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("default"))


# --- audit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", [("zstd",), ("energy99", "energy95")], ids=["sizes-only", "energies"])
@pytest.mark.parametrize(("make", "why"), BAD)
def test_audit_reports_the_input_as_failed(tmp_path: Path, measure: tuple[str, ...], make, why: str) -> None:
    """The audit of many inputs goes on; the bad one is a failed row naming adapter and module (exit 1)."""
    bad, good = saved(tmp_path, make(), "bad"), saved(tmp_path, toy(1), "good")
    res = audit_input(bad, measure=measure)
    assert not res.ok and all(n in res.error for n in names("default")) and why in res.error
    assert not res.sizes  # nothing measured from it
    assert audit_input(good, measure=measure).ok
    r = run("audit", bad, good, "--json")
    assert r.exit_code == 1, r.output
    rows = {Path(row["path"]).name: row for row in json.loads(r.stdout)["inputs"]}
    assert rows["good.apack"]["ok"] and not rows["bad.apack"]["ok"]
    assert names("default")[1] in rows["bad.apack"]["error"]["message"]


# --- importance -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_importance_refuses_before_measuring(tmp_path: Path, value: float) -> None:
    pytest.importorskip("torch")
    from adapterpack.torch.fit.fisher import causal_lm_importance, component_fisher
    from tests.test_importance import Tiny, batches, logits, tiny_adapter

    ad = tiny_adapter()
    ad.modules["head"].tensors["A"][1, 1] = value
    with pytest.raises(ConversionError) as e:
        component_fisher(Tiny(), ad, batches(), labels="data", logits=logits)
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("default", "head"))
    # refused before the model is even looked for
    with pytest.raises(ConversionError) as e:
        causal_lm_importance(ad, tmp_path / "no-model", "text")
    assert type(e.value) is ConversionError and all(n in str(e.value) for n in names("default", "head"))
    src, model = saved(tmp_path, ad, "bad"), tmp_path / "no-model"
    model.mkdir()  # a folder without config.json: the adapter is refused before that is noticed
    (tmp_path / "text.txt").write_text("some text")
    out = tmp_path / "imp.safetensors"
    assert_refused(run("importance", src, model, out, "--text", tmp_path / "text.txt"), *names("default", "head"))
    assert not out.exists()


# --- the issue's commands on the real adapter, with -W error ---------------------------------------------




ISSUE_COMMANDS = [
    ["convert", "{src}", "{dst}", "--to", "nola", "--k", "64"],
    ["rerank", "{src}", "{dst}", "--energy", "0.9"],
    ["audit", "{src}"],
]


@pytest.mark.parametrize("cmd", ISSUE_COMMANDS, ids=lambda c: c[0])
def test_real_adapter_with_alpha_1e308_is_refused_without_warnings(tmp_path: Path, cmd: list[str]) -> None:
    src, dst = example_with_alpha(tmp_path, HUGE_ALPHA), tmp_path / "out.apack"
    args = [a.format(src=src, dst=dst) for a in cmd]
    p = subprocess.run([sys.executable, "-W", "error", "-m", "adapterpack", *args], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    mod = "module 'model.layers.0.self_attn.k_proj'"
    if cmd[0] == "audit":  # a failed row, not a refusal of the whole run
        assert p.stderr == "" and mod in p.stdout and "too large" in p.stdout and "nan" not in p.stdout
    else:
        assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("adapterpack: adapter 'default' " + mod) and "too large" in p.stderr
    assert not dst.exists()


# --- bit-exact storage keeps NaN payloads -----------------------------------------------------------------


def test_bit_exact_conversions_keep_nan_payloads(tmp_path: Path) -> None:
    """Storing is not fitting: PEFT → apack (raw and compressed) → PEFT carries a NaN payload bit for bit."""
    peft = tmp_path / "nan"
    shutil.copytree(example_path(), peft)
    weights = peft / "adapter_model.safetensors"
    t = load_file(weights)
    key = sorted(t)[5]
    x = t[key].copy()
    x.view(np.uint32).flat[7] = 0x7FC0_1234  # a quiet NaN with a payload
    x.view(np.uint32).flat[8] = 0xFF80_0000  # -inf
    t[key] = x
    save_file(t, weights)
    for codec in ("raw", "zstd", "byteplanes"):
        packed = tmp_path / f"nan-{codec}.apack"
        back = tmp_path / f"back-{codec}"
        assert run("convert", peft, packed, "--codec", codec).exit_code == 0
        assert run("convert", packed, back).exit_code == 0
        assert run("verify", packed).exit_code == 0
        assert safetensors_differences(weights, back / "adapter_model.safetensors") == []
        relay = tmp_path / f"relay-{codec}.apack"
        assert run("convert", packed, relay, "--codec", "raw").exit_code == 0  # lora → lora
        with adapterpack.open(packed) as a, adapterpack.open(relay) as b:
            assert adapter_differences(a, b) == []
        assert load_file(back / "adapter_model.safetensors")[key].view(np.uint32).flat[7] == 0x7FC0_1234
