"""Shared pieces of the benchmarks: inputs, the 'loaded' rule, interleaved timing, tables, machine facts."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "adapterpack" / "examples" / "smollm2-pydoc-lora"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PAGE = 4096
MB = 1e6


# --- inputs ----------------------------------------------------------------------------------------


def example_dir() -> Path:
    """The bundled real adapter (a PEFT folder); a clear error when it has not been built."""
    if not (EXAMPLE_DIR / PEFT_WEIGHTS).is_file():
        raise SystemExit(f"bundled example missing at {EXAMPLE_DIR} (build it with python -m tools.build_example)")
    return EXAMPLE_DIR


def decode_all(ad: Any) -> list[np.ndarray]:
    """Every tensor of an :class:`~adapterpack.Adapter`, decoded: module slots, then pass-through tensors."""
    from adapterpack.adapter import as_array

    return [m.array(slot) for m in ad for slot in m.tensors] + [as_array(t) for t in ad.tensors.values()]


def cast_peft(src: Path, dst: Path, dtype: str) -> Path:
    """The PEFT folder ``src`` written to ``dst`` with every float tensor cast to ``dtype`` (bf16: round to nearest even)."""
    from adapterpack.ops.convert import convert

    convert(src, dst, to="peft", dtype=dtype, force=True)
    return dst


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Put every file in the page cache the same way: drop its cached pages, then read it once.

    Why drop first: how a file's pages sit in the cache depends on how it was written (many
    small writes leave small page-cache folios, one big write or a read-back leaves large
    ones), and that alone changed the cost of faulting an mmap in by up to 2× here. Dropping
    and re-reading gives both formats' files the layout of "downloaded earlier, read from disk".
    """
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                if hasattr(os, "posix_fadvise"):
                    os.fsync(fd)  # only clean pages can be dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                while os.read(fd, 1 << 24):
                    pass
            finally:
                os.close(fd)


# --- the 'loaded' rule -------------------------------------------------------------------------------


def _bytes_view(t: Any) -> np.ndarray:
    """A flat uint8 numpy view of a numpy array or CPU torch tensor (no copy)."""
    if isinstance(t, np.ndarray):
        return t.reshape(-1).view(np.uint8)
    import torch

    return t.reshape(-1).view(torch.uint8).numpy()


def touch(tensors: Iterable[Any]) -> int:
    """Read one byte of every 4 KiB page of every tensor (and its last byte).

    This is what "loaded" means in these benchmarks, for every loader alike: each tensor's
    bytes are in this process's memory, mapped and faulted in. Loaders that copy have
    already paid for it (touching costs them little); lazy mmap loaders pay here.
    """
    total = 0
    for t in tensors:
        b = _bytes_view(t)
        if b.size:
            total += int(b[::PAGE].sum()) + int(b[-1])
    return total


# --- timing ----------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, run round-robin ``warmup + repeats`` times.

    Each round runs every function once (order rotated each round so none always goes
    first); a call's result is dropped before the next call starts and garbage collection
    is off while a call runs, so no call pays for another's cleanup.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                result = fns[n]()
                dt = time.perf_counter() - t0
            finally:
                gc.enable()
            del result
            if r >= warmup:
                times[n].append(dt)
    return times


def median(xs: Sequence[float]) -> float:
    """The median."""
    return statistics.median(xs)


# --- output ------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Facts about this machine and the library versions that shape the numbers."""
    import safetensors
    import torch
    import zstandard

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "zstandard": zstandard.__version__,
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line for a report header."""
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}; Python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']}, safetensors {m['safetensors']}, zstandard {m['zstandard']}; "
        f"1-min load average at the end: {m['loadavg_1min']}"
    )


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON."""
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
