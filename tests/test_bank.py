"""Adapter banks on real LoRAs: joint fits (errors exact against dense float64), rank choice, streaming,
Dask, build/add/refit/extract, bad input.

The data are real r=8 LoRAs of SmolLM2-135M cut to two modules of layer 0 (``tests/data/bank_loras.apack``,
written by ``python -m tools.fixtures.train_bank --test-fixture``): four q/v LoRAs trained on different pydoc
topic shards and seeds, and the bundled example adapter (trained separately), used as the one added later.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.bank import add_to_bank, bank_listing, build_bank, extract_member, read_bank, refit_bank, write_extracted
from adapterpack.bank import store as bank_store
from adapterpack.bank.sources import PathSource
from adapterpack.errors import BankError, BankMismatchError
from adapterpack.factors import Factors
from adapterpack.linalg.bank_fit import FitOptions, MemorySource, ModuleShape, SerialExecutor, fit_bank

DATA = Path(__file__).resolve().parent / "data" / "bank_loras.apack"
NAMES = ["lora00", "lora01", "lora02", "lora03", "example"]
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = [ModuleShape(Q, 576, 576), ModuleShape(V, 192, 576)]


def _factors(name: str) -> dict[str, Factors]:
    with adapterpack.open(DATA, adapter=name) as a:
        return {m.name: Factors(np.array(m.array("A")), np.array(m.array("B")), m.factors().scale, m.base_shape) for m in a}


def _dense(f: Factors) -> np.ndarray:
    return f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))


def _sources(names: list[str] = NAMES[:4]) -> list[MemorySource]:
    return [MemorySource(n, _factors(n)) for n in names]


def _dense_rel_error(f: Factors, U: np.ndarray, V: np.ndarray, S: np.ndarray) -> float:
    d = _dense(f)
    S = np.diag(S.astype(np.float64)) if S.ndim == 1 else S.astype(np.float64)
    r = d - U.astype(np.float64) @ S @ V.astype(np.float64).T
    return float(np.sum(r * r) / np.sum(d * d))


def _split(tmp: Path, names: list[str] = NAMES) -> list[Path]:
    """Each fixture adapter as its own .apack (member names come from the file names)."""
    out = []
    for n in names:
        with adapterpack.open(DATA, adapter=n) as a:
            a.name = "default"
            adapterpack.save(a, tmp / f"{n}.apack")
        out.append(tmp / f"{n}.apack")
    return out


# --- fitting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_fit_errors_are_exact_against_dense_float64(form: str) -> None:
    srcs = _sources()
    res = fit_bank(SHAPES, srcs, rank=8, opts=FitOptions(form=form, max_iter=30), dtype="float32")
    rel = res.rel_errors()
    for i, s in enumerate(srcs):
        for j, sh in enumerate(SHAPES):
            U, Vb = res.bases[sh.name]
            S = res.members[i]["modules"][sh.name]["S"]
            assert S.dtype == np.float32 and U.dtype == np.float32
            assert rel[i, j] == pytest.approx(_dense_rel_error(s.factors[sh.name], U, Vb, S), rel=1e-7, abs=1e-12)
    rep = res.report()
    assert rep["rel_error"]["max"] == pytest.approx(rel.max()) and rep["rel_error"]["mean"] == pytest.approx(rel.mean())
    assert all(1 <= it <= 30 for it in rep["iterations"].values())
    for f in res.fits.values():  # the iterations improve on the sketch the fit starts from
        assert f.history[-1] >= f.history[0] - 1e-12
    assert 0.0 < rel.mean() < 1.0


def test_full_rank_holding_every_adapter_is_exact_and_weights_balance() -> None:
    srcs = _sources()
    exact = fit_bank(SHAPES, srcs, rank=32, dtype="float64")  # 4 adapters x r=8 span at most 32 directions
    assert exact.rel_errors().max() < 1e-12
    # with 1/||dW||^2 weights no adapter is sacrificed for a larger one: the worst relative error
    # is no worse than with uniform weights at the same rank
    norm = fit_bank(SHAPES, srcs, rank=6, opts=FitOptions(weights="norm"), dtype="float64").rel_errors()
    uni = fit_bank(SHAPES, srcs, rank=6, opts=FitOptions(weights="uniform"), dtype="float64").rel_errors()
    assert norm.max() <= uni.max() + 1e-9


def test_joint_bases_beat_one_adapters_own_svd_bases() -> None:
    """The joint U, V at rank 8 fit the other adapters better than adapter 0's own top-8 singular vectors."""
    srcs = _sources()
    res = fit_bank(SHAPES[:1], srcs, rank=8, dtype="float64")
    f0 = srcs[0].factors[Q]
    u, _, vt = np.linalg.svd(_dense(f0))
    own = np.mean([_dense_rel_error(s.factors[Q], u[:, :8], vt[:8].T, u[:, :8].T @ _dense(s.factors[Q]) @ vt[:8].T) for s in srcs])
    assert res.rel_errors()[:, 0].mean() < own


