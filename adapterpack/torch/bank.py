"""Serving an adapter bank with torch: shared bases on the device once, each adapter's S on demand,
and a batched apply whose rows may each use a different adapter.

For a module with bases U [out, R], V [in, R] and rows b of a batch using adapter a(b):

    y_b = x_b·W₀ᵀ + U·(S_{a(b)}·(Vᵀ·x_b))

computed as three batched products: H = X·V (one GEMM for the whole batch, shared by every
adapter; an embedding module gathers V's rows of its ids instead), Z_b = H_b·S_{a(b)}ᵀ (a batched
R×R product on the rows' gathered S; a diagonal bank multiplies by σ instead), and Z·Uᵀ (one GEMM).
Only the R×R step depends on the adapter, so a batch mixing 64 adapters costs about what one costs.

Bases that are far from orthonormal (a diagonal bank fitted at a high rank holds nearly collinear columns, condition
numbers of 1e8, with large σ of both signs) would lose ΔW to cancellation in any float dtype: such a module's bases
are re-factored at load, in float64, U = Q_U·R_U and V = Q_V·R_V, and the device holds Q_U, Q_V and each adapter's
S' = R_U·S·R_Vᵀ (a full matrix; ΔW = Q_U·S'·Q_Vᵀ is the same ΔW).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from adapterpack import dtypes
from adapterpack.container.reader import ApackReader
from adapterpack.errors import BankError
from adapterpack.torch.tensors import tensor, torch_device, torch_dtype

#: Bases whose condition numbers multiply to more than this are re-factored at load (see the module docstring);
#: orthonormal bases (a full-form bank's) have 1.
REFACTOR_COND = 16.0


def _refactored(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(Q_U, R_U, Q_V, R_V) in float64 for bases ``u`` [out, R], ``v`` [in, R] too ill-conditioned to use as they are,
    else None (well-conditioned, empty, or not finite: a bank's values are checked elsewhere)."""
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if not u64.size or not v64.size or not (np.all(np.isfinite(u64)) and np.all(np.isfinite(v64))):
        return None
    su, sv = np.linalg.svd(u64, compute_uv=False), np.linalg.svd(v64, compute_uv=False)
    if su[-1] * sv[-1] * REFACTOR_COND >= su[0] * sv[0]:
        return None
    qu, ru = np.linalg.qr(u64)
    qv, rv = np.linalg.qr(v64)
    return qu, ru, qv, rv


