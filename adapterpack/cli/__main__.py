"""``python -m adapterpack.cli``."""

from adapterpack.cli import main

main(prog_name="adapterpack")