def test_rank_by_target_error_and_by_budget() -> None:
    srcs = _sources()
    res = fit_bank(SHAPES, srcs, rank=32, target_error=0.3, dtype="float32")
    rel = res.rel_errors()
    ranks = res.report()["ranks"]
    assert all(1 <= r < 32 for r in ranks.values())
    assert rel.mean(axis=0).max() <= 0.3 * 1.01
    # one rank less on the q module misses the target (the choice is the least rank)
    lower = fit_bank(SHAPES[:1], srcs, rank=ranks[Q] - 1, dtype="float32").rel_errors()
    assert lower.mean() > 0.3
    budget = 60_000
    res = fit_bank(SHAPES, srcs, rank=32, budget=budget, dtype="float32")
    used = sum(U.nbytes + V.nbytes for U, V in res.bases.values())
    used += sum(m["modules"][k]["S"].nbytes for m in res.members for k in m["modules"])
    assert used <= budget
    with pytest.raises(BankError, match="cannot hold even rank 1"):
        fit_bank(SHAPES, srcs, rank=32, budget=1000)


class _Generated:
    """A picklable synthetic source: its factors are drawn when loaded and dropped after use."""

    def __init__(self, i: int) -> None:
        self.name = f"g{i}"
        self.i = i

    def load(self) -> dict[str, Factors]:
        rng = np.random.default_rng(self.i)
        return {"m": Factors(rng.standard_normal((8, 1024)), rng.standard_normal((1024, 8)), 1.0, (1024, 1024))}


def test_streaming_memory_does_not_grow_with_the_number_of_adapters() -> None:
    """Memory is the bases plus one adapter: 8x the adapters, about the same peak (the fit never holds them all)."""
    shapes = [ModuleShape("m", 1024, 1024)]

    def peak(n: int) -> int:
        srcs = [_Generated(i) for i in range(n)]
        tracemalloc.start()
        fit_bank(shapes, srcs, rank=8, opts=FitOptions(max_iter=2), dtype="float32")
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, large = peak(4), peak(32)
    one_adapter = 2 * 1024 * 8 * 8
    assert large < small + 4 * one_adapter  # 28 more adapters held at once would add 28x


def test_dask_cluster_of_worker_processes_gives_identical_results() -> None:
    import distributed  # dask[distributed] is in the test extra: missing, this test fails, never skips

    from adapterpack.linalg.bank_fit import DaskExecutor

    srcs = [PathSource(n, str(DATA), n) for n in NAMES[:4]]
    opts = FitOptions(max_iter=6, chunk=1)
    serial = fit_bank(SHAPES, srcs, rank=6, opts=opts, executor=SerialExecutor())
    with distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        ex = DaskExecutor(client)
        dask_res = fit_bank(SHAPES, srcs, rank=6, opts=opts, executor=ex)
        assert len(client.scheduler_info()["workers"]) == 3
    for k in serial.bases:
        for a, b in zip(serial.bases[k], dask_res.bases[k]):
            assert a.tobytes() == b.tobytes()
    for a, b in zip(serial.members, dask_res.members):
        for k in a["modules"]:
            assert a["modules"][k]["S"].tobytes() == b["modules"][k]["S"].tobytes()
    # the stored bank is bit-identical; the reported errors agree to rounding (numpy's SIMD sums depend on
    # where an array sits in memory, which differs between processes)
    np.testing.assert_allclose(serial.rel_errors(), dask_res.rel_errors(), rtol=1e-12, atol=0)
    assert serial.report()["iterations"] == dask_res.report()["iterations"]


# --- bank files -------------------------------------------------------------------------------------


