"""JSON Schemas (draft 2020-12) of every command's ``--json`` output: the house vocabulary, written down.

One vocabulary for every command (README "JSON output"):

- keys are snake_case; every document has ``ok`` (bool);
- ``path`` is the one file a command reads (inspect, verify, check, audit rows, bank list); ``src`` /
  ``dst`` are the input and output of a command that writes (convert, rerank, merge, importance, bank
  build/add/refit/extract); ``diff`` reads two: ``a`` and ``b``;
- ``modules`` is always a list of objects, each with ``name`` (a count is ``module_count``);
- ``total`` (never totals) holds the sums; ``notes`` is a list of strings; ``findings`` is a list of
  ``{"severity", "code", "message", "module"?}`` (never problems);
- an error is ``{"ok": false, "error": {"type": <adapterpack error class>, "message": str}}``, on stdout
  with the usual exit status (1, or 2 for usage errors).

Documents may carry more keys than a schema lists (commands grow); the keys listed keep their meaning.
``schema(command)`` gives the schema of one command (``"bank build"`` for subcommands); ``ERROR`` the
error document every command prints with ``--json`` when it fails.
"""

from __future__ import annotations

import copy
from typing import Any

SNAKE = r"^[a-z][a-z0-9_]*$"
DIALECT = "https://json-schema.org/draft/2020-12/schema"

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_NUM = {"type": ["number", "string", "null"]}  # non-finite numbers are printed as "inf" / "-inf" / null
_NULLABLE_STR = {"type": ["string", "null"]}

