"""``python -m adapterpack`` runs the command line."""

from .cli import main

main(prog_name="adapterpack")
