"""Shim package standing in for kohya sd-scripts' ``library`` (see ../README.md)."""
