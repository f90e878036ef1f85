"""``library.utils`` stand-in: only what ``networks/resize_lora.py`` calls."""

from __future__ import annotations

import logging


def setup_logging(*args: object, **kwargs: object) -> None:
    """Log INFO and above to stderr (the real helper adds rich formatting, not needed here)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
