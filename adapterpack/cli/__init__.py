"""The ``adapterpack`` command line: each command wires library functions, this module groups them.

Errors print ``adapterpack: <message>`` on stderr: exit status 1 for adapterpack and file-system
errors, 2 for usage errors (click's own). Nothing here imports torch.

Commands load lazily: :data:`COMMANDS` names the module of each and its one-line help, so
``adapterpack --help`` imports none of them and ``adapterpack inspect`` only ``inspect``'s
(``tests/test_cli_lazy.py`` checks the help lines against the commands').
"""

from __future__ import annotations

import importlib

import click

from adapterpack.cli.output import AdapterpackGroup
from adapterpack.cli.process import keep_freed_memory
from adapterpack.version import __version__

#: Command name → ("module:attribute" of its click command, its short help as ``--help`` lists it).
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("adapterpack.cli.inspect_cmd:inspect", "Per-module table and totals of an adapter."),
    "convert": ("adapterpack.cli.convert_cmd:convert", "Convert between .apack, PEFT, kohya, diffusers and gguf."),
    "rerank": ("adapterpack.cli.rerank_cmd:rerank", "Re-rank an adapter without retraining (exact SVD)."),
    "compress": (
        "adapterpack.cli.compress_cmd:compress",
        "Choose rank and bits per component under one whole-file byte budget.",
    ),
    "importance": (
        "adapterpack.cli.importance_cmd:importance",
        "Measure each singular component's Fisher information (for rerank --importance).",
    ),
    "verify": ("adapterpack.cli.verify_cmd:verify", "Check every checksum of an .apack file."),
    "demo": ("adapterpack.cli.demo_cmd:demo", "Round-trip the bundled example, checking each step."),
    "check": ("adapterpack.cli.check_cmd:check", "List what vLLM, PEFT, llama.cpp or kohya would refuse or misread."),
    "audit": ("adapterpack.cli.audit_cmd:audit", "Bytes, ranks and possible savings of many adapters."),
    "bank": ("adapterpack.cli.bank_cmd:bank", "Many adapters in one file on shared bases."),
}


class LazyGroup(AdapterpackGroup):
    """A group whose commands are imported on first use from :data:`COMMANDS`; its help lists them from the table."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attr = COMMANDS[cmd_name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in self.commands or name not in COMMANDS:  # loaded already, or added by hand
                cmd = self.commands[name]
                if not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit)))
            else:
                rows.append((name, COMMANDS[name][1]))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapterpack")
def main() -> None:
    """Store LoRA adapters compactly and safely (.apack), inspect, verify and convert them."""
    keep_freed_memory()  # a one-shot process: freed work buffers are better reused than unmapped


__all__ = ["COMMANDS", "main"]
