"""Hostile timing against adapterpack's outputs (issue 12, defects 3 and 9): kills, concurrent reads, racing creates.

Runs every adapterpack step in a child process importing the package from ``--repo`` (default: this
checkout), so one command measures any version (e.g. a ``git archive`` of main unpacked in /tmp):

1. ``kills``: ``python -m adapterpack convert NEW DST --to peft --force`` onto a PEFT folder holding OLD
   (other alpha, other weights), SIGKILLed at a uniformly random time of its output phase: after its
   first trace (a new name beside or in DST, or a file it holds open there: Linux /proc), up to the
   median time from there to the exit of an unkilled run. Counted: the folder left old, new, mixed (one
   version's config with the other's weights) or broken (missing or unreadable), kills that left a temp
   file, temp files the next write left standing. The same for ``--to apack --force`` onto a file.
   ``steps``: the same, killed once before each file-system step in turn (an audit hook in a forked
   child): deterministic, every window counted once.
2. ``reads``: a child replacing the folder in a loop (``write_peft``, OLD and NEW in turn) while another
   reads it with ``adapterpack.open`` for ``--seconds`` (from the first write on): reads that saw a mix, errors.
3. ``races``: two ``convert`` without ``--force`` to the same new path, started together, ``--races``
   times: rounds where both exited 0, and where the output was not one whole input.

``--in-place``: the PEFT writes of 1 and 2 go to ``.`` from inside the folder (a folder that cannot be
swapped, as a bind mount; filled in place), and a folder left without its config counts as ``refused``.

    python -m tools.hostile.atomic_stress --kills 30 --seconds 4 --races 20 [--parts reads] [--in-place] [--repo /tmp/main_snapshot]

Bounded in time by its arguments (each child also by a timeout); not run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAME = "model.layers.{i}.self_attn.q_proj"

MAKE = """
import sys
import numpy as np
from adapterpack import Adapter, Module
from adapterpack.container.writer import write_apack
from adapterpack.formats.peft import write_peft
def version(value, alpha, modules, width):
    mods = {}
    for i in range(modules):
        name = "model.layers.%d.self_attn.q_proj" % i
        a = np.full((64, width), 1.0, np.float32)
        b = np.full((width, 64), value, np.float32)
        mods[name] = Module(name, "lora", (width, width), {"rank": 64, "alpha": alpha}, {"A": a, "B": b})
    return Adapter(base_model="toy/base", modules=mods)
out, modules, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for tag, value, alpha in (("old", 1.0, 8.0), ("new", 2.0, 16.0)):
    ad = version(value, alpha, modules, width)
    write_apack(f"{out}/{tag}.apack", ad, codec="raw")
    write_peft(ad, f"{out}/{tag}.peft")
"""

#: Kill ``convert --force`` before each of its file-system steps in turn (forked children, audit hooks).
STEPS = """
import json, os, shutil, signal, sys
from pathlib import Path
from adapterpack.ops.convert import convert
src, dst, old_copy, target = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
events = set(sys.argv[5].split(","))
in_place = sys.argv[6] == "1"
work = dst.parent
def reset():
    if in_place and dst.is_dir():  # the working directory: emptied and refilled, never removed
        for p in dst.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in old_copy.iterdir():
            shutil.copyfile(p, dst / p.name)
        (dst / "README.md").write_text("model card")
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if old_copy.is_dir():
        shutil.copytree(old_copy, dst)
        (dst / "README.md").write_text("model card")
    else:
        shutil.copyfile(old_copy, dst)
def snap():
    if dst.is_dir():
        return {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file() and not p.name.startswith(".")}
    return {"": dst.read_bytes()} if dst.exists() else None
def extra():
    names = [p.name for p in work.iterdir() if p != dst]
    return names + ([p.name for p in dst.iterdir() if p.name.startswith(".")] if dst.is_dir() else [])
reset(); old = snap()
if in_place:
    os.chdir(dst)
