"""The check that a second implementation under ``tools/vectors/`` shares no code with adapterpack: it imports only
the modules it is allowed (statically), and a fresh interpreter that runs it over the golden vectors loads nothing of
adapterpack. Used for the ΔW reference (``_reference.py``) and the clean-room reader (``_container_reference.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def assert_independent(name: str, allowed: set[str], loop: str) -> None:
    """``tools/vectors/<name>.py`` imports only ``allowed``; ``loop`` (code using it as ``mod``, adding to ``n`` for
    every vector it handled) runs in a fresh interpreter, handles at least one and leaves no adapterpack module loaded."""
    tree = ast.parse((REPO / "tools" / "vectors" / f"{name}.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= allowed, imported - allowed
    code = (
        f"import json, pathlib, sys\nfrom tools.vectors import {name} as mod\nn = 0\n{loop}"
        "print(n, sorted(m for m in sys.modules if m.split('.')[0] == 'adapterpack'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) > 0 and out[1].strip() == "[]", out
