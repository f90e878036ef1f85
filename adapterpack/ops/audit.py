"""Where adapter storage goes: ``adapterpack audit PATH...`` over folders, files and globs.

For each input (a PEFT folder, a kohya ``.safetensors`` file or an ``.apack`` file) it reports
bytes on disk, parameters, dtypes, encodings, stored ranks and the ranks keeping 95%/99% of each
module's ‖ΔW‖²_F, and the exact size of five alternatives, each a whole ``.apack`` file:

- ``zstd``, ``byteplanes``: the same tensors losslessly, with that codec at its default level
  (``adapterpack convert SRC out.apack --codec C``);
- ``bf16``: floats cast to bfloat16, the default codec (``adapterpack convert SRC out.apack --dtype bf16``);
- ``energy99``, ``energy95``: every module cut to the smallest rank keeping 99% / 95% of its
  ‖ΔW‖²_F, as ``adapterpack rerank SRC out.apack --energy 0.99`` writes it (:func:`adapterpack.ops.rerank.rerank`:
  svd records in each module's float dtype, DoRA modules kept), the default codec;
- ``compress8`` (only when asked for: it quantizes every component at every width): the file
  ``adapterpack compress SRC out.apack --budget-ratio 0.125`` writes (1/8 of the fp16 factors, whole file),
  with the exact relative Frobenius error of all ΔW stacked in ``errors``.

Nothing is sampled or estimated: every tensor is encoded with the writer's own
:func:`~adapterpack.container.writer.encode_blob` and the index is built as the writer builds it, so
each figure is the byte count of the file the writer would produce — without writing it.
Spectra are exact SVDs from the factors (:func:`adapterpack.linalg.lowrank.factors_svd`).
Inputs are independent, so ``jobs`` > 1 audits them in worker processes.
"""

from __future__ import annotations

import functools
import glob
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack.adapter import Adapter, Module, as_array, tensor_info
from adapterpack.codecs import DEFAULT_CODEC
from adapterpack.container.writer import encode_blob, plan_apack
from adapterpack.encodings.lower import as_svd, main_dtype
from adapterpack.errors import AdapterpackError
from adapterpack.formats import open_adapters
from adapterpack.formats.safetensors_header import safetensors_keys
from adapterpack.linalg.cast import cast_adapter
from adapterpack.linalg.finite import check_adapter
from adapterpack.ops.report import footprint
from adapterpack.ops.rerank import RerankPolicy, rerank
from adapterpack.ops.spectrum import distribution, module_spectrum

#: The alternatives measured by default, in table order.
VARIANTS = ("zstd", "byteplanes", "bf16", "energy99", "energy95")
#: Alternatives measured only when asked for (slower): ``compress8``, ``adapterpack compress --budget-ratio 0.125``.
EXTRA_VARIANTS = ("compress8",)
KNOWN_VARIANTS = VARIANTS + EXTRA_VARIANTS
#: ``compress8``'s budget, as a fraction of the fp16 factor bytes.
COMPRESS_RATIO = 1 / 8
#: Energy fraction of each rerank variant.
ENERGY_VARIANTS = {"energy99": 0.99, "energy95": 0.95}
GLOB_CHARS = frozenset("*?[")


# --- the exact size of an .apack file, without writing it ------------------------------------------


#: ``(id(array), codec, level)`` → (the array, (stored length, codec object, crc32c)); holding the
#: array keeps its id from being reused by another array while the memo lives.
BlobMemo = dict[tuple[int, str, "int | None"], tuple[np.ndarray, tuple[int, dict[str, Any], int]]]