DEFS: dict[str, Any] = {
    "notes": {"type": "array", "items": _STR},
    "named": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": _STR},
        "propertyNames": {"pattern": SNAKE},
    },
    "modules": {"type": "array", "items": {"$ref": "#/$defs/named"}},
    "finding": {
        "type": "object",
        "required": ["severity", "code", "message"],
        "properties": {
            "severity": {"enum": ["error", "warning", "refuse", "misread", "note"]},
            "code": {"type": "string", "pattern": SNAKE},
            "message": _STR,
            "module": _STR,
            "modules": {"$ref": "#/$defs/modules"},
            "fix": _STR,
        },
        "propertyNames": {"pattern": SNAKE},
    },
    "findings": {"type": "array", "items": {"$ref": "#/$defs/finding"}},
    "error": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {"type": {"type": "string", "pattern": r"^[A-Z][A-Za-z]*$"}, "message": _STR},
        "additionalProperties": False,
    },
    "distribution": {
        "type": ["object", "null"],
        "required": ["min", "median", "max"],
        "properties": {"min": {"type": "number"}, "median": {"type": "number"}, "max": {"type": "number"}},
    },
    "int_map": {"type": "object", "additionalProperties": _INT},
}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object with these required and optional properties, snake_case keys, more keys allowed."""
    props = {**required, **(optional or {})}
    return {"type": "object", "required": list(required), "properties": props, "propertyNames": {"pattern": SNAKE}}


def _doc(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """A top-level success document: ``ok`` plus these properties; the old keys are refused."""
    d = _obj({"ok": _BOOL, **required}, optional)
    d["not"] = {"anyOf": [{"required": [k]} for k in ("totals", "problems", "export_notes", "rows")]}
    return d


_REF = {name: {"$ref": f"#/$defs/{name}"} for name in DEFS}

_TOTAL = _obj(
    {"module_count": _INT, "parameters": _INT, "decoded_bytes": _INT, "stored_bytes": _INT},
    {"tensors": _INT, "compression_ratio": _NUM},
)

_INSPECT_MODULE = _obj(
    {"name": _STR, "kind": {"enum": ["module", "tensor"]}, "dtype": _STR, "stored_bytes": _INT, "decoded_bytes": _INT},
    {"encoding": _NULLABLE_STR, "rank": {"type": ["integer", "null"]}, "base_shape": {"type": ["array", "null"]}},
)

_SPECTRUM_MODULE = _obj(
    {"name": _STR, "rank": _INT, "numerical_rank": _INT, "singular_values": {"type": "array", "items": {"type": "number"}}},
    {"rank_90": _INT, "rank_95": _INT, "rank_99": _INT, "energy_curve": {"type": "array"}},
)

_INSPECT_ADAPTER = _obj(
    {
        "name": _STR,
        "modules": {"type": "array", "items": _INSPECT_MODULE},
        "total": _TOTAL,
        "notes": _REF["notes"],
        "skipped": _REF["notes"],
    },
    {
        "base_model": _NULLABLE_STR,
        "source_format": _NULLABLE_STR,
        "spectrum": _obj({"modules": {"type": "array", "items": _SPECTRUM_MODULE}, "summary": {"type": "object"}}),
    },
)

_FIT = _obj(
    {"form": _STR, "module_count": _INT, "rel_error": {"type": "object"}},
    {"ranks": _REF["int_map"], "iterations": _REF["int_map"]},
)

_BANK_WRITE = {
    "src": {"anyOf": [_STR, {"type": "array", "items": _STR}]},
    "dst": _STR,
    "action": {"enum": ["build", "add", "refit"]},
    "adapters": _INT,
    "fit": _FIT,
    "file_size": _INT,
    "left_out": {"type": "array"},
}

_AUDIT_ROW = _obj(
    {"path": _STR, "ok": _BOOL, "format": _NULLABLE_STR},
    {"error": _REF["error"], "module_count": _INT, "bytes": _INT, "notes": _REF["notes"], "rank": _REF["distribution"]},
)

COMMANDS: dict[str, dict[str, Any]] = {
    "inspect": _doc(
        {
            "path": _STR,
            "format": _STR,
            "adapters": {"type": "array", "items": _INSPECT_ADAPTER},
            "total": _TOTAL,
            "file": {"type": "object"},
        }
    ),
    "verify": _doc(
        {
            "path": _STR,
            "findings": _REF["findings"],
            "blobs": _INT,
            "bytes_checked": _INT,
            "skipped": _REF["notes"],
            "version": _STR,
        }
    ),
    "check": _doc({"path": _STR, "target": _STR, "findings": _REF["findings"]}),
    "convert": _doc(
        {
            "src": _STR,
            "dst": _STR,
            "src_format": _STR,
            "dst_format": _STR,
            "src_bytes": _INT,
            "dst_bytes": _INT,
            "notes": _REF["notes"],
            "skipped": _REF["notes"],
        },
        {"casts": {"type": "array"}, "codec": _NULLABLE_STR, "ratio": _NUM},
    ),
    "rerank": _doc(
        {
            "src": _STR,
            "dst": _NULLABLE_STR,
            "rule": _STR,
            "policy": {"type": "object"},
            "total": _obj({"module_count": _INT, "bytes_before": _INT, "bytes_after": _INT, "retained": _NUM, "rel_error": _NUM}),
            "modules": {
                "type": "array",
                "items": _obj({"name": _STR, "old_rank": _INT, "new_rank": _INT, "retained": _NUM, "rel_error": _NUM}),
            },
            "notes": _REF["notes"],
        }
    ),
    "importance": _doc({"src": _STR, "dst": _STR, "module_count": _INT}),
    "compress": _doc(
        {
            "src": _STR,
            "dst": _NULLABLE_STR,
            "budget": _INT,
            "bits": {"type": "array", "items": _INT},
            "group_size": _INT,
            "codec": _STR,
            "total": _obj({"module_count": _INT}),
            "modules": {
                "type": "array",
                "items": _obj(
                    {
                        "name": _STR,
                        "rank": _INT,
                        "bits": {"type": "array", "items": _INT},
                        "bytes": _INT,
                        "rel_error": {"type": ["number", "null"]},
                    }
                ),
            },
            "notes": _REF["notes"],
        }
    ),
    "audit": _doc(
        {
            "inputs": {"type": "array", "items": _AUDIT_ROW},
            "missing": {"type": "array", "items": _obj({"path": _STR, "error": _REF["error"]})},
            "total": _obj({"inputs": _INT, "failed": _INT, "missing": _INT, "module_count": _INT, "bytes": _INT}),
        }
    ),
    "bank build": _doc(_BANK_WRITE),
    "bank refit": _doc(_BANK_WRITE),
    "bank add": _doc(
        {**{k: v for k, v in _BANK_WRITE.items() if k != "fit"}, "added": {"type": "array", "items": _REF["named"]}},
        {"fit": {"type": "object"}},  # empty: an add fits nothing shared
    ),
    "bank extract": _doc(
        {"src": _STR, "dst": _STR, "adapter": _STR, "format": _STR, "module_count": _INT, "tensors": {"type": "array"}}
    ),
    "bank list": _doc(
        {
            "path": _STR,
            "form": _STR,
            "adapters": _INT,
            "modules": {"type": "array", "items": _obj({"name": _STR, "rank": _INT})},
            "members": {"type": "array", "items": _REF["named"]},
        }
    ),
    "diff": _doc(
        {
            "a": _STR,
            "b": _STR,
            "modules": {
                "type": "array",
                "items": _obj(
                    {"name": _STR, "rel_error": _NUM, "cosine": _NUM, "norm_a": _NUM, "norm_b": _NUM},
                    {"only_in": {"enum": ["a", "b"]}},
                ),
            },
            "total": _obj({"module_count": _INT, "rel_error": _NUM, "cosine": _NUM, "norm_a": _NUM, "norm_b": _NUM}),
            "notes": _REF["notes"],
        },
        {
            "model": _obj(
                {"base": _STR, "text": _STR, "tokens": _INT, "kl": _NUM, "top1_agreement": _NUM},
            ),
        },
    ),
    "merge": _doc(
        {
            "src": _STR,
            "base": _STR,
            "dst": _STR,
            "modules": {"type": "array", "items": _obj({"name": _STR, "weight": _STR, "dtype": _STR})},
            "total": _obj({"module_count": _INT, "files": _INT}),
            "notes": _REF["notes"],
        }
    ),
}

#: The document every command prints with ``--json`` when it fails.
ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["ok", "error"],
    "properties": {"ok": {"const": False}, "error": _REF["error"]},
    "additionalProperties": False,
}


def schema(command: str) -> dict[str, Any]:
    """The JSON Schema of ``command``'s ``--json`` output (a copy; ``KeyError`` for a command without one)."""
    body = copy.deepcopy(COMMANDS[command])
    return {"$schema": DIALECT, "$id": f"adapterpack:{command.replace(' ', '/')}", "title": f"adapterpack {command} --json",
            **body, "$defs": copy.deepcopy(DEFS)}  # fmt: skip


def error_schema() -> dict[str, Any]:
    """The JSON Schema of an error document."""
    return {"$schema": DIALECT, "$id": "adapterpack:error", **copy.deepcopy(ERROR), "$defs": copy.deepcopy(DEFS)}


__all__ = ["COMMANDS", "DEFS", "ERROR", "error_schema", "schema"]
