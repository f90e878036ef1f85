"""Adapter banks: many adapters of one base model in one ``.apack``, sharing per-module bases
U, V (``shared`` records, spec/shared.md). Build, add incrementally, refit, extract, list."""

from __future__ import annotations

from adapterpack.bank.ops import (
    BankReport,
    add_to_bank,
    bank_listing,
    build_bank,
    extract_drops,
    extract_member,
    refit_bank,
    write_extracted,
)
from adapterpack.bank.sources import PathSource, content_hash
from adapterpack.bank.store import Bank, BankMember, BankModule, open_bank, read_bank, write_bank

__all__ = [
    "Bank",
    "BankMember",
    "BankModule",
    "BankReport",
    "PathSource",
    "add_to_bank",
    "bank_listing",
    "build_bank",
    "content_hash",
    "extract_drops",
    "extract_member",
    "open_bank",
    "read_bank",
    "refit_bank",
    "write_bank",
    "write_extracted",
]
