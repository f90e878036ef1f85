"""Measure the Fisher information of every singular component of an adapter on a model (calibration text).

For module ``i`` with ΔW's exact SVD ``Σ σ_l u_l v_lᵀ`` (:mod:`adapterpack.linalg.lowrank`), the gradient
of a sequence's log-likelihood with respect to component l's coefficient is
``Σ_t (u_lᵀ g_t)(v_lᵀ x_t)``: ``x_t`` the module's input at position t, ``g_t`` the gradient at its output.
One forward and one backward pass per batch therefore give the Fisher information matrix
``F_ll' = E_seq[z_l z_l']``, ``z_l = Σ_t (u_lᵀ g_t)(v_lᵀ x_t)``, of every module's components at once,
from forward hooks and ``torch.autograd.grad`` with respect to the module outputs (no parameter gradients
are accumulated, ΔW is never formed beyond the merged weight).

Labels: ``"sample"`` (default) draws each next token from the adapted model's own distribution, which makes
``F`` the Fisher of ``KL(full ‖ changed)``, what re-ranking costs; ``"data"`` uses the text's next tokens
(the empirical Fisher). The adapter is applied merged for the measurement and the model is restored
bit-exactly afterwards (:func:`adapterpack.torch.apply`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapterpack import progress
from adapterpack.adapter import Adapter
from adapterpack.errors import ConversionError, InputError, MissingDependencyError
from adapterpack.linalg.finite import check_adapter
from adapterpack.ops.importance import LABELS, Importance
from adapterpack.ops.rerank import spectrum_with_factors
from adapterpack.torch.apply import apply

#: ``logits(model, batch) -> [b, t, vocab]``; the default fits Hugging Face causal LMs.
LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


#: Second moments :func:`component_statistics` gathers per module, each a k×k matrix over the
#: components: ``sequence`` E_seq[z zᵀ] with ``z_l = Σ_t (u_lᵀg_t)(v_lᵀx_t)`` (the Fisher information
#: matrix); ``token`` the same per token, E_t[w wᵀ] with ``w_l = (u_lᵀg_t)(v_lᵀx_t)``; ``grad``
#: E_t[(Uᵀg)(Uᵀg)ᵀ] and ``input`` E_t[(Vᵀx)(Vᵀx)ᵀ] (a Kronecker-factored curvature: grad ⊙ input).
STATISTICS = ("sequence", "token", "grad", "input")

Statistics = dict[str, dict[str, np.ndarray]]


def component_fisher(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[torch.Tensor],
    *,
    labels: str = "sample",
    seed: int = 0,
    logits: LogitsFn | None = None,
) -> Importance:
    """Fisher information matrix of the singular components of each module of ``adapter`` on ``model``.

    ``batches`` yields token-id tensors ``[b, t]`` (b sequences of t tokens); ``logits`` maps a batch to
    next-token logits ``[b, t, vocab]`` (default: ``model(input_ids=batch).logits``). Linear layers
    only (``nn.Linear``, GPT-2's ``Conv1D``); DoRA modules are left out (re-ranking keeps them as is).
    A module called several times per forward (shared blocks) sums its calls' gradients; one whose
    output never reaches the logits gets importance 0 (said in ``info["note"]``). The model runs in
    eval mode for the measurement and gets its mode and weights back.
    """
    stats, spectra, info = component_statistics(model, adapter, batches, labels=labels, seed=seed, logits=logits)
    return Importance({n: st["sequence"] for n, st in stats.items()}, spectra, info)


def component_statistics(
    model: nn.Module,
    adapter: Adapter,
    batches: Iterable[torch.Tensor],
    *,
    labels: str = "sample",
    seed: int = 0,
    logits: LogitsFn | None = None,
    statistics: tuple[str, ...] = ("sequence",),
) -> tuple[Statistics, dict[str, np.ndarray], dict[str, str]]:
    """The ``statistics`` (of :data:`STATISTICS`) of every module (per module name, per statistic), the
    singular values they were measured for, and how (``info``), all from one pass: ``sequence`` is
    what :func:`component_fisher` keeps; ``tools/experiments/rerank_estimators.py`` compares the rest."""
    unknown = set(statistics) - set(STATISTICS)
    if unknown or "sequence" not in statistics:
        raise ConversionError(f"statistics must include 'sequence' and be among {', '.join(STATISTICS)}, got {statistics}")
    if labels not in LABELS:
        raise ConversionError(f"labels must be one of {', '.join(LABELS)}, got {labels!r}")
    run = logits or _hf_logits
    picked = {n: m for n, m in adapter.modules.items() if not m.params.get("dora", False)}
    if not picked:
        raise ConversionError("the adapter has no module whose components can be measured")
    spectra, vecs = {}, {}
    for name, m in picked.items():
        sp, f = spectrum_with_factors(m, where=f"adapter {adapter.name!r} module {name!r}")
        if f.layout != "linear":
            raise ConversionError(f"module {name!r}: importance is measured for linear layers only, not {f.layout}")
        u, vt = sp.vectors()
        spectra[name] = sp.S
        vecs[name] = (u, vt.T)
    applied = apply(model, adapter.derived(picked), merge=True)
    try:
        kinds = {p.name: p.kind for p in applied.patches}
        bad = [n for n, k in kinds.items() if k not in ("linear", "fifo")]
        if bad:
            raise ConversionError(f"module {bad[0]!r}: importance is measured for linear layers only")
        return _measure(model, applied, spectra, vecs, batches, run, labels, seed, statistics)
    finally:
        applied.unapply()


def _measure(
    model: nn.Module,
    applied: Any,
    spectra: dict[str, np.ndarray],
    vecs: dict[str, tuple[np.ndarray, np.ndarray]],
    batches: Iterable[torch.Tensor],
    run: LogitsFn,
    labels: str,
    seed: int,
    statistics: tuple[str, ...],
) -> tuple[Statistics, dict[str, np.ndarray], dict[str, str]]:
    device = next(model.parameters()).device
    proj = {n: (torch.from_numpy(u).float(), torch.from_numpy(np.ascontiguousarray(v)).float()) for n, (u, v) in vecs.items()}
    k = {n: spectra[n].size for n in spectra}
    stats = {n: {key: np.zeros((k[n], k[n])) for key in statistics} for n in spectra}
    per_token = [key for key in ("token", "grad", "input") if key in statistics]
    rows = dict.fromkeys(spectra, 0)  # positions seen per module (for the per-token statistics)
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # every call of a module in one forward
    weights = [p.module.weight for p in applied.patches]
    was = [w.requires_grad for w in weights]
    training = model.training
    hooks = []

    def capture(name: str) -> Callable[..., None]:
        def fn(_mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            calls.setdefault(name, []).append((args[0].detach(), out))

        return fn

    for p in applied.patches:
        hooks.append(p.module.register_forward_hook(capture(p.name)))
    gen = torch.Generator(device=device).manual_seed(seed)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    n_seq = n_tok = 0
    try:
        model.eval()  # no dropout noise in the gradients
        for w in weights:  # outputs need a graph to take gradients; autograd.grad accumulates nothing into .grad
            w.requires_grad_(True)
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.enable_grad(), progress.task("importance", total=total, unit="batches") as bar:
            for ids in batches:
                bar.advance()
                _check_batch(ids, vocab)
                ids = ids.to(device)
                calls.clear()
                lg = run(model, ids)[:, :-1].float()
                if labels == "sample":
                    with torch.no_grad():
                        probs = torch.softmax(lg, dim=-1).reshape(-1, lg.shape[-1])
                        y = torch.multinomial(probs, 1, generator=gen).reshape(lg.shape[:2])
                else:
                    y = ids[:, 1:]
                loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="sum")
                b = ids.shape[0]
                flat = [(n, x, out) for n, seen in calls.items() for x, out in seen]
                grads = torch.autograd.grad(loss, [o for _, _, o in flat], allow_unused=True) if flat else []
                per_seq: dict[str, torch.Tensor] = {}
                for (n, x, _), g in zip(flat, grads, strict=True):
                    if g is None:  # this call's output does not reach the logits
                        continue
                    u, v = (m.to(g.device) for m in proj[n])
                    gu = g.reshape(b, -1, g.shape[-1]).float() @ u  # [b, t, k]: u_lᵀ g_t
                    xv = x.reshape(b, -1, x.shape[-1]).float() @ v  # [b, t, k]: v_lᵀ x_t
                    w = gu * xv  # each token's share of ∂L/∂c_l
                    d = w.sum(dim=1)
                    per_seq[n] = per_seq[n] + d if n in per_seq else d  # ∂L/∂c_l sums over every call, then squares
                    for key in per_token:
                        a = {"token": w, "grad": gu, "input": xv}[key].reshape(-1, w.shape[-1]).double()
                        stats[n][key] += (a.T @ a).cpu().numpy()
                    rows[n] += w.shape[0] * w.shape[1]
                for n, d in per_seq.items():
                    d = d.double()
                    stats[n]["sequence"] += (d.T @ d).cpu().numpy()
                n_seq += b
                n_tok += b * (ids.shape[1] - 1)
    finally:
        for h in hooks:
            h.remove()
        for w, r in zip(weights, was, strict=True):
            w.requires_grad_(r)
        model.train(training)
        calls.clear()
    if n_seq == 0:
        raise ConversionError("no calibration batches")
    silent = [n for n in spectra if not np.any(np.diag(stats[n]["sequence"])) and spectra[n].size and spectra[n][0] > 0]
    if len(silent) == len(spectra):
        raise ConversionError("no adapted module influenced the logits: is the adapter meant for this model?")
    info = {"labels": labels, "sequences": str(n_seq), "tokens": str(n_tok), "seed": str(seed)}
    if silent:
        info["note"] = f"{len(silent)} modules got no gradient (not on the path to the logits): importance 0"
    means = {n: {key: a / (n_seq if key == "sequence" else max(rows[n], 1)) for key, a in st.items()} for n, st in stats.items()}
    return means, dict(spectra), info


def _check_batch(ids: object, vocab: int | None) -> None:
    """A calibration batch: integer token ids ``[sequences, tokens >= 2]`` the model's embedding holds (torch's
    IndexError or dtype error from inside the model otherwise)."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] < 2:
        raise ConversionError(f"calibration batches must be [sequences, tokens >= 2], got {list(getattr(ids, 'shape', []))}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ConversionError(f"calibration batches must hold integer token ids, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ConversionError(f"calibration token ids must be in [0, {vocab}), got {lo}..{hi}")


def text_blocks(token_ids: list[int], blocks: int, block_tokens: int) -> torch.Tensor:
    """``blocks`` sequences of ``block_tokens`` consecutive tokens, evenly spaced over the text (all of
    them when it holds fewer): ``[n, block_tokens]`` int64."""
    if block_tokens < 2 or blocks < 1:
        raise ConversionError(f"need blocks >= 1 and block_tokens >= 2, got {blocks} and {block_tokens}")
    have = len(token_ids) // block_tokens
    if have == 0:
        raise ConversionError(f"the calibration text has {len(token_ids)} tokens, fewer than one block of {block_tokens}")
    picks = np.unique(np.linspace(0, have - 1, num=min(blocks, have)).round().astype(np.int64))
    ids = torch.tensor(token_ids[: have * block_tokens], dtype=torch.long).reshape(have, block_tokens)
    return ids[torch.from_numpy(picks)]


def load_causal_lm(folder: Path, device: str, what: str) -> tuple[Any, nn.Module]:
    """(tokenizer, float32 model in eval mode on ``device``) of a local Hugging Face causal LM folder, nothing
    downloaded; ``what`` names the feature in the error when transformers is missing."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: optional (the peft extra)
    except ImportError:
        raise MissingDependencyError(f"{what} needs transformers: pip install 'adapterpack[peft]'") from None
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise ConversionError(f"device {device!r} is not usable here ({e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise InputError(f"{folder}: cannot load the model or its tokenizer with transformers ({e})") from None
    return tok, model.to(dev).eval()


def causal_lm_importance(
    adapter: Adapter,
    model_dir: str | Path,
    text: str,
    *,
    blocks: int = 256,
    block_tokens: int = 128,
    batch: int = 4,
    labels: str = "sample",
    seed: int = 0,
    device: str = "cpu",
) -> Importance:
    """:func:`component_fisher` of ``adapter`` on a local Hugging Face causal LM folder (``transformers``;
    nothing is downloaded) over ``blocks`` evenly spaced blocks of ``text``, ``batch`` blocks per pass."""
    if batch < 1:
        raise ConversionError(f"batch must be >= 1, got {batch}")
    check_adapter(adapter)  # before the model is loaded: unusable factors are refused at once
    folder = Path(model_dir)
    tok, model = load_causal_lm(folder, device, "importance on a model")
    ids = text_blocks(tok(text)["input_ids"], blocks, block_tokens)
    imp = component_fisher(model, adapter, [ids[i : i + batch] for i in range(0, ids.shape[0], batch)], labels=labels, seed=seed)
    imp.info |= {"model": folder.name, "block_tokens": str(block_tokens)}
    return imp
