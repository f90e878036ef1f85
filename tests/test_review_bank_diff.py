"""Review of ``diff`` on odd inputs: non-finite factors, and modules whose base weights differ in shape but not in
element count (a linear [out, in] against a conv [out, c, kh, kw] with c·kh·kw = in). The bundled real adapter
is the reference; the odd modules are small and random (only shapes matter there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main
from adapterpack.errors import ConversionError
from adapterpack.examples import example_path
from adapterpack.ops.diff import diff_adapters, diff_paths


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("side", ["a", "b"])
def test_diff_refuses_non_finite_factors(tmp_path: Path, bad: float, side: str) -> None:
    """A NaN/inf in one factor gave ``rel. error nan`` (or ``-``) and exit status 0; every other analysis of ΔW
    (spectrum, rerank, banks) refuses it, naming the module. Now diff does too (ConversionError, exit 1)."""
    with adapterpack.open(example_path()) as a:
        name = next(iter(a.modules))
        m = a.modules[name]
        A = np.array(m.array("A"))
        A[0, 3] = bad
        a.modules[name] = Module(name, m.encoding, m.base_shape, m.params, {**m.tensors, "A": A})
        adapterpack.save(a, tmp_path / "bad.apack")
    pair = [str(example_path()), str(tmp_path / "bad.apack")]
    if side == "a":
        pair.reverse()
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        diff_paths(*pair)
    r = CliRunner().invoke(main, ["diff", *pair])
    assert r.exit_code == 1 and "non-finite" in r.output


def test_diff_refuses_modules_of_different_base_shapes() -> None:
    """A linear [4, 6] and a conv [4, 3, 2, 1] module have the same 2-D ΔW (4 × 6), and diff compared them as one
    (relative error 0); they are different base weights, which the error names."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, 6)).astype(np.float32)
    B = rng.standard_normal((4, 2)).astype(np.float32)
    lin = Module("m", "lora", (4, 6), {"rank": 2, "alpha": 2.0}, {"A": A, "B": B})
    conv = Module("m", "lora", (4, 3, 2, 1), {"rank": 2, "alpha": 2.0, "layout": "conv"},
                  {"A": A.reshape(2, 3, 2, 1), "B": B.reshape(4, 2, 1, 1)})
    with pytest.raises(ConversionError, match=r"\[4, 6\].*\[4, 3, 2, 1\]"):
        diff_adapters(Adapter(modules={"m": lin}), Adapter(modules={"m": conv}))
    same = diff_adapters(Adapter(modules={"m": conv}), Adapter(modules={"m": conv}))
    assert same.modules[0].rel_error == 0.0
