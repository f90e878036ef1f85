"""The house: no module imports another that (directly or not) imports it back, and the import-linter
contracts in pyproject.toml (floors import downward, no circles between siblings, torch only under
adapterpack.torch) hold. .ci/run runs ``lint-imports`` too; this keeps the suite guarding it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back() -> None:
    """Function-level imports count: a circle hidden inside a function is still a circle."""
    graph = grimp.build_graph("adapterpack", exclude_type_checking_imports=True)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is a test extra; .ci/run installs it")
def test_import_contracts_hold() -> None:
    r = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, env=None, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout and r.stdout.count("KEPT") >= 3


def test_moved_paths_are_the_same_modules() -> None:
    """0.1 import paths keep working for one minor version, as the same module objects (with a warning)."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import adapterpack.ops.convert as new\n"
        "try:\n    import adapterpack.convert\nexcept DeprecationWarning as e:\n    print('warned', e)\n"
        "warnings.simplefilter('ignore')\n"
        "import adapterpack.convert as old, adapterpack.interop.peft as p, adapterpack.formats.peft as q\n"
        "from adapterpack.interop.targets import write_vllm\n"
        "from adapterpack.formats.serving import write_vllm as w2\n"
        "print(old is new, p is q, write_vllm is w2, q.__spec__.name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("warned adapterpack.convert moved to adapterpack.ops.convert")
    assert lines[1] == "True True True adapterpack.formats.peft"