def apack_size(
    adapters: list[Adapter],
    codec: str = DEFAULT_CODEC,
    level: int | None = None,
    *,
    validate: bool = True,
    memo: BlobMemo | None = None,
) -> int:
    """Bytes :func:`~adapterpack.container.writer.write_apack` would write for ``adapters``.

    Encodes every tensor with the writer's ``encode_blob`` (raw wherever the codec does not pay)
    and plans the file with the writer's own :func:`~adapterpack.container.writer.plan_apack`.
    ``validate`` False skips the records' validation (for records already validated); ``memo``
    reuses the encoding of an array seen before with the same codec and level.
    """
    def encode(arr: np.ndarray) -> tuple[int, dict[str, Any], int]:
        key = (id(arr), codec, level)
        seen = memo.get(key) if memo is not None else None
        if seen is not None and seen[0] is arr:
            return seen[1]
        data, cfg, crc = encode_blob(arr, codec, level)
        hit = (len(data), cfg, crc)
        if memo is not None:
            memo[key] = (arr, hit)
        return hit

    return plan_apack(adapters, encode, validate=validate).file_size


# --- variants of one adapter ----------------------------------------------------------------------


def _with(adapter: Adapter, modules: dict[str, Module], tensors: dict[str, Any]) -> Adapter:
    return adapter.derived(modules, tensors)


def loaded(adapter: Adapter) -> Adapter:
    """``adapter`` with every tensor decoded once into memory (the variants all read them)."""
    modules = {
        n: Module(
            m.name,
            m.encoding,
            tuple(m.base_shape),
            dict(m.params),
            {s: as_array(t) for s, t in m.tensors.items()},
            m.must_understand,
        )
        for n, m in adapter.modules.items()
    }
    return _with(adapter, modules, {k: as_array(t) for k, t in adapter.tensors.items()})


def _current_rank(m: Module) -> int:
    return int(m.summary().get("rank", 0) or 0)


def _is_dora(m: Module) -> bool:
    return m.encoding == "lora" and bool(m.params.get("dora", False))


def presolved(adapter: Adapter) -> tuple[Adapter, str | None]:
    """``adapter`` with its lora records replaced by float64 ``svd`` records of their exact SVD, and the
    float dtype rerank must write; ``(adapter, None)`` when the modules' dtypes differ.

    rerank reads an svd record's spectrum instead of computing one, so each module's SVD is
    computed once here and serves every energy level; with float64 vectors (and S) nothing is
    rounded, so the re-ranked records are the bytes rerank writes from the original adapter.
    """
    kinds = {main_dtype(m) for m in adapter}
    if len(kinds) != 1:
        return adapter, None
    modules = {n: as_svd(m, dtype="float64") if m.encoding == "lora" and not _is_dora(m) else m for n, m in adapter.modules.items()}
    return _with(adapter, modules, adapter.tensors), kinds.pop()


def reranked(adapter: Adapter, energy: float, dtype: str | None = None) -> tuple[Adapter, list[int]]:
    """``adapter`` as ``adapterpack rerank --energy`` writes it (svd records in each module's dtype, or
    ``dtype``), and every module's new rank (DoRA modules keep theirs: their SVD needs the base weight)."""
    if all(_is_dora(m) for m in adapter):
        return adapter, [_current_rank(m) for m in adapter]  # nothing rerank may touch (it refuses)
    out, report = rerank(adapter, RerankPolicy(energy=energy, dtype=dtype))
    new = {p.name: p.new_rank for p in report.modules}
    return out, [new[n] for n in adapter.modules]


@dataclass
class InputAudit:
    """The audit of one input path (all adapters in it)."""

    path: str
    format: str | None = None
    error: str | None = None
    error_type: str | None = None
    adapters: list[str] = field(default_factory=list)
    bytes: int = 0
    parameters: int = 0
    modules: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    encodings: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    #: relative Frobenius error of all ΔW stacked, per lossy alternative that reports one (compress8)
    errors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: per-module stored ranks and energy ranks (for distributions over many inputs)
    ranks: list[int] = field(default_factory=list)
    energy_ranks: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the input could be audited."""
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: rank lists reduced to min/median/max, savings beside sizes."""
        d: dict[str, Any] = {"path": self.path, "ok": self.ok, "format": self.format}
        if not self.ok:
            return d | {"error": self.error, "error_type": self.error_type}
        d |= {
            "adapters": self.adapters,
            "bytes": self.bytes,
            "parameters": self.parameters,
            "modules": self.modules,
            "dtype": "/".join(self.dtypes),
            "encoding": "/".join(self.encodings),
            "rank": distribution(self.ranks),
            "rank_99": distribution(self.energy_ranks.get("energy99", [])),
            "rank_95": distribution(self.energy_ranks.get("energy95", [])),
            "sizes": dict(self.sizes),
            "saved": {k: self.bytes - v for k, v in self.sizes.items()},
            "errors": dict(self.errors),
            "notes": self.notes,
            "seconds": self.seconds,
        }
        return d


