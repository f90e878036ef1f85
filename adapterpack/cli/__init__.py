"""The ``adapterpack`` command line: each command wires library functions, this module groups them.

Errors print ``adapterpack: <message>`` on stderr: exit status 1 for adapterpack and file-system
errors, 2 for usage errors (click's own). Nothing here imports torch.
"""

from __future__ import annotations

import click

from adapterpack.cli.audit_cmd import audit
from adapterpack.cli.bank_cmd import bank
from adapterpack.cli.check_cmd import check
from adapterpack.cli.convert_cmd import convert
from adapterpack.cli.demo_cmd import demo
from adapterpack.cli.importance_cmd import importance
from adapterpack.cli.inspect_cmd import inspect
from adapterpack.cli.output import AdapterpackGroup
from adapterpack.cli.process import keep_freed_memory
from adapterpack.cli.rerank_cmd import rerank
from adapterpack.cli.verify_cmd import verify
from adapterpack.version import __version__


@click.group(cls=AdapterpackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapterpack")
def main() -> None:
    """Store LoRA adapters compactly and safely (.apack), inspect, verify and convert them."""
    keep_freed_memory()  # a one-shot process: freed work buffers are better reused than unmapped


for _command in (inspect, convert, rerank, importance, verify, demo, check, audit, bank):
    main.add_command(_command)

__all__ = ["main"]
