"""Writing adapters in any format: the one entry point each way is :func:`~adapterpack.formats.open_adapters`
(read, any format detected) and :func:`write_adapters` here (write, the format named or implied by the
destination's name). Every writer is atomic (:mod:`adapterpack.atomic`).

Words: a *format* is a file layout (``apack``, ``peft``, ``kohya``, ``diffusers``, ``gguf``); a *serving
stack* (``vllm``) is a consumer a PEFT export can be shaped for (``serve_for``; the CLI's ``--target``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapterpack.adapter import Adapter
from adapterpack.codecs import DEFAULT_CODEC
from adapterpack.container.writer import write_apack
from adapterpack.errors import ConversionError, OptionError
from adapterpack.formats import source as src_
from adapterpack.formats.diffusers import write_diffusers
from adapterpack.formats.gguf import write_gguf
from adapterpack.formats.kohya import write_kohya
from adapterpack.formats.llm_names import base_modules, is_kohya_name, resolve_kohya_names
from adapterpack.formats.peft import export_notes, write_peft
from adapterpack.formats.serving import write_vllm

#: File formats adapterpack writes.
FORMATS = ("apack", "peft", "kohya", "diffusers", "gguf")
#: Formats written as one .safetensors file (the suffix alone cannot tell them apart).
SAFETENSORS_FORMATS = ("kohya", "diffusers")
#: Serving stacks a PEFT export can be shaped for (``serve_for``).
SERVING_STACKS = ("vllm",)

#: ``progress(total_bytes)`` → context manager yielding ``advance(nbytes)`` (the CLI's progress bar).
ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], None]]]


def infer_format(dst: str | os.PathLike[str]) -> str:
    """Output format from the destination's name: .apack → apack, pytorch_lora_weights.safetensors (diffusers'
    file name) → diffusers, other .safetensors → kohya, .gguf → gguf, else a PEFT folder."""
    if Path(dst).name.lower() == "pytorch_lora_weights.safetensors":
        return "diffusers"
    suffix = Path(dst).suffix.lower()
    return {".apack": "apack", ".safetensors": "kohya", ".gguf": "gguf"}.get(suffix, "peft")


#: Output formats whose writer uses ``--base`` (module names, llama.cpp's layout, diffusers names).
BASE_FORMATS = ("peft", "gguf", "diffusers")


def check_write_options(
    fmt: str,
    dst: str | os.PathLike[str],
    *,
    drop_tensors: bool = False,
    serve_for: str | None = None,
    component: str | None = None,
    base: str | os.PathLike[str] | None = None,
    src: str | os.PathLike[str] | None = None,
) -> None:
    """The rules on which write options go with which format, stated once (OptionError naming the option
    as the CLI spells it; the CLI reports it as a usage error). ``src``: the input, when known (a .gguf input
    takes ``base`` for reading, whatever the output)."""
    if fmt not in FORMATS:
        raise OptionError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    if component is not None and fmt != "diffusers":
        raise OptionError("--component applies to diffusers output only")
    gguf_input = src is not None and Path(src).suffix.lower() == ".gguf"
    if base is not None and fmt not in BASE_FORMATS and not gguf_input:
        raise OptionError(
            f"--base applies to PEFT, gguf and diffusers output (module names, llama.cpp's layout) and to .gguf input, not {fmt}"
        )
    if fmt == "apack" and drop_tensors:
        raise OptionError("--drop-tensors applies to PEFT and kohya output only; .apack keeps every tensor")
    if serve_for is not None and (fmt != "peft" or serve_for not in SERVING_STACKS):
        raise OptionError(f"--target {serve_for} shapes PEFT output only (and must be one of {', '.join(SERVING_STACKS)})")
    if fmt == "diffusers" and Path(dst).suffix.lower() != ".safetensors":
        raise OptionError(f"diffusers output is one .safetensors file (e.g. pytorch_lora_weights.safetensors), not {dst}")


def llm_module_names(adapter: Adapter, base: str | os.PathLike[str] | None) -> tuple[Adapter, list[str]]:
    """``adapter`` with kohya-named modules renamed to module names (:mod:`.llm_names`) for PEFT / gguf output:
    from ``base`` (a model folder, .safetensors file or config.json; a .gguf base gives no names) or the module
    grammar; refused (ConversionError) when a name resolves to none or several."""
    if not any(is_kohya_name(n) for n in adapter.modules):
        return adapter, []
    modules = None if base is None or Path(base).suffix.lower() == ".gguf" else base_modules(base)
    return resolve_kohya_names(adapter, modules)


@dataclass(frozen=True)
class WriteOptions:
    """The output options every command that writes an adapter takes (the CLI's one option decorator,
    ``adapterpack.cli.write_options``): ``to`` (None: from the destination's name), ``codec`` / ``level``
    (.apack), ``drop_tensors``, ``serve_for`` + ``max_lora_rank`` (PEFT shaped for vLLM), ``base`` (gguf: the
    base model's GGUF or config.json; diffusers: its pipeline folder), ``component`` (diffusers), ``force``."""

    to: str | None = None
    codec: str | None = None
    level: int | None = None
    drop_tensors: bool = False
    serve_for: str | None = None
    max_lora_rank: int | None = None
    base: str | os.PathLike[str] | None = None
    component: str | None = None
    force: bool = False

    def writer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments :func:`write_adapters` takes from these options (``overwrite`` = ``force``)."""
        d = asdict(self)
        d.pop("to")
        d["overwrite"] = d.pop("force")
        return d


@contextlib.contextmanager
def _no_progress(total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def write_adapters(
    adapters: list[Adapter],
    dst: Path,
    fmt: str,
    *,
    codec: str | None = None,
    level: int | None = None,
    progress: ProgressFactory | None = None,
    drop_tensors: bool = False,
    serve_for: str | None = None,
    max_lora_rank: int | None = None,
    base: str | os.PathLike[str] | None = None,
    component: str | None = None,
    overwrite: bool = True,
) -> list[str]:
    """Write ``adapters`` to ``dst`` as ``fmt`` (PEFT, kohya and gguf hold exactly one adapter); the
    exporter's notes. ``drop_tensors`` leaves out pass-through tensors that PEFT / kohya / gguf output
    cannot carry (refused otherwise). ``serve_for="vllm"`` (PEFT output) keeps every rank and bakes
    every module's scale into B (:func:`adapterpack.formats.serving.write_vllm`, ``max_lora_rank``);
    ``base`` (gguf output) is the base model's GGUF file or config.json, for llama.cpp's q/k layout, and
    (diffusers output) the pipeline folder whose module names resolve kohya names; ``component``
    (diffusers output) puts modules that name no diffusers component under that one (e.g. ``transformer``).
    ``overwrite`` false creates ``dst`` without replacing anything (OutputExistsError if another writer was
    first); every writer goes through :mod:`adapterpack.atomic`, which also creates missing parent folders."""
    check_write_options(fmt, dst, drop_tensors=drop_tensors, serve_for=serve_for, component=component, base=base)
    if fmt != "apack" and len(adapters) != 1:
        names = ", ".join(a.name for a in adapters)
        raise ConversionError(f"{fmt} holds one adapter, the input has {len(adapters)} ({names}); pick one with --adapter")
    if fmt == "apack":
        total = sum(a.decoded_bytes for a in adapters)
        with (progress or _no_progress)(total) as advance:
            write_apack(dst, adapters, codec=codec or DEFAULT_CODEC, level=level, progress=advance, overwrite=overwrite)
        return []
    if fmt != "peft" or serve_for is not None:  # PEFT replays a base-rewriting init; no other reader does
        src_.refuse_base_init(adapters[0], "vLLM" if serve_for == "vllm" else f"a {fmt} file")
    if fmt == "gguf":
        adapter, named = llm_module_names(adapters[0], base)
        return named + write_gguf(adapter, dst, base=base, drop_tensors=drop_tensors, overwrite=overwrite).notes()
    if fmt == "peft":
        adapter, named = llm_module_names(adapters[0], base)
        if serve_for == "vllm":
            plan = write_vllm(adapter, dst, max_lora_rank=max_lora_rank, drop_tensors=drop_tensors, overwrite=overwrite)
            return named + plan.notes()
        notes = export_notes(adapter)
        write_peft(adapter, dst, drop_tensors=drop_tensors, overwrite=overwrite)
        return named + notes
    if fmt in ("kohya", "diffusers"):
        src_.refuse_alora(adapters[0], f"a {fmt} file")
    if fmt == "diffusers":
        return write_diffusers(adapters[0], dst, base=base, component=component, drop_tensors=drop_tensors, overwrite=overwrite)
    write_kohya(adapters[0], dst, drop_tensors=drop_tensors, overwrite=overwrite)
    return []