def test_build_open_extract(tmp_path: Path) -> None:
    paths = _split(tmp_path)
    bank = tmp_path / "bank.apack"
    rep = build_bank(bank, paths[:4], rank=12)
    assert rep.adapters == 4 and rep.fit["ranks"] == {Q: 12, V: 12}
    listing = bank_listing(bank)
    assert [m["name"] for m in listing["members"]] == NAMES[:4]
    for name in NAMES[:4]:
        f = _factors(name)
        with adapterpack.open(bank, adapter=name) as a:
            for m in a:
                meta = json.loads(a.metadata["bank.rel_error"])
                err = float(np.sum((_dense(f[m.name]) - m.delta()) ** 2) / np.sum(_dense(f[m.name]) ** 2))
                assert err <= meta["max"] * (1 + 1e-5) + 1e-12
    ad, errs = extract_member(bank, "lora02")
    assert max(errs.values()) < 1e-12
    out = write_extracted(ad, tmp_path / "x.apack")
    with adapterpack.open(out) as x, adapterpack.open(bank, adapter="lora02") as b:
        for m in x:
            assert m.encoding == "lora" and m.params["rank"] <= 8  # a projected r=8 adapter stays rank 8
            np.testing.assert_allclose(m.delta(), b.delta(m.name), rtol=0, atol=1e-6 * np.abs(b.delta(m.name)).max())
    svd = write_extracted(ad, tmp_path / "svd.apack", "svd")
    with adapterpack.open(svd) as x, adapterpack.open(bank, adapter="lora02") as b:
        for m in x:
            assert m.encoding == "svd"
            np.testing.assert_allclose(m.delta(), b.delta(m.name), rtol=0, atol=1e-6 * np.abs(b.delta(m.name)).max())
    peft = write_extracted(ad, tmp_path / "peft", "peft")
    with adapterpack.open(peft) as p:
        assert sorted(p.modules) == sorted([Q, V])


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_add_projects_grows_and_keeps_old_members_bit_exact(tmp_path: Path, form: str) -> None:
    paths = _split(tmp_path)
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:4], rank=8, form=form, max_iter=10)
    before = {n: {m.name: m.delta().copy() for m in adapterpack.open(bank, adapter=n)} for n in NAMES[:4]}
    rep = add_to_bank(bank, [paths[4]], threshold=0.01)
    (added,) = rep.added
    assert added["name"] == "example" and added["rel_error_max"] <= 0.01 and sum(added["grown"].values()) > 0
    f = _factors("example")
    with adapterpack.open(bank, adapter="example") as a:
        for m in a:
            d = _dense(f[m.name])
            assert float(np.sum((d - m.delta()) ** 2) / np.sum(d * d)) <= 0.01 * 1.001
    for n, mods in before.items():
        with adapterpack.open(bank, adapter=n) as a:
            for k, d in mods.items():
                assert a.delta(k).tobytes() == d.tobytes()  # zero-padded S: not one bit changes
    again = add_to_bank(bank, [paths[4], paths[0]])
    assert again.added == [] and len(again.skipped) == 2 and "same content hash" in again.skipped[0]


def test_add_without_growth_reports_the_projection_error(tmp_path: Path) -> None:
    paths = _split(tmp_path)
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:3], rank=8)
    rank_before = read_bank(bank).modules[Q].rank
    rep = add_to_bank(bank, [paths[4]], threshold=None)
    assert read_bank(bank).modules[Q].rank == rank_before
    b = read_bank(bank)
    f = _factors("example")
    errs = [_dense_rel_error(f[k], b.modules[k].U, b.modules[k].V, b.member("example").S[k]) for k in (Q, V)]
    assert rep.added[0]["rel_error_max"] == pytest.approx(max(errs), rel=1e-6)
    assert rep.added[0]["rel_error_max"] > 0.01  # an unseen adapter is not in 8 shared directions


def test_interrupted_add_leaves_the_bank_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _split(tmp_path)
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:3], rank=8)
    before = bank.read_bytes()
    calls = {"n": 0}
    real = bank_store.encode_blob

    def failing(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bank_store, "encode_blob", failing)
    with pytest.raises(KeyboardInterrupt):
        add_to_bank(bank, [paths[4]])
    assert bank.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_refit_rewrites_from_stored_members(tmp_path: Path) -> None:
    paths = _split(tmp_path)
    bank = tmp_path / "bank.apack"
    build_bank(bank, paths[:4], rank=8)
    add_to_bank(bank, [paths[4]], threshold=0.0)
    grown = read_bank(bank).modules[Q].rank
    assert grown > 8
    rep = refit_bank(bank, rank=8)
    b = read_bank(bank)
    assert b.modules[Q].rank == 8 and [m.name for m in b.members] == NAMES
    assert all(m.metadata["bank.error_reference"] == "bank reconstruction before refit" for m in b.members)
    assert rep.fit["rel_error"]["max"] < 1.0


# --- bad input --------------------------------------------------------------------------------------