def _one_line(e: Exception) -> str:
    """An error as one line: ``path: reason`` for an OSError, the message otherwise."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split())


def _energy_ranks(adapters: list[Adapter]) -> dict[str, list[int]]:
    """Each module's rank for every energy level, from its spectrum alone (when no re-rank is measured)."""
    out: dict[str, list[int]] = {v: [] for v in ENERGY_VARIANTS}
    for a in adapters:
        for m in a:
            sp = None if _is_dora(m) else module_spectrum(m)
            for v, frac in ENERGY_VARIANTS.items():
                out[v].append(_current_rank(m) if sp is None else sp.rank_for_energy(frac))
    return out


def audit_input(
    path: str | os.PathLike[str], measure: Sequence[str] = VARIANTS, base: str | os.PathLike[str] | None = None
) -> InputAudit:
    """Audit one input, sizing the alternatives in ``measure`` (default all of :data:`VARIANTS`);
    a file that cannot be read comes back with ``error`` set (one line), not raised. ``base``: for GGUF
    inputs, the base model's GGUF file or config.json (llama.cpp's q/k row order)."""
    start = time.perf_counter()
    res = InputAudit(path=str(path))
    try:
        with open_adapters(path, verify=True, base=base) as opened:  # only a GGUF input reads base
            res.format = opened.format
            res.bytes = footprint(path)
            adapters = [loaded(a) for a in opened.adapters]
        _describe(res, adapters)
        for a in adapters:
            for m in a:
                m.implementation.validate(m)  # once; the sizes below skip it
            check_adapter(a)  # the spectra below need finite factors of a size binary64 holds
        memo: BlobMemo = {}
        if "zstd" in measure:
            res.sizes["zstd"] = apack_size(adapters, "zstd", validate=False)
        if "byteplanes" in measure:
            res.sizes["byteplanes"] = apack_size(adapters, "byteplanes", validate=False, memo=memo)
        if "bf16" in measure:
            res.sizes["bf16"] = apack_size([cast_adapter(a, "bf16")[0] for a in adapters], DEFAULT_CODEC, validate=False)
        if any(v in measure for v in ENERGY_VARIANTS):
            solved = [presolved(a) for a in adapters]
            for v, frac in ENERGY_VARIANTS.items():
                pairs = [reranked(a, frac, dtype) for a, dtype in solved]
                res.energy_ranks[v] = [k for _, ks in pairs for k in ks]
                if v in measure:
                    res.sizes[v] = apack_size([p[0] for p in pairs], DEFAULT_CODEC, validate=False, memo=memo)
        else:
            res.energy_ranks = _energy_ranks(adapters)
        if "compress8" in measure:
            _compress8(res, adapters)
        dora = sum(_is_dora(m) for a in adapters for m in a)
        if dora:
            res.notes.append(f"{dora} DoRA module(s) kept at their rank by the energy variants (their SVD needs the base weight)")
    except (AdapterpackError, OSError) as e:
        res.error = _one_line(e).removeprefix(f"{path}: ")  # the row names the path already
        res.error_type = type(e).__name__
    res.seconds = time.perf_counter() - start
    return res


