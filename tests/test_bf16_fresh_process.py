"""A bf16 PEFT folder opens in a fresh process: ml_dtypes is imported lazily (start-up), so the reader must
import it before safetensors asks numpy for the 'bfloat16' dtype (it failed with "data type 'bfloat16' not
understood" when nothing had imported ml_dtypes yet)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from adapterpack.examples import example_path
from adapterpack.ops.convert import convert

REPO = Path(__file__).resolve().parents[1]


def test_bf16_peft_folder_opens_in_a_fresh_process(tmp_path: Path) -> None:
    apack, peft = tmp_path / "bf16.apack", tmp_path / "bf16"
    convert(example_path(), apack, to="apack", dtype="bf16")
    convert(apack, peft, to="peft")
    code = (
        "import sys, adapterpack\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        f"a = adapterpack.open({str(peft)!r})\n"
        "m = next(iter(a))\n"
        "print(m.factors().A.dtype, len(a.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["bfloat16", "120"]
