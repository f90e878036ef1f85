"""Official NOLA checkpoints (GPT-2 lora_state_dict, LLaMA PEFT layout) → lora records, with the
bases their recipe generates on the named device; the caller's random state is left alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adapterpack import errors
from adapterpack.formats.nola_checkpoint import read_nola_checkpoint


def _layer(sd: dict, prefix: str, out: int, inp: int, r: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for side, (o, i) in (("A", (r, inp)), ("B", (out, r))):
        sd[f"{prefix}.lora_{side}.weight"] = torch.rand(o, i, generator=g) - 0.5 if side == "A" else torch.zeros(o, i)
        sd[f"{prefix}.lora_{side}.coefficients"] = torch.randn(k, generator=g)
        sd[f"{prefix}.lora_{side}.seed"] = torch.tensor([seed * 1000 + (side == "B")])


def _factor(sd: dict, prefix: str, side: str) -> np.ndarray:
    """Their recipe, written out in the test: manual_seed, uniform_(-1, 1) of [k, out, in], / √k, + weight."""
    w, c, s = (sd[f"{prefix}.lora_{side}.{x}"] for x in ("weight", "coefficients", "seed"))
    torch.manual_seed(int(s[0]))
    basis = torch.zeros(c.shape[0], *w.shape).uniform_(-1, 1) / math.sqrt(c.shape[0])
    return (w + torch.einsum("b,boi->oi", c, basis)).double().numpy()


def test_gpt2_query_value_land_in_c_attn() -> None:
    sd: dict = {}
    n, r, k, alpha = 8, 2, 5, 4.0
    for i in range(2):
        _layer(sd, f"transformer.h.{i}.attn.nola_query", n, n, r, k, seed=10 * i + 1)
        _layer(sd, f"transformer.h.{i}.attn.nola_value", n, n, r, k, seed=10 * i + 2)
    state = torch.random.get_rng_state()
    ad = read_nola_checkpoint(sd, alpha=alpha, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sorted(ad.modules) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    m = ad.module("transformer.h.1.attn.c_attn")
    assert m.params["fan_in_fan_out"] and m.base_shape == (n, 3 * n)
    dw = m.delta().astype(np.float64).T  # [3n, n]: rows q | k | v
    for which, rows in (("query", slice(0, n)), ("value", slice(2 * n, 3 * n))):
        p = f"transformer.h.1.attn.nola_{which}"
        want = alpha / r * _factor(sd, p, "B") @ _factor(sd, p, "A")
        np.testing.assert_allclose(dw[rows], want, rtol=1e-5, atol=1e-6)
    assert np.all(dw[n : 2 * n] == 0)
    assert "cpu" in ad.metadata["nola.materialized_on"]


def test_peft_layout_and_file_round_trip(tmp_path: Path) -> None:
    sd: dict = {}
    _layer(sd, "base_model.model.model.layers.0.self_attn.q_proj", 6, 10, 2, 7, seed=3)
    path = tmp_path / "nola.pt"
    torch.save(sd, path)
    ad = read_nola_checkpoint(path, alpha=16.0)
    m = ad.module("model.layers.0.self_attn.q_proj")
    p = "base_model.model.model.layers.0.self_attn.q_proj"
    want = 16.0 / 2 * _factor(sd, p, "B") @ _factor(sd, p, "A")
    np.testing.assert_allclose(m.delta(), want, rtol=1e-5, atol=1e-6)


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    sd: dict = {}
    _layer(sd, "base_model.model.q_proj", 6, 10, 2, 7, seed=3)
    del sd["base_model.model.q_proj.lora_B.seed"]
    with pytest.raises(errors.InputError, match=r"lora_B\.seed"):
        read_nola_checkpoint(sd, alpha=1.0)
    with pytest.raises(errors.InputError, match="no NOLA layers"):
        read_nola_checkpoint({"x.weight": torch.zeros(2)}, alpha=1.0)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(errors.InputError):
        read_nola_checkpoint(bad, alpha=1.0)