def _compress8(res: InputAudit, adapters: list[Adapter]) -> None:
    """Size and error of ``adapterpack compress --budget-ratio 0.125`` (one file per adapter); a budget
    below the smallest such file saves nothing and says so."""
    from adapterpack.ops.compress import compress  # qsvd tables: only when asked for

    size, energy, err2 = 0, 0.0, 0.0
    try:
        for a in adapters:
            _, rep = compress(a, budget_ratio=COMPRESS_RATIO)
            size += rep.file_bytes
            for m in rep.modules:
                energy += m.energy
                err2 += m.energy * m.rel_error**2
    except AdapterpackError as e:
        res.sizes["compress8"] = res.bytes
        res.notes.append(f"compress8: {_one_line(e)}")
        return
    res.sizes["compress8"] = size
    res.errors["compress8"] = float(np.sqrt(err2 / energy)) if energy else 0.0
    if len(adapters) > 1:
        res.notes.append("compress8: one file per adapter, sizes summed")


def _describe(res: InputAudit, adapters: list[Adapter]) -> None:
    dts: Counter[str] = Counter()
    encs: Counter[str] = Counter()
    for a in adapters:
        res.adapters.append(a.name)
        res.parameters += a.num_params
        res.modules += len(a.modules)
        for m in a:
            encs[m.encoding + ("+dora" if m.encoding == "lora" and m.params.get("dora") else "")] += 1
            res.ranks.append(_current_rank(m))
            for t in m.tensors.values():
                dts[tensor_info(t)[0]] += 1
        for t in a.tensors.values():
            dts[tensor_info(t)[0]] += 1
    res.dtypes = dict(dts.most_common())
    res.encodings = dict(encs.most_common())


# --- finding inputs ---------------------------------------------------------------------------------


@dataclass
class Found:
    """Inputs found under the paths asked for, paths that matched nothing, and files passed over."""

    inputs: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _lora_kind(path: Path) -> str | None:
    """For a ``.safetensors`` met while walking: ``"kohya"``, ``"peft-weights"``, ``"other"``, or None when unreadable."""
    try:
        keys = safetensors_keys(path)
    except (AdapterpackError, OSError):
        return None
    if any(".lora_down" in k or ".lora_up" in k for k in keys):
        return "kohya"
    if any(".lora_A" in k or "lora_embedding_A" in k for k in keys):
        return "peft-weights"
    return "other"


def _walk(root: Path, found: Found, seen: set[Path]) -> None:
    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.inputs.append(p)

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        peft = "adapter_config.json" in filenames
        if peft:
            add(here)
        for name in sorted(filenames):
            p = here / name
            if name.endswith(".apack"):
                add(p)
            elif name.endswith(".safetensors") and not peft:
                kind = _lora_kind(p)
                if kind in ("kohya", None):  # unreadable ones are audited, so they are reported as failures
                    add(p)
                elif kind == "peft-weights":
                    found.skipped.append((str(p), "PEFT weights without adapter_config.json beside them"))
                else:
                    found.skipped.append((str(p), "safetensors file with no LoRA tensors"))


def find_inputs(paths: Iterable[str | os.PathLike[str]]) -> Found:
    """Expand ``paths`` into adapter inputs, in order, each once.

    A path with ``*``, ``?`` or ``[`` that does not exist as written is a glob (``**`` recurses).
    A folder is walked: every folder holding ``adapter_config.json`` is a PEFT input (its own
    safetensors are its weights, not kohya files), every ``*.apack`` an input, every other
    ``*.safetensors`` with kohya keys an input (unreadable ones too, so they are reported);
    safetensors without LoRA tensors are listed as skipped. A file named directly is always an input.
    """
    found, seen = Found(), set()
    for raw in paths:
        text = os.fspath(raw)
        if not os.path.lexists(text) and GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                found.missing.append((text, "no file or folder matches this pattern"))
            targets = [Path(m) for m in matches]
        elif not os.path.lexists(text):
            found.missing.append((text, "no such file or folder"))
            targets = []
        else:
            targets = [Path(text)]
        for p in targets:
            if p.is_dir():
                _walk(p, found, seen)
            elif p.resolve() not in seen:
                seen.add(p.resolve())
                found.inputs.append(p)
    return found


