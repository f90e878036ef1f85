"""The package version (ground floor: the writer records it in every file's index)."""

__version__ = "0.1.0"
