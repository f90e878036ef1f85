"""Review of banks at their edges: rank-0 members, bases grown past the module's dimensions, members lacking a
module (legal, spec/shared.md §2), non-finite banks, outputs that already exist.

Real LoRAs (``tests/data/bank_loras.apack``, as in test_bank.py) where the spectra matter; small random
modules only where the question is one of dimensions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.bank import add_to_bank, build_bank, extract_member, read_bank, refit_bank, write_bank
from adapterpack.cli import main
from adapterpack.errors import BankError, ConversionError
from tests.test_bank import _split

DATA = Path(__file__).resolve().parent / "data" / "bank_loras.apack"
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"




def _dense_rel(reference: np.ndarray, got: np.ndarray) -> float:
    d = reference.astype(np.float64)
    return float(np.sum((d - got.astype(np.float64)) ** 2) / np.sum(d * d))


def _rank0(tmp: Path) -> Path:
    """The fixture's lora02 as rank-0 svd records (what ``rerank --rank 0`` writes, or any zero adapter re-ranked)."""
    with adapterpack.open(DATA, adapter="lora02") as a:
        mods = {}
        for m in a:
            out, inp = m.base_shape
            empty = {"S": np.zeros(0, np.float32), "Ut": np.zeros((0, out), np.float32), "Vt": np.zeros((0, inp), np.float32)}
            mods[m.name] = Module(m.name, "svd", (out, inp), {"rank": 0}, empty)
        adapterpack.save(Adapter(name="default", base_model=a.base_model, modules=mods), tmp / "zero.apack")
    return tmp / "zero.apack"


def test_rank0_members_bank_as_zero(tmp_path: Path) -> None:
    """A rank-0 module (a zero ΔW re-ranked) is an adapter like any other: build and add take it (was a numpy
    reshape ValueError), its reconstruction is exactly zero and the others' are unaffected."""
    paths = _split(tmp_path, ["lora00", "lora01"])
    zero = _rank0(tmp_path)
    bank = tmp_path / "bank.apack"
    rep = build_bank(bank, [*paths, zero], rank=4)
    assert rep.adapters == 3
    with adapterpack.open(bank, adapter="zero") as z:
        assert all(not np.any(z.delta(n)) for n in (Q, V))
    only = tmp_path / "only.apack"
    build_bank(only, paths, rank=4)
    rep = add_to_bank(only, [zero])
    assert rep.added[0]["name"] == "zero" and rep.added[0]["rel_error_max"] == 0.0 and rep.added[0]["grown"] == {}
    ad, errs = extract_member(only, "zero")
    assert errs == {Q: 0.0, V: 0.0} and not np.any(ad.delta(Q))


def _square(tmp: Path, name: str, seed: int, n: int = 5, r: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    m = Module("m", "lora", (n, n), {"rank": r, "alpha": float(r)},
               {"A": rng.standard_normal((r, n)).astype(np.float32), "B": rng.standard_normal((n, r)).astype(np.float32)})
    p = tmp / f"{name}.apack"
    adapterpack.save(Adapter(name=name, base_model="toy", modules={"m": m}), p)
    return p


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_growth_stops_at_the_modules_dimensions(tmp_path: Path, form: str) -> None:
    """Full form: adding adapters with ``threshold=0`` grew U and V past min(out, in) columns (rank 13 on a 5×5
    module): the extra columns were not orthonormal, the projection double-counted and members were stored with
    relative squared errors of 236%–4107%. Rank min(out, in) already holds any ΔW, so growth stops there and every
    added member is exact. Diagonal form (held up): rank-1 terms need up to out·in columns, and stay exact."""
    bank = tmp_path / "bank.apack"
    srcs = [_square(tmp_path, f"g{i}", 100 + i) for i in range(7)]
    build_bank(bank, srcs[:1], rank=1, form=form)
    for p in srcs[1:]:
        add_to_bank(bank, [p], threshold=0.0)
    b = read_bank(bank)
    assert b.modules["m"].rank <= (5 if form == "full" else 25)
    for i, p in enumerate(srcs[1:], 1):  # g0 was built at rank 1
        with adapterpack.open(p) as src, adapterpack.open(bank, adapter=f"g{i}") as got:
            assert _dense_rel(src.delta("m"), got.delta("m")) < 1e-10, i
            assert json.loads(got.metadata["bank.rel_error"])["max"] < 1e-10


def test_refit_keeps_a_member_that_lacks_a_module(tmp_path: Path) -> None:
    """spec/shared.md §2: "An adapter MAY lack a module other adapters of the bank have". Refit of such a bank raised
    KeyError; it now fits each module on the members that have it, and the member still lacks it."""
    bank = tmp_path / "bank.apack"
    build_bank(bank, _split(tmp_path, ["lora00", "lora01", "lora02"]), rank=8)
    b = read_bank(bank)
    del b.member("lora01").S[Q]
    write_bank(bank, b)
    before = {n: {k: adapterpack.open(bank, adapter=n).delta(k) for k in b.member(n).S} for n in ("lora00", "lora01")}
    rep = refit_bank(bank, rank=8)
    after = read_bank(bank)
    assert sorted(after.member("lora01").S) == [V] and sorted(after.member("lora00").S) == [Q, V]
    assert rep.fit["rel_error"]["max"] < 1e-6  # rank 8 holds every member's rank-8 reconstruction
    for n, mods in before.items():
        with adapterpack.open(bank, adapter=n) as a:
            for k, d in mods.items():
                assert _dense_rel(d, a.delta(k)) < 1e-6


@pytest.mark.parametrize("where", ["U", "S"])
def test_add_refuses_a_bank_holding_non_finite_values(tmp_path: Path, where: str) -> None:
    """A bank whose U (or a member's S) holds NaN/inf: add raised numpy's LinAlgError (U) or wrote the inf into the
    new file (S), which spec/shared.md §2 forbids. Refused with ConversionError naming the module; the file is kept."""
    paths = _split(tmp_path, ["lora00", "lora01", "lora02"])
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:2], rank=4)
    b = read_bank(bank)
    if where == "U":
        b.modules[Q].U[0, 0] = np.nan
    else:
        b.member("lora00").S[Q][0, 0] = np.inf
    write_bank(bank, b)
    before = bank.read_bytes()
    with pytest.raises(ConversionError, match="q_proj"):
        add_to_bank(bank, [paths[2]], threshold=0.0)
    assert bank.read_bytes() == before