# --- many inputs ------------------------------------------------------------------------------------


def _results(
    inputs: list[Path], jobs: int, measure: tuple[str, ...], base: str | os.PathLike[str] | None = None
) -> Iterator[InputAudit]:
    one = functools.partial(audit_input, measure=measure, base=base)
    if jobs <= 1 or len(inputs) <= 1:
        yield from map(one, inputs)
        return
    # forkserver: workers fork from a clean server process, not from a caller that may hold threads (torch, BLAS)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=min(jobs, len(inputs)), mp_context=multiprocessing.get_context(method)) as pool:
        yield from pool.map(one, inputs, chunksize=max(1, min(16, len(inputs) // (4 * jobs))))


def default_jobs() -> int:
    """Worker processes when none are asked for: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover  (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def audit_paths(
    paths: Iterable[str | os.PathLike[str]] | Found,
    *,
    jobs: int = 1,
    measure: Sequence[str] = VARIANTS,
    progress: Callable[[int], Any] | None = None,
    base: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Audit every input under ``paths`` (or already :func:`find_inputs`' result):
    ``{"inputs": [...], "missing", "skipped", "totals", "measured"}``.

    ``measure`` picks the alternatives to size (names from :data:`VARIANTS`; fewer is faster);
    the energy ranks are reported whatever it holds.
    ``base``: for GGUF inputs, the base model's GGUF file or config.json (see :func:`audit_input`).
    ``progress(n)`` is called with 1 after each input. Unreadable inputs are rows with ``ok``
    false and an ``error``; paths matching nothing are listed in ``missing``.
    """
    found = paths if isinstance(paths, Found) else find_inputs(paths)
    unknown = [v for v in measure if v not in KNOWN_VARIANTS]
    if unknown:
        raise AdapterpackError(f"cannot measure {', '.join(unknown)} (known: {', '.join(KNOWN_VARIANTS)})")
    measured = tuple(v for v in KNOWN_VARIANTS if v in measure)
    rows: list[InputAudit] = []
    for res in _results(found.inputs, jobs, measured, base):
        rows.append(res)
        if progress is not None:
            progress(1)
    return {
        "inputs": [r.as_dict() for r in rows],
        "missing": [{"path": p, "error": why, "error_type": "InputError"} for p, why in found.missing],
        "skipped": [{"path": p, "reason": why} for p, why in found.skipped],
        "totals": totals(rows, len(found.missing), measured),
        "measured": list(measured),
    }


def totals(rows: list[InputAudit], missing: int = 0, measured: Sequence[str] = VARIANTS) -> dict[str, Any]:
    """Sums over the inputs that could be read, and rank distributions over all their modules."""
    good = [r for r in rows if r.ok]
    size = sum(r.bytes for r in good)
    sizes = {v: sum(r.sizes[v] for r in good) for v in measured}
    dts: Counter[str] = Counter()
    encs: Counter[str] = Counter()
    for r in good:
        dts.update(r.dtypes)
        encs.update(r.encodings)
    return {
        "inputs": len(rows),
        "failed": len(rows) - len(good),
        "missing": missing,
        "adapters": sum(len(r.adapters) for r in good),
        "modules": sum(r.modules for r in good),
        "bytes": size,
        "parameters": sum(r.parameters for r in good),
        "dtypes": dict(dts.most_common()),
        "encodings": dict(encs.most_common()),
        "rank": distribution(x for r in good for x in r.ranks),
        "rank_99": distribution(x for r in good for x in r.energy_ranks.get("energy99", [])),
        "rank_95": distribution(x for r in good for x in r.energy_ranks.get("energy95", [])),
        "sizes": sizes,
        "saved": {v: size - s for v, s in sizes.items()},
        "seconds": sum(r.seconds for r in rows),
    }