out = Path(".") if in_place else dst
convert(src, out, to=target, force=True); new = snap()
counts = {"steps": 0, "old": 0, "new": 0, "mixed": 0, "refused": 0, "broken": 0, "left_temp": 0, "temp_after_next_write": 0}
for step in range(1, 1000):
    reset()
    pid = os.fork()
    if pid == 0:
        seen = [0]
        def hook(event, args):
            if event in events:
                seen[0] += 1
                if seen[0] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
        sys.addaudithook(hook)
        try:
            convert(src, out, to=target, force=True)
        finally:
            os._exit(0)
    if os.waitpid(pid, 0)[1] == 0:
        break
    counts["steps"] += 1
    state = snap()
    if state in (old, new):
        counts["old" if state == old else "new"] += 1
    elif state is not None and set(state) == set(old) and all(state[k] in (old[k], new[k]) for k in state):
        counts["mixed"] += 1
    elif state is not None and set(state) == set(old) - {"adapter_config.json"}:
        counts["refused"] += 1
    else:
        counts["broken"] += 1
    counts["left_temp"] += bool(extra())
    convert(src, out, to=target, force=True)
    counts["temp_after_next_write"] += len(extra())
print(json.dumps(counts))
"""
#: The audit events of file-system steps (the kill lands just before one).
FS_EVENTS = (
    "open,os.rename,os.link,os.remove,os.rmdir,os.mkdir,os.chmod,os.symlink,os.scandir,os.listdir,shutil.rmtree,"
    "shutil.copyfile,shutil.copytree,tempfile.mkstemp,tempfile.mkdtemp,ctypes.call_function"
)

#: Classify a PEFT folder by its own two files: old / new / mixed / broken.
CLASSIFY = """
import json, sys
from pathlib import Path
from safetensors import safe_open
d = Path(sys.argv[1])
if not (d / "adapter_config.json").exists():
    print("refused")
    sys.exit()
try:
    alpha = json.loads((d / "adapter_config.json").read_text())["lora_alpha"]
    with safe_open(d / "adapter_model.safetensors", framework="np") as f:
        key = next(k for k in f.keys() if k.endswith("lora_B.weight"))
        value = float(f.get_tensor(key)[0, 0])
except Exception as e:
    print("broken")
else:
    print({(8, 1.0): "old", (16, 2.0): "new"}.get((alpha, value), "mixed"))
"""

WRITER = """
import os, sys, time
from pathlib import Path
from adapterpack import open as ap_open
from adapterpack.formats.peft import write_peft
old, new = ap_open(sys.argv[2]), ap_open(sys.argv[3])
started, stop = Path(sys.argv[4]), Path(sys.argv[5])
dst = sys.argv[1]
if sys.argv[6] == "1":  # in place
    os.chdir(dst)
    dst = "."
end, i = time.monotonic() + 600, 0
while not stop.exists() and time.monotonic() < end:
    write_peft((new, old)[i % 2], dst)
    i += 1
    started.touch()
print(i)
"""

READER = """
import json, sys, time
import numpy as np
import adapterpack
name = "model.layers.0.self_attn.q_proj"
end = time.monotonic() + float(sys.argv[2])
counts = {"old": 0, "new": 0, "mixed": 0, "refused": 0, "error": 0}
while time.monotonic() < end:
    try:
        with adapterpack.open(sys.argv[1]) as ad:
            m = ad.module(name)
            pair = (float(m.params["alpha"]), float(np.asarray(m.array("B"))[0, 0]))
        counts[{(8.0, 1.0): "old", (16.0, 2.0): "new"}.get(pair, "mixed")] += 1
    except Exception as e:  # refused: the config moved aside by a writer in place, or the files kept changing
        counts["refused" if "no adapter_config.json" in str(e) or "kept changing" in str(e) else "error"] += 1
