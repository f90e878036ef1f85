"""The output options of every command that writes an adapter, declared once (issue 16 item 3).

``@write_options(formats)`` adds ``--to``, ``--codec``, ``--level``, ``--drop-tensors``, ``--target``,
``--max-lora-rank``, ``--base``, ``--component`` and ``--force`` to a click command and hands the command
one :class:`~adapterpack.formats.write.WriteOptions` as its ``opts`` argument; ``convert``, ``rerank`` and
``bank extract`` use it, so an option one of them needs (rerank ``--to gguf --base``) exists for all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from adapterpack.codecs import DEFAULT_CODEC, codec_ids
from adapterpack.formats.write import SERVING_STACKS, WriteOptions

#: The parameter names the decorator adds (each also a WriteOptions field).
NAMES = ("to", "codec", "level", "drop_tensors", "serve_for", "max_lora_rank", "base", "component", "force")


def write_options(formats: Sequence[str], *, to_help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command with the shared output options; ``formats`` are ``--to``'s choices."""
    options = [
        click.option(
            "--to",
            "to",
            type=click.Choice(list(formats)),
            help=to_help
            or "Output format (default: from DST: .apack, pytorch_lora_weights.safetensors = diffusers, other .safetensors = "
            "kohya, .gguf, else a PEFT folder).",
        ),
        click.option(
            "--codec",
            type=click.Choice(codec_ids()),
            help=f"Blob codec for .apack output (default {DEFAULT_CODEC}; raw for mmap loading).",
        ),
        click.option(
            "--level",
            type=click.IntRange(1, 22),
            help="Compression level: zstd, byteplanes 1–22 (default 3, 1); pco 1–12 (default 8).",
        ),
        click.option(
            "--drop-tensors",
            is_flag=True,
            help="PEFT/kohya/gguf output: leave out pass-through tensors (e.g. PEFT modules_to_save) the format cannot carry.",
        ),
        click.option(
            "--target",
            "serve_for",
            type=click.Choice(list(SERVING_STACKS)),
            help="PEFT output shaped for a serving stack: vllm = per-module scales baked into B (vLLM reads one alpha / r).",
        ),
        click.option(
            "--max-lora-rank",
            type=click.IntRange(1),
            help="--target vllm: the server's --max-lora-rank (higher ranks are re-ranked down).",
        ),
        click.option(
            "--base",
            type=click.Path(exists=True, path_type=Path),
            help="gguf input/output: the base model's GGUF file or config.json (llama.cpp's q/k row order); diffusers output: "
            "its pipeline "
            "folder (exact kohya names).",
        ),
        click.option(
            "--component",
            help="diffusers output: the pipeline component (unet, transformer, ...) for modules whose names carry none.",
        ),
        click.option("--force", is_flag=True, help="Overwrite DST if it exists (a PEFT folder keeps its other files)."),
    ]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def run(*args: Any, **kwargs: Any) -> Any:
            opts = WriteOptions(**{n: kwargs.pop(n) for n in NAMES})
            return f(*args, opts=opts, **kwargs)

        for opt in reversed(options):
            run = opt(run)
        return run

    return decorate