def _variant(tmp: Path, name: str, edit) -> Path:
    """Fixture adapter lora02 edited (the bad-input tests bank lora00 and lora01 with it)."""
    with adapterpack.open(DATA, adapter="lora02") as a:
        a = Adapter(name="default", base_model=a.base_model, base_architecture=a.base_architecture,
                    modules={k: m for k, m in a.modules.items()})
        edit(a)
        adapterpack.save(a, tmp / f"{name}.apack")
    return tmp / f"{name}.apack"


def test_bad_input_is_refused_naming_the_mismatch(tmp_path: Path) -> None:
    paths = _split(tmp_path, NAMES[:2])
    other_model = _variant(tmp_path, "other", lambda a: setattr(a, "base_model", "org/another-model"))
    no_v = _variant(tmp_path, "nov", lambda a: a.modules.pop(V))
    with pytest.raises(BankMismatchError, match="'other' is for base model 'org/another-model'"):
        build_bank(tmp_path / "b.apack", [*paths, other_model])
    with pytest.raises(BankMismatchError, match=r"v_proj.*'nov' lacks it.*--partial"):
        build_bank(tmp_path / "b.apack", [*paths, no_v])
    rep = build_bank(tmp_path / "b.apack", [*paths, no_v], partial=True, rank=4)
    assert list(rep.fit["ranks"]) == [Q] and "lacks it" in rep.left_out[0]
    with pytest.raises(BankError, match="at least one"):
        build_bank(tmp_path / "b.apack", [])
    built = _built(tmp_path, paths)
    before = built.read_bytes()
    with pytest.raises(BankMismatchError, match="'nov' lacks it"):
        add_to_bank(built, [no_v])
    with pytest.raises(BankMismatchError, match="base model"):
        add_to_bank(built, [other_model])
    assert built.read_bytes() == before


VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"


def crafted_bank(tmp: Path, edit, name: str = "crafted.apack") -> Path:
    """The spec's shared_full_raw bank vector with its index rewritten by ``edit`` (blobs kept, version 1.1)."""
    from tools import make_vectors

    out = tmp / name
    out.write_bytes((VECTORS / "shared_full_raw.apack").read_bytes())
    make_vectors._craft(out, edit, minor=1)
    return out


def _drop_form(index: dict) -> None:
    for a in index["adapters"]:
        for m in a["modules"]:
            m["params"].pop("form")


def test_bank_without_form_is_refused_with_the_record_error(tmp_path: Path) -> None:
    """Records are validated before their raw params are used: a missing form is a RecordError, not a KeyError."""
    from click.testing import CliRunner

    from adapterpack.cli import main
    from adapterpack.errors import RecordError

    assert read_bank(VECTORS / "shared_full_raw.apack").form == "full"  # the untouched vector reads
    bad = crafted_bank(tmp_path, _drop_form)
    with pytest.raises(RecordError, match="form must be one of"):
        read_bank(bad)
    with pytest.raises(RecordError, match="form must be one of"):
        bank_listing(bad)
    r = CliRunner().invoke(main, ["bank", "list", str(bad)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)  # a handled error, no traceback
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapterpack: ") and "form must be one of" in lines[0]


def _built(tmp: Path, paths: list[Path]) -> Path:
    out = tmp / "c.apack"
    build_bank(out, paths, rank=4)
    return out


def test_cli_bank_commands(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adapterpack.cli import main

    paths = [str(p) for p in _split(tmp_path)]
    bank = str(tmp_path / "bank.apack")
    run = CliRunner().invoke
    r = run(main, ["bank", "build", bank, *paths[:4], "--rank", "6"])
    assert r.exit_code == 0, r.output
    assert "build 4 adapters, 2 modules" in r.output and "relative squared error: mean" in r.output
    r = run(main, ["bank", "add", bank, paths[4], paths[1]])
    assert r.exit_code == 0 and "example: relative squared error" in r.output and "same content hash" in r.output
    r = run(main, ["bank", "list", bank])
    assert r.exit_code == 0 and all(n in r.output for n in NAMES)
    r = run(main, ["bank", "extract", bank, "lora03", str(tmp_path / "x.apack")])
    assert r.exit_code == 0 and (tmp_path / "x.apack").is_file()
    r = run(main, ["inspect", bank])
    assert r.exit_code == 0 and "shared" in r.output
    r = run(main, ["bank", "build", str(tmp_path / "e.apack")])
    assert r.exit_code == 1 and "adapterpack: no adapters given" in r.output
    assert not os.path.exists(tmp_path / "e.apack")
