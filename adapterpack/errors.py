"""One error hierarchy: every refusal has its own class and a one-line message.

Callers catch :class:`AdapterpackError`; tests assert the exact subclass. The CLI prints
``adapterpack: <message>`` and exits non-zero, never a traceback.
"""

from __future__ import annotations


class AdapterpackError(Exception):
    """Base class of everything adapterpack refuses."""


# --- the file itself -------------------------------------------------------------------------


class FormatError(AdapterpackError):
    """An .apack file breaks the spec."""


class TruncatedFileError(FormatError):
    """The file ends before the preamble, index or a blob does."""


class BadMagicError(FormatError):
    """The file does not start with the .apack magic."""


class UnsupportedVersionError(FormatError):
    """The file's major version (or a must-understand flag) is unknown to this reader."""


class IndexTooLargeError(FormatError):
    """The index length in the preamble exceeds the spec's limit."""


class IndexFormatError(FormatError):
    """The index is not valid JSON or does not follow the schema."""


class DuplicateNameError(IndexFormatError):
    """Two adapters, modules, tensors or JSON keys share one name."""


class LayoutError(FormatError):
    """Blob offsets are out of range, overlapping, misaligned, or leave gaps or trailing bytes."""


class LengthMismatchError(FormatError):
    """A blob's length disagrees with its shape × itemsize, or with what its codec produced."""


class ChecksumError(FormatError):
    """A CRC-32C does not match the bytes it covers."""


class UnknownDTypeError(FormatError):
    """A dtype name is not in the spec's table."""


class UnknownCodecError(FormatError):
    """A must-understand codec id is not implemented by this reader."""


class UnknownEncodingError(FormatError):
    """A must-understand encoding id is not implemented by this reader."""


class CodecError(FormatError):
    """Stored bytes cannot be decoded: corrupt, or a zstd frame header that lies."""


class RecordError(FormatError):
    """An encoding record's params or tensors are inconsistent."""


class RankError(RecordError):
    """A record's rank is larger than (or otherwise disagrees with) what its tensor shapes allow."""


# --- other people's files and user requests ------------------------------------------------------


class InputError(AdapterpackError):
    """An input that is not an .apack (PEFT folder, kohya file, ...) cannot be read."""


class UnrecognizedInputError(InputError):
    """A path is neither an .apack, a PEFT adapter folder nor a kohya LoRA file."""


class UnsafeInputError(InputError):
    """Reading the input would need unpickling arbitrary objects."""


class ConversionError(AdapterpackError):
    """A requested conversion cannot be carried out faithfully."""


class OptionError(ConversionError):
    """Options that do not go together (``--k`` without ``--to nola``); the CLI reports it as a usage error."""


class AdapterNotFoundError(AdapterpackError):
    """A named adapter or module is not in the file."""


class OutputExistsError(ConversionError):
    """The output path already exists and overwriting was not asked for (``--force``)."""


class SizeLimitError(AdapterpackError):
    """A result that no bytes of the file back (a dense ΔW) would exceed a limit of spec §7, or a blob's decoded
    size (within §7's expansion limit) is more than this process can allocate; the file itself is valid."""


class OutputWriteError(AdapterpackError, OSError):
    """The operating system refused a write (disk full, no permission, ...); the message names the output
    (``filename``), which is left as it was. Also an OSError, with its ``errno``."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class BankError(AdapterpackError):
    """An adapter bank cannot be built, extended or read as asked."""


class BankMismatchError(BankError):
    """Adapters to bank together differ in base model, target modules, layouts or shapes."""


class ApplyError(AdapterpackError):
    """An adapter cannot be applied to (or removed from) a model: a module missing, of the wrong kind or shape."""


class GeneratorError(RecordError):
    """A record names a random-basis generator id or version this reader does not implement (nola)."""


class PluginError(AdapterpackError):
    """An installed plugin (an entry point) cannot be used: it fails to load, provides nothing, or claims a taken id."""


class MissingDependencyError(AdapterpackError):
    """A request needs an optional extra that is not installed (the message names the pip command)."""
