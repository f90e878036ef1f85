"""Review (round 2): TorchBank on bad serving requests — row indices, batch and feature sizes, device names — gets
a BankError / ConversionError, not torch's IndexError (a device-side assert that ends the process on a GPU);
embedding-layout modules gather their rows instead of multiplying the ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import adapterpack  # noqa: E402
from adapterpack.errors import BankError, ConversionError  # noqa: E402
from adapterpack.torch.bank import TorchBank  # noqa: E402
from tests.test_bank_torch import crafted_bank  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"  # [64, 96] in both adapters of the spec vector; v_proj only in "en"


def test_bad_rows_and_sizes_are_bank_errors(tmp_path: Path) -> None:
    bank = crafted_bank(tmp_path, lambda index: None)
    x = torch.randn(3, 2, 96)
    with TorchBank(bank) as tb:
        tb.use(["de", "de"])  # ("en" carries a pass-through tensor, which a TorchBank refuses)
        good = tb.delta(Q, x, torch.tensor([0, 1, 1]))
        assert good.shape == (3, 2, 64)
        for rows, match in ((torch.tensor([0, 2, 1]), "row"), (torch.tensor([0, -1, 1]), "row"),
                            (torch.tensor([0, 1]), "rows"), (torch.tensor([0.0, 1.0, 1.0]), "integer")):
            with pytest.raises(BankError, match=match):
                tb.delta(Q, x, rows)
        with pytest.raises(BankError, match="96"):
            tb.delta(Q, torch.randn(3, 2, 95), torch.tensor([0, 1, 1]))
        with pytest.raises(BankError, match="96"):
            tb.apply(Q, torch.randn(3, 95), torch.zeros(64, 95), torch.tensor([0, 1, 1]))
        with pytest.raises(BankError, match=r"weight must be \[64, 96\]"):
            tb.apply(Q, x, torch.zeros(96, 64), torch.tensor([0, 1, 1]))


def test_a_bad_device_name_is_a_conversion_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="device"):
        TorchBank(crafted_bank(tmp_path, lambda index: None), device="gpu0")


def _as_embedding(index: dict) -> None:
    for ad in index["adapters"]:
        for m in ad["modules"]:
            if m["name"] == Q:
                m["params"]["layout"] = "embedding"
                m["base_shape"] = [96, 64]  # [num_embeddings, dim]: U [64, R] (dim), V [96, R] (ids)


def test_embedding_modules_gather_rows_like_the_dense_delta(tmp_path: Path) -> None:
    """Before: the ids were cast to float and multiplied by V (torch's RuntimeError, or a wrong ΔW when t == 96)."""
    bank = crafted_bank(tmp_path, _as_embedding)
    ids = torch.tensor([[5, 0, 95], [7, 7, 1]])
    w0 = torch.randn(96, 64)
    with TorchBank(bank) as tb:
        tb.use(["de"])
        got = tb.apply(Q, ids, w0, torch.tensor([0, 0]))
    with adapterpack.open(bank, adapter="de") as a:
        dense = torch.from_numpy(a.module(Q).delta().astype(np.float32))  # [96, 64], the embedding's layout
    assert dense.abs().max() > 0
    torch.testing.assert_close(got, (w0 + dense)[ids], rtol=1e-5, atol=1e-5)