def test_cli_bank_outputs_are_not_replaced_without_force(tmp_path: Path) -> None:
    """``bank build`` over an existing file replaced it silently (a bank of many adapters lost to a typo), ``bank extract
    --to svd`` too, and ``bank refit --out`` the same; the README promises replacement only with ``--force``."""
    paths = [str(p) for p in _split(tmp_path, ["lora00", "lora01"])]
    run = CliRunner().invoke
    bank = tmp_path / "bank.apack"
    assert run(main, ["bank", "build", str(bank), *paths, "--rank", "2"]).exit_code == 0
    before = bank.read_bytes()
    r = run(main, ["bank", "build", str(bank), paths[0], "--rank", "1", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["error"]["type"] == "OutputExistsError"
    assert bank.read_bytes() == before
    other = tmp_path / "other.apack"
    other.write_bytes(b"keep")
    extract = ["bank", "extract", str(bank), "lora00", str(other), "--to", "svd"]
    for args in (extract, ["bank", "refit", str(bank), "--out", str(other)]):
        r = run(main, [*args, "--json"])
        assert r.exit_code == 1 and json.loads(r.stdout)["error"]["type"] == "OutputExistsError", args
        assert other.read_bytes() == b"keep" and bank.read_bytes() == before
    assert run(main, ["bank", "extract", str(bank), "lora00", str(other), "--to", "svd", "--force"]).exit_code == 0
    with adapterpack.open(other) as x:
        assert {m.encoding for m in x} == {"svd"}
    assert run(main, ["bank", "refit", str(bank), "--out", str(other), "--force"]).exit_code == 0
    assert run(main, ["bank", "build", str(bank), paths[0], "--rank", "1", "--force"]).exit_code == 0
    assert len(read_bank(bank).members) == 1


def test_records_of_one_module_must_agree_on_layout(tmp_path: Path) -> None:
    """spec/shared.md §2: all records of one module agree on rank, form, layout, fan_in_fan_out and base_shape. A bank
    whose second member reads its square q_proj record as an embedding (ΔW transposed: legal for the record alone) was
    opened as if every record had the first one's layout, and an add rewrote that member with ΔW transposed, silently.
    Now such a bank is refused (BankError) and the file stays as it was."""
    from apack_builders import split, write

    paths = _split(tmp_path, ["lora00", "lora01", "lora02"])
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:2], rank=4, codec="raw")
    parts = split(bank.read_bytes())
    rec = next(m for m in parts.index["adapters"][1]["modules"] if m["name"] == Q)
    rec["params"]["layout"] = "embedding"
    write(bank, parts.build())
    with adapterpack.open(bank, adapter="lora01") as a:
        assert a.module(Q).params["layout"] == "embedding"  # a legal record on its own
    before = bank.read_bytes()
    with pytest.raises(BankError, match="q_proj"):
        add_to_bank(bank, [paths[2]])
    assert bank.read_bytes() == before


