"""adapterpack.torch.bank: bases on the device once, batched apply with a different adapter per row,
checked against per-adapter LoRA math (float64 references) on the real fixture LoRAs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterpack
from adapterpack.bank import build_bank
from adapterpack.errors import BankError
from adapterpack.torch.bank import TorchBank

DATA = Path(__file__).resolve().parent / "data" / "bank_loras.apack"
VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
NAMES = ["lora00", "lora01", "lora02", "lora03"]
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


def _lora_delta(name: str, module: str) -> np.ndarray:
    """s·B·A of the original LoRA in float64."""
    with adapterpack.open(DATA, adapter=name) as a:
        f = a.module(module).factors()
        return f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))


def _build(path: Path, **kw: object) -> Path:
    """A bank of the first four fixture adapters (the fifth is for the add tests)."""
    from adapterpack.container.writer import write_apack
    from adapterpack.formats import open_adapters

    src = path.with_name(path.stem + "_src.apack")
    with open_adapters(DATA) as opened:
        write_apack(src, [a for a in opened.adapters if a.name in NAMES])
    build_bank(path, [src], **kw)
    return path


def crafted_bank(tmp: Path, edit: Callable[[dict], None]) -> Path:
    """The spec's shared_full_raw bank vector with its index rewritten by ``edit`` (blobs kept, version 1.1)."""
    from tools import make_vectors

    out = tmp / "crafted.apack"
    out.write_bytes((VECTORS / "shared_full_raw.apack").read_bytes())
    make_vectors._craft(out, edit, minor=1)
    return out


CASES = [("exact", {"rank": 32}), ("full", {"rank": 8}), ("diagonal", {"rank": 12, "form": "diagonal"})]


@pytest.mark.parametrize(("kind", "kw"), CASES)
def test_batched_apply_matches_per_adapter_math(tmp_path: Path, kind: str, kw: dict) -> None:
    bank = _build(tmp_path / f"{kind}.apack", **kw)
    rows = torch.tensor([2, 0, 3, 3, 1, 0, 2])  # seven rows, four adapters, mixed order
    gen = torch.Generator().manual_seed(0)
    with TorchBank(bank) as tb:
        tb.use(NAMES)
        for module, out_f in ((Q, 576), (V, 192)):
            x = torch.randn(len(rows), 5, 576, generator=gen)
            w0 = torch.randn(out_f, 576, generator=gen) * 0.05
            y = tb.apply(module, x, w0, rows)
            assert y.shape == (len(rows), 5, out_f)
            for b, r in enumerate(rows.tolist()):
                name = NAMES[r]
                with adapterpack.open(bank, adapter=name) as a:
                    bank_delta = a.module(module).delta().astype(np.float64)
                xb = x[b].double().numpy()
                ref = xb @ (w0.double().numpy() + bank_delta).T
                np.testing.assert_allclose(y[b].double().numpy(), ref, rtol=0, atol=2e-4 * np.abs(ref).max())
                if kind == "exact":  # a bank holding every adapter's span reproduces the LoRA itself
                    lora = xb @ (w0.double().numpy() + _lora_delta(name, module)).T
                    np.testing.assert_allclose(y[b].double().numpy(), lora, rtol=0, atol=2e-4 * np.abs(lora).max())
                np.testing.assert_allclose(tb.materialize(name, module).double().numpy(), bank_delta, rtol=0,
                                           atol=1e-6 * np.abs(bank_delta).max())


def test_bank_without_form_is_refused_with_the_record_error(tmp_path: Path) -> None:
    """TorchBank validates every record before using raw params (a missing form: RecordError, not KeyError)."""
    from adapterpack.errors import RecordError

    def drop_form(index: dict) -> None:
        for a in index["adapters"]:
            for m in a["modules"]:
                m["params"].pop("form")

    with pytest.raises(RecordError, match="form must be one of"):
        TorchBank(crafted_bank(tmp_path, drop_form))