class TorchBank:
    """A bank's bases on ``device``; :meth:`use` loads the S of the adapters a batch may name."""

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        self.path = Path(path)
        self.device = torch_device(device)
        self.dtype = dtype
        self._reader = ApackReader(self.path)
        self.names: list[str] = self._reader.adapter_names
        self._records: dict[str, dict[str, dict]] = {}
        self._tensors: dict[str, list[str]] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.V: dict[str, torch.Tensor] = {}
        self.form: dict[str, str] = {}
        self.base_shape: dict[str, tuple[int, ...]] = {}
        self._transposed: dict[str, bool] = {}
        self._embedding: dict[str, bool] = {}
        #: module -> (R_U, R_V) of its re-factored bases (float64), for modules whose S is mixed at load
        self._mix: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        try:
            self._load()
        except BaseException:
            self._reader.close()
            raise
        self.active: list[str] = []
        self._S: dict[str, torch.Tensor] = {}

    def _load(self) -> None:
        """Check every record, then put each module's U, V on the device once (refusing records that do not share them)."""
        for n in self.names:  # every record through the reader's own checks (index only; no blob is read) before raw params
            self._reader.adapter(n)
        refs: dict[str, tuple[int, int, str, bool]] = {}
        for raw in self._reader.index.adapters:
            recs = {}
            for m in raw["modules"]:
                name = m["name"]
                if m["encoding"] != "shared":
                    raise BankError(f"{self.path}: adapter {raw['name']!r} module {name!r} is not a shared record")
                recs[name] = m
                t, p = m["tensors"], m["params"]
                transposed = p.get("layout", "linear") == "embedding" or bool(p.get("fan_in_fan_out", False))
                ref = (t["U"], t["V"], p["form"], transposed)
                if name not in refs:
                    refs[name] = ref
                    u, v = self._reader.read_blob(t["U"]), self._reader.read_blob(t["V"])
                    self.form[name] = p["form"]
                    qr = _refactored(u, v)
                    if qr is not None:
                        want = self.dtype or torch_dtype(dtypes.of_array(u).name)  # the stored dtype unless one was asked for
                        u, v = qr[0], qr[2]
                        self._mix[name] = (qr[1], qr[3])
                        self.form[name] = "full"
                    else:
                        want = self.dtype
                    self.U[name] = tensor(u, self.device, want)
                    self.V[name] = tensor(v, self.device, want)
                    self.base_shape[name] = tuple(m["base_shape"])
                    self._transposed[name] = transposed
                    self._embedding[name] = p.get("layout", "linear") == "embedding"
                elif refs[name] != ref:
                    raise BankError(f"{self.path}: adapter {raw['name']!r} module {name!r} does not share the bank's U, V, form "
                                    "and layout")
            self._records[raw["name"]] = recs
            self._tensors[raw["name"]] = [t["name"] for t in raw.get("tensors", [])]

    @property
    def modules(self) -> list[str]:
        """Banked module names."""
        return list(self.U)

    def use(self, names: Sequence[str]) -> None:
        """Load S of ``names`` (in this order: row index i of a batch means ``names[i]``) and stack them per module.

        Reads only those adapters' S blobs. An adapter lacking a module gets zeros there (no ΔW).
        An adapter with pass-through tensors (PEFT ``modules_to_save``) is refused: the batched
        apply adds ΔW only, so it would be applied half.
        """
        unknown = [n for n in names if n not in self._records]
        if unknown:
            raise BankError(f"{self.path}: no adapter {unknown[0]!r} in the bank")
        full = next((n for n in names if self._tensors[n]), None)
        if full is not None:
            t = self._tensors[full]
            raise BankError(f"{self.path}: adapter {full!r} holds {len(t)} full tensors besides its S (modules_to_save: "
                            f"{', '.join(t[:3])}); a TorchBank applies ΔW only")
        self.active = list(names)
        self._S = {}
        for mod, U in self.U.items():
            shape = (U.shape[1], self.V[mod].shape[1]) if self.form[mod] == "full" else (U.shape[1],)
            rows = []
            for n in names:
                rec = self._records[n].get(mod)
                if rec is None:
                    rows.append(torch.zeros(shape, dtype=U.dtype, device=self.device))
                else:
                    rows.append(self._s(mod, rec["tensors"]["S"]))
            self._S[mod] = torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=U.dtype, device=self.device)

    def _s(self, module: str, blob: int) -> torch.Tensor:
        """An adapter's S of ``module`` (blob ``blob``) on the device in the bases' dtype; R_U·S·R_Vᵀ for re-factored bases."""
        s = self._reader.read_blob(blob)
        mix = self._mix.get(module)
        if mix is not None:
            s64 = np.asarray(s, np.float64)
            s = mix[0] @ (np.diag(s64) if s64.ndim == 1 else s64) @ mix[1].T
        return tensor(s, self.device, self.U[module].dtype)

    def _check(self, module: str, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Refuse a request torch would fail on (or, on a GPU, end the process with a device-side assert on)."""
        if module not in self.U:
            raise BankError(f"{self.path}: module {module!r} is not banked")
        if not self.active:
            raise BankError("call use(names) before applying the bank")
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype.is_complex \
                or rows.dtype == torch.bool:
            raise BankError("rows must be a 1-D integer tensor (one adapter index per row of the batch)")
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or rows.shape[0] != x.shape[0]:
            raise BankError(f"{rows.shape[0]} rows for a batch of {list(getattr(x, 'shape', []))[:1]} rows")
        n = len(self.active)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):  # one small sync on a GPU
            raise BankError(f"a row names adapter index {int(rows.min())}..{int(rows.max())}, outside [0, {n}) of use()")
        inp = self.V[module].shape[0]
        if self._embedding[module]:
            if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                raise BankError(f"module {module!r} is an embedding: x must hold integer ids, got {x.dtype}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= inp):
                raise BankError(f"module {module!r}: ids must be in [0, {inp}), got {int(x.min())}..{int(x.max())}")
        elif x.dim() < 2 or x.shape[-1] != inp:
            raise BankError(f"module {module!r} takes [batch, ..., {inp}] inputs, got {list(x.shape)}")

    def delta(self, module: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """U·(S_{a(b)}·(Vᵀ·x_b)) for x ``[B, ..., in]`` and ``rows`` ``[B]`` (indices into :meth:`use`'s names);
        an embedding module takes ids ``[B, ...]`` and gathers V's rows (ΔW's rows of those ids)."""
        self._check(module, x, rows)
        U, V = self.U[module], self.V[module]
        if self._embedding[module]:
            lead = x.shape[1:]
            h = torch.nn.functional.embedding(x.reshape(x.shape[0], -1).to(V.device), V)  # [B, T, R]
        else:
            lead = x.shape[1:-1]
            h = x.reshape(x.shape[0], -1, x.shape[-1]).to(V.dtype) @ V  # [B, T, R]
        S = self._S[module].index_select(0, rows.to(self.device))
        z = h * S[:, None, :] if S.dim() == 2 else torch.bmm(h, S.transpose(1, 2))
        return (z @ U.T).reshape(x.shape[0], *lead, U.shape[0])

    def apply(self, module: str, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x·W₀ᵀ (+ bias) + the bank's ΔW of each row's adapter (a linear layer's forward: ``weight`` is
        ``[out, in]``, a GPT-2 Conv1D's transposed); an embedding module's: ``weight[x]`` + ΔW's rows."""
        self._check(module, x, rows)
        out, inp = self.U[module].shape[0], self.V[module].shape[0]
        want = (inp, out) if self._embedding[module] else (out, inp)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != want:
            raise BankError(f"module {module!r}: weight must be {list(want)}, got {list(getattr(weight, 'shape', []))}")
        if self._embedding[module]:
            y = torch.nn.functional.embedding(x, weight)
        else:
            y = torch.nn.functional.linear(x, weight, bias)
        return y + self.delta(module, x, rows).to(y.dtype)

    def materialize(self, name: str, module: str) -> torch.Tensor:
        """Dense ΔW of adapter ``name`` on ``module`` in the base weight's layout (reads its S if not in use)."""
        rec = self._records.get(name, {}).get(module)
        if rec is None:
            raise BankError(f"{self.path}: adapter {name!r} has no module {module!r}")
        U, V = self.U[module], self.V[module]
        S = self._s(module, rec["tensors"]["S"])
        d = (U * S[None, :] if S.dim() == 1 else U @ S) @ V.T
        return d.T.contiguous() if self._transposed[module] else d

    def close(self) -> None:
        """Release the file (tensors already on the device stay valid)."""
        self._reader.close()

    def __enter__(self) -> TorchBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
