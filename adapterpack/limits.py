"""Every size limit of spec/format.md §7, in one place (the spec's table is checked against these).

A file's blobs back their own sizes with bytes (and a codec can expand its bytes at most
:data:`MAX_ZSTD_RATIO` times), but some sizes are only numbers in an index or a config: the
dense ΔW of a record (``prod(base_shape)``), the factors a ``nola`` record regenerates and the
random values it generates on the way, a regular expression's matching work, a safetensors
header's tensor count. Each of those is bounded here, so that a few bytes can never demand
gigabytes or hours. This module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

# --- the .apack container: checked when a file is opened (MUST) ------------------------------------

#: Largest index (bytes), from the preamble alone.
MAX_INDEX_LENGTH = 64 << 20
#: Largest JSON text of a compressed index as a multiple of its stored (compressed) bytes: a few KB of frame must not
#: make the reader parse megabytes of JSON (and build its objects); real indexes compress far less than this.
MAX_INDEX_RATIO = 256
#: Most blobs an index may list.
MAX_BLOBS = 1_000_000
#: Most dimensions of a blob's shape or of a base_shape.
MAX_NDIM = 8
#: Deepest nesting of JSON arrays and objects an index may have (the top-level object is depth 1).
MAX_JSON_DEPTH = 64
#: Most JSON arrays and objects an index may hold (each takes hundreds of bytes once parsed, its text 2).
MAX_JSON_CONTAINERS = 1 << 22
#: Most JSON values an index may hold, counted as its arrays, objects and commas (outside strings).
MAX_JSON_VALUES = 1 << 23
#: Longest module or tensor name, in code points.
MAX_NAME = 1024
#: Longest adapter name, in code points.
MAX_ADAPTER_NAME = 256

# --- codecs: checked before a blob is decoded (MAY; adapterpack enforces them) ----------------------

#: Largest Zstandard window.
MAX_ZSTD_WINDOW = 128 << 20
#: Largest decoded size of a compressed blob as a multiple of its stored size (Zstandard cannot expand more).
MAX_ZSTD_RATIO = 32768

#: Most bytes of decoded shared blobs (compressed blobs several records reference) a reader keeps per open
#: file so each is decoded once (spec §7's SHOULD); past it a blob is reused only while a caller holds it.
SHARED_CACHE_BYTES = 256 << 20

# --- sizes no bytes back ---------------------------------------------------------------------------

#: Most elements of a dense ΔW (``prod(base_shape)``): refused by ``delta()`` before allocating
#: (8 GiB of float32; a 128256 × 16384 embedding is 2.1e9).
MAX_DELTA_ELEMENTS = 1 << 31
#: Most elements of factors no bytes back, A and B together: a nola record's regenerated ``rank · (out + in)``
#: (checked on open; the 1.1 value, 4 GiB of float32), the rank-1 zero factors ``out + in`` a rank-0 record
#: becomes when lowered to lora.
MAX_FACTOR_ELEMENTS = 1 << 30
#: Most random values one nola record's decode may generate (``k_A · rank · in + k_B · rank · out``), checked on
#: open. NOLA's largest published use (LLaMA-2 70B, rank 16, 512 bases, the 8192 x 28672 MLP weights) needs
#: 3.0e8 per record; this leaves 3.5 times that (format 1.4 allowed 2^32).
MAX_NOLA_GENERATED = 1 << 30
#: Most random values decoding several nola records together may generate (bases shared by records counted once),
#: checked before generating: that 70B use on all seven linear weights of its 80 layers, each with its own
#: basis, needs 1.06e11; this leaves 2.6 times that.
MAX_NOLA_GENERATED_TOTAL = 1 << 38

# --- other people's files: checked before anything per tensor is built ---------------------------

#: Largest safetensors header (bytes).
MAX_SAFETENSORS_HEADER = 16 << 20
#: Most tensors a safetensors file may hold: as many as an .apack may (all-expert LoRAs of mixture-of-experts
#: models hold 72,192 and more), so adapterpack reads back the PEFT files it writes.
MAX_SAFETENSORS_TENSORS = MAX_BLOBS
#: Longest description of one tensor in a safetensors header (characters of its JSON object): parsed alone.
MAX_SAFETENSORS_DESCRIPTION = 4096
#: Most ``__metadata__`` entries of a safetensors header.
MAX_SAFETENSORS_METADATA = 4096
#: Longest safetensors tensor name (code points): a module name of :data:`MAX_NAME` plus PEFT's prefixes.
MAX_SAFETENSORS_NAME = 2 * MAX_NAME
#: Most decoder layers a base model's config.json may declare when module names are listed from it (the largest
#: published models have a few hundred).
MAX_MODEL_LAYERS = 4096

# --- PEFT rank_pattern / alpha_pattern keys -------------------------------------------------------

#: Longest pattern key (code points): an anchored, escaped module name of :data:`MAX_NAME` fits.
MAX_PATTERN_LENGTH = 4 * MAX_NAME
#: Longest module name a pattern is matched against (code points).
MAX_PATTERN_SUBJECT = MAX_NAME
#: Largest counted repetition ``{m,n}`` in a pattern key (``n`` when bounded, else ``m``).
MAX_PATTERN_REPEAT = 1000
#: Deepest nesting of parentheses in a pattern key (Python's parser, and the matcher, recurse per group).
MAX_PATTERN_DEPTH = 100
#: Most steps matching one pattern map (a config's ``rank_pattern`` or ``alpha_pattern``) against all its
#: module names may take: a step is a node evaluated (a few operations on integers of at most
#: :data:`MAX_PATTERN_SUBJECT` bits), a character of a key parsed or of a name indexed, a suffix looked up.
MAX_PATTERN_STEPS = 1_000_000
#: Largest ``adapter_config.json`` (bytes), read no further.
MAX_PEFT_CONFIG = 16 << 20
