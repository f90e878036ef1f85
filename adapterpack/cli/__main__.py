"""``python -m adapterpack.cli``."""

from . import main

main(prog_name="adapterpack")