@pytest.mark.parametrize("op", ["add", "refit", "list"])
def test_a_missing_bank_is_an_input_error(tmp_path: Path, op: str) -> None:
    """The Python API raised FileNotFoundError / IsADirectoryError for a bank path that is not a file; every other
    reader raises UnrecognizedInputError there."""
    from adapterpack.bank import bank_listing
    from adapterpack.errors import UnrecognizedInputError

    run = {"add": lambda p: add_to_bank(p, [str(_split(tmp_path, ["lora00"])[0])]), "refit": refit_bank, "list": bank_listing}[op]
    for p in (tmp_path / "missing.apack", tmp_path):
        with pytest.raises(UnrecognizedInputError):
            run(p)


def test_diagonal_bank_members_lower_to_lora_to_float_rounding(tmp_path: Path) -> None:
    """A diagonal-form bank's U and V are not orthogonal (condition numbers up to 1e8 when a target error picks a high
    rank): ``bank extract`` split U·diag(σ)·Vᵀ through S's SVD alone, and every exporter (``as_lora``: PEFT, kohya,
    gguf) cast B = U·diag(σ), A = Vᵀ as they were, so the float32 records missed the bank's ΔW by up to 4e-4 (extract)
    and 3e-5 (export) while extract reported ~1e-7 (its error before the cast). Both now go through ΔW's exact SVD
    (balanced, orthonormal factors: float32 rounding only, plus extract's documented cut of singular values below
    R·eps·σ₁), and extract reports the error of what it writes."""
    from adapterpack.encodings.lower import as_lora

    bank = tmp_path / "bank.apack"
    build_bank(bank, _split(tmp_path, ["lora00", "lora01", "lora02", "lora03"]), form="diagonal", rank=64, target_error=1e-6,
               max_iter=10)
    ad, errs = extract_member(bank, "lora01")

    def dense64(m: Module) -> np.ndarray:
        f = m.factors()
        return f.scale * (np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64))

    with adapterpack.open(bank, adapter="lora01") as b:
        assert max(b.module(k).params["rank"] for k in (Q, V)) > 8
        for k in (Q, V):
            d = dense64(b.module(k))
            got = _dense_rel(d, dense64(ad.module(k)))
            assert got < 1e-9, (k, got)  # relative squared; extract drops singular values below R·eps32·σ₁
            assert errs[k] == pytest.approx(got, rel=1e-3, abs=1e-20)
            low = as_lora(b.module(k))
            assert low.tensors["A"].dtype == np.float32 and _dense_rel(d, dense64(low)) < 1e-12


def _add_one(bank: str, path: str, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    add_to_bank(bank, [path], threshold=0.01)


def test_concurrent_adds_and_a_killed_holder_of_the_lock(tmp_path: Path) -> None:
    """Held up: two processes adding at once both land (the lock serialises them); a process killed while holding the
    lock leaves no stale lock (flock dies with it) and no temp file, and the next add goes through."""
    import multiprocessing
    import os
    import signal

    from adapterpack.bank.lock import locked

    paths = _split(tmp_path, ["lora00", "lora01", "lora02", "lora03", "example"])
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:2], rank=4)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_add_one, args=(str(bank), str(p), barrier)) for p in paths[2:4]]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(m.name for m in read_bank(bank).members) == ["lora00", "lora01", "lora02", "lora03"]

    ready = ctx.Event()

    def hold() -> None:
        with locked(bank):
            ready.set()
            os.kill(os.getpid(), signal.SIGKILL)

    holder = ctx.Process(target=hold)
    holder.start()
    assert ready.wait(60)
    holder.join(60)
    assert holder.exitcode == -signal.SIGKILL
    add_to_bank(bank, [paths[4]])
    assert [m.name for m in read_bank(bank).members][-1] == "example"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bank_list_says_when_a_members_error_predates_a_cast(tmp_path: Path) -> None:
    """The error metadata records the dtype of the bank it was measured on: after ``convert --dtype bf16`` the listed
    error is the float32 fit's, and ``bank list`` says so (it showed it as current before); a member added to the cast
    bank is measured on the cast bank, so its error carries no such note."""
    from adapterpack.bank import bank_listing

    paths = _split(tmp_path, ["lora00", "lora01", "lora02"])
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:2], rank=4)
    assert {m["error_reference"] for m in bank_listing(bank)["members"]} == {"original adapter"}
    cast = tmp_path / "bf16.apack"
    result = CliRunner().invoke(main, ["convert", str(bank), str(cast), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    add_to_bank(cast, [paths[2]])
    listed = {m["name"]: m for m in bank_listing(cast)["members"]}
    assert listed["lora00"]["error_reference"] == "original adapter (measured on the float32 bank, cast to bfloat16 since)"
    assert listed["lora02"]["error_reference"] == "original adapter"
    assert listed["lora00"]["rel_error_mean"] == {m["name"]: m for m in bank_listing(bank)["members"]}["lora00"]["rel_error_mean"]
