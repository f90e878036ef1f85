"""``python -m adapterpack`` runs the command line."""

from adapterpack.cli import main

main(prog_name="adapterpack")
