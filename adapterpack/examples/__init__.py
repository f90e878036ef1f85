"""Example adapters bundled with adapterpack (real PEFT folders, used by ``adapterpack demo`` and tests)."""

from __future__ import annotations

from pathlib import Path

from adapterpack.errors import AdapterNotFoundError

#: The bundled example: a LoRA (r=8, alpha=16 on q/k/v/o_proj) of SmolLM2-135M, float32.
DEFAULT_EXAMPLE = "smollm2-pydoc-lora"


def example_path(name: str = DEFAULT_EXAMPLE) -> Path:
    """The folder of the bundled example ``name`` (a PEFT adapter folder).

    Package data lives beside this module, so ``__file__`` finds it in a checkout, a wheel
    or an editable install alike.
    """
    here = Path(__file__).resolve().parent
    path = here / name
    if not (path / "adapter_config.json").is_file():
        have = sorted(p.name for p in here.iterdir() if (p / "adapter_config.json").is_file())
        raise AdapterNotFoundError(f"no bundled example {name!r} in {here} (have: {', '.join(have) or 'none'})")
    return path


__all__ = ["DEFAULT_EXAMPLE", "example_path"]