def _unshared(index: dict) -> None:
    """Adapter 'de' gets valid shared records whose U, V are not the bank's: its q_proj uses v_proj's blobs
    (shape [4, 12]) and its v_proj uses q_proj's (every blob still referenced)."""
    q, v = index["adapters"][0]["modules"]
    s_de = index["adapters"][1]["modules"][0]["tensors"]["S"]  # de's own q_proj S
    index["adapters"][1]["modules"] = [dict(q, name=v["name"], tensors={"U": q["tensors"]["U"], "V": q["tensors"]["V"], "S": s_de}),
                                       dict(v, name=q["name"], tensors=dict(v["tensors"]))]


def test_records_not_sharing_the_bases_are_refused_and_the_file_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each record is valid alone (the reader opens both adapters), but 'de' does not use the bank's U, V: refused,
    as read_bank refuses it, and the reader opened by the failed constructor is closed."""
    import adapterpack.torch.bank as torch_bank
    from adapterpack.bank import read_bank

    bad = crafted_bank(tmp_path, _unshared)
    for name in ("en", "de"):
        with adapterpack.open(bad, adapter=name) as a:
            assert len(list(a)) == 2
    with pytest.raises(BankError, match=r"'de' module 'model\.layers\.0\.self_attn\.v_proj' does not share"):
        read_bank(bad)
    opened = []

    class Recording(torch_bank.ApackReader):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, **k)
            opened.append(self)

    monkeypatch.setattr(torch_bank, "ApackReader", Recording)
    with pytest.raises(BankError, match=r"'de' module 'model\.layers\.0\.self_attn\.v_proj' does not share the bank's U, V"):
        TorchBank(bad)
    assert len(opened) == 1 and opened[0]._mm is None


def test_use_reads_only_the_named_adapters_and_refuses_unknown_ones(tmp_path: Path) -> None:
    bank = _build(tmp_path / "b.apack", rank=8)
    with TorchBank(bank) as tb:
        with pytest.raises(BankError, match="call use"):
            tb.delta(Q, torch.zeros(1, 576), torch.tensor([0]))
        with pytest.raises(BankError, match="no adapter 'nope'"):
            tb.use(["lora00", "nope"])
        tb.use(["lora03"])
        y = tb.delta(V, torch.ones(2, 576), torch.tensor([0, 0]))
        assert torch.equal(y[0], y[1])
        assert tb.U[Q].shape == (576, 8) and tb.V[V].shape == (576, 8)


def test_an_ill_conditioned_diagonal_bank_is_served_without_cancellation(tmp_path: Path) -> None:
    """A diagonal bank of the four real LoRAs at rank 64 holds nearly collinear bases (condition numbers ~1e8) with large
    σ of both signs: used as they are, bf16 lost ΔW entirely (relative error ~400) and float32 kept 3 %. TorchBank
    re-factors such bases at load (QR in float64, S' = R_U·S·R_Vᵀ): the error is the dtype's rounding again."""
    bank = _build(tmp_path / "diag64.apack", rank=64, form="diagonal")
    x = torch.randn(1, 3, 576, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        with TorchBank(bank, dtype=dt) as tb:
            tb.use(NAMES)
            for module in (Q, V):
                for i, name in enumerate(NAMES):
                    with adapterpack.open(bank, adapter=name) as a:
                        ref = a.module(module).delta().astype(np.float64)
                    got = tb.materialize(name, module).double().numpy()
                    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol, (dt, module, name)
                    y = tb.delta(module, x.to(dt), torch.tensor([i])).double().numpy()[0]
                    want = x[0].numpy() @ ref.T
                    assert np.linalg.norm(y - want) / np.linalg.norm(want) < tol, (dt, module, name)


def test_orthonormal_bases_are_used_as_stored(tmp_path: Path) -> None:
    """A full-form bank's bases are orthonormal: they reach the device bit for bit, and S keeps its stored values."""
    from adapterpack.torch.tensors import tensor

    bank = _build(tmp_path / "full.apack", rank=8)
    with TorchBank(bank) as tb, adapterpack.open(bank, adapter=NAMES[1]) as a:
        tb.use(NAMES)
        m = a.module(Q)
        assert tb.form[Q] == "full"
        assert torch.equal(tb.U[Q], tensor(m.array("U"))) and torch.equal(tb.V[Q], tensor(m.array("V")))
        assert torch.equal(tb._S[Q][1], tensor(m.array("S")))