print(json.dumps(counts))
"""


def child(
    repo: Path, *args: str, code: str | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -B -c code args`` (or ``python -B -m adapterpack args``) importing adapterpack from ``repo``."""
    cmd = [sys.executable, "-B", *(("-c", code) if code is not None else ("-m", "adapterpack")), *args]
    env = os.environ | {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd or tempfile.gettempdir())


def spawn(repo: Path, *args: str, code: str | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-B", *(("-c", code) if code is not None else ("-m", "adapterpack")), *args]
    env = os.environ | {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or tempfile.gettempdir()
    )


def snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes() if path.exists() else None


def extra(work: Path, dst: Path) -> list[str]:
    """Names in ``work`` and inside a ``dst`` folder that are not the output's own."""
    names = [p.name for p in work.iterdir() if p != dst]
    if dst.is_dir():
        own = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        names += [f"{dst.name}/{p.name}" for p in dst.iterdir() if p.name not in own]
    return names


def names(work: Path, dst: Path) -> set[str]:
    """Every name in ``work`` and in a ``dst`` folder (empty while one vanishes under the listing)."""
    try:
        found = set(os.listdir(work))
        return found | ({f"{dst.name}/{n}" for n in os.listdir(dst)} if dst.is_dir() else set())
    except OSError:
        return set()


def writing(pid: int, work: Path) -> bool:
    """Whether process ``pid`` has a file open under ``work`` (Linux /proc; an unnamed temp file included)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{work}/"):
                return True
    return False


def kills(repo: Path, data: Path, target: str, n: int, rng: random.Random, in_place: bool) -> dict[str, int]:
    """``n`` timed SIGKILLs of ``convert NEW DST --to target --force`` onto OLD (``in_place``: PEFT to ``.`` in DST)."""
    work = data / f"kill-{target}"
    dst = work / ("out" if target == "peft" else "out.apack")
    cwd = dst if in_place and target == "peft" else None
    src_new, src_old = data / "new.apack", data / "old.apack"

    def reset() -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        if target == "peft":
            shutil.copytree(data / "old.peft", dst)
            (dst / "README.md").write_text("model card")
        else:
            shutil.copyfile(src_old, dst)

    reset()
    old = snapshot(dst)
    args = ["convert", str(src_new), "." if cwd else str(dst), "--to", target, "--force"]

    def started(p: subprocess.Popen[str], before: set[str]) -> float:
        """When the writer's first trace appeared (a new name beside or in DST, or a file open under it), or it exited."""
        while p.poll() is None and names(work, dst) == before and not writing(p.pid, work):
            time.sleep(0.0005)
        return time.monotonic()

    spans = []
    for _ in range(3):
        reset()
        before = names(work, dst)
        p = spawn(repo, *args, cwd=cwd)
        t1 = started(p, before)
        p.communicate()
        assert p.returncode == 0
        spans.append(time.monotonic() - t1)
    new = snapshot(dst)
    span = sorted(spans)[1]
    out = {"old": 0, "new": 0, "mixed": 0, "refused": 0, "broken": 0, "left_temp": 0, "temp_after_next_write": 0}
    out["next_write_failed"] = 0
    for _ in range(n):
        reset()
        before = names(work, dst)
        p = spawn(repo, *args, cwd=cwd)
        started(p, before)
        time.sleep(rng.uniform(0, span))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        state = snapshot(dst)
        if state == old:
            out["old"] += 1
        elif state == new:
            out["new"] += 1
        elif target == "peft" and dst.is_dir():
            out[child(repo, str(dst), code=CLASSIFY).stdout.strip()] += 1
        else:
            out["broken"] += 1
        if extra(work, dst):
            out["left_temp"] += 1
        if child(repo, *args, cwd=cwd).returncode != 0:
            out["next_write_failed"] += 1
        out["temp_after_next_write"] += len(extra(work, dst))
    out["kill_window_s"] = round(span, 3)  # type: ignore[assignment]
    return out


def steps(repo: Path, data: Path, target: str, in_place: bool) -> dict[str, int]:
    """Kills before every file-system step of one ``convert --to target --force`` onto OLD (deterministic)."""
    work = data / f"steps-{target}"
    dst = work / ("out" if target == "peft" else "out.apack")
    old = data / ("old.peft" if target == "peft" else "old.apack")
    flag = str(int(in_place and target == "peft"))
    r = child(repo, str(data / "new.apack"), str(dst), str(old), target, FS_EVENTS, flag, code=STEPS, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def reads(repo: Path, data: Path, seconds: float, in_place: bool) -> dict[str, object]:
    """A writer replacing the folder in a loop (``in_place``: writing ``.`` inside it) while a reader reads it for ``seconds``."""
    dst = data / "reads" / "peft"
    shutil.rmtree(dst.parent, ignore_errors=True)
    dst.parent.mkdir()
    shutil.copytree(data / "old.peft", dst)
    small, started, stop = data / "small", dst.parent / "started", dst.parent / "stop"
    flag = str(int(in_place))
    writer = spawn(repo, str(dst), str(small / "old.apack"), str(small / "new.apack"), str(started), str(stop), flag, code=WRITER)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        r = child(repo, str(dst), str(seconds), code=READER)
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    counts: dict[str, object] = json.loads(r.stdout)
    counts["writes"] = int(out)
    return counts


def races(repo: Path, data: Path, n: int) -> dict[str, int]:
    """``n`` rounds of two converts without --force to one new path, started together."""
    out = {"both_exit_0": 0, "one_refused": 0, "other": 0, "output_not_whole": 0}
    work = data / "races"
    want = {snapshot(data / "small" / f"{t}.apack") for t in ("old", "new")}  # type: ignore[misc]
    for _ in range(n):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        dst = work / "out.apack"
        procs = [spawn(repo, "convert", str(data / "small" / f"{t}.apack"), str(dst), "--codec", "raw") for t in ("old", "new")]
        codes = [p.wait(timeout=300) for p in procs]
        errs = [p.stderr.read() if p.stderr else "" for p in procs]
        if codes == [0, 0]:
            out["both_exit_0"] += 1
        elif sorted(codes) == [0, 1] and any("already exists" in e for e in errs):
            out["one_refused"] += 1
        else:
            out["other"] += 1
        if snapshot(dst) not in want or len(list(work.iterdir())) != 1:
            out["output_not_whole"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose adapterpack is measured")
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--races", type=int, default=20)
    ap.add_argument("--modules", type=int, default=8, help="modules of the killed convert's adapter (64 x width² each)")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="steps,kills,reads,races", help="which measurements, comma-separated")
    ap.add_argument("--in-place", action="store_true", help="PEFT writes to '.' inside the folder (filled in place)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    repo = args.repo.resolve()
    print(f"adapterpack from {repo}; {sys.executable}")
    with tempfile.TemporaryDirectory(prefix="atomic-stress-") as tmp:
        data = Path(tmp)
        r = child(repo, tmp, str(args.modules), str(args.width), code=MAKE)
        assert r.returncode == 0, r.stderr
        (data / "small").mkdir()
        r = child(repo, str(data / "small"), "1", "16", code=MAKE)
        assert r.returncode == 0, r.stderr
        print(f"inputs: {(data / 'new.apack').stat().st_size:,} B apack, PEFT folders of the same adapter")
        parts, inp = args.parts.split(","), args.in_place
        for target in ("peft", "apack") if "steps" in parts else ():
            print(f"a kill before each file-system step of convert --to {target} --force:", steps(repo, data, target, inp))
        for target in ("peft", "apack") if "kills" in parts else ():
            print(f"kills during convert --to {target} --force ({args.kills}):", kills(repo, data, target, args.kills, rng, inp))
        if "reads" in parts:
            print(f"concurrent reads ({args.seconds:g} s):", reads(repo, data, args.seconds, inp))
        if "races" in parts:
            print(f"double create without --force ({args.races} rounds):", races(repo, data, args.races))


if __name__ == "__main__":
    main()
