"""Fuzz the importers: PEFT folders, kohya and llama.cpp GGUF files, damaged or edited, through open, ΔW, save and convert.

Any exception other than :class:`adapterpack.errors.AdapterpackError` is a crash (a numpy, json, struct,
safetensors or gguf traceback escaping adapterpack). The seeds are two modules of the bundled real adapter, as a
PEFT folder and as the kohya and GGUF files ``adapterpack convert`` writes from it (the GGUF with a ``config.json``
giving SmolLM2-135M's head counts, passed as ``base`` when it is read). Each input gets one to three edits:

- PEFT ``adapter_config.json``: a known key set to a random JSON value (NaN, huge and negative numbers,
  nested containers, wrong types) or removed;
- tensors (both formats): renamed, dropped, duplicated under another name, reshaped, cast to another dtype
  (integers, bool, float64, float16), filled with NaN/inf, or an extra DoRA / embedding / bias / alpha tensor;
- the safetensors file itself: truncated, or a byte of its header or data flipped;
- GGUF (byte edits only): truncated, bytes of its header, metadata and tensor table overwritten or inserted;
- a diffusers file (the seed's modules under ``unet.`` and ``text_encoder.`` pipeline keys, with ``alpha`` tensors):
  the tensor and file edits of kohya files.

Each input is opened, every tensor and every small ΔW computed, then saved as ``.apack`` and converted to PEFT
and kohya; with ``--cli``, the commands ``inspect`` (table and ``--json``), ``audit``, ``check``, ``rerank`` and
``compress`` also run on it, where an unhandled exception (not a clean refusal) is a crash. ``--merge`` runs
``merge``, ``diff`` and ``check --base`` with a small base model folder (the two adapted weights and a norm), where
either the PEFT folder or the base's safetensors file is edited or damaged. Crashing inputs are written to
``--crash-dir``. Run from the repository root::

    python -m tools.fuzz_import --n 3000
    python -m tools.fuzz_import --n 500 --cli
    python -m tools.fuzz_import --n 1500 --merge
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

import adapterpack
from adapterpack.errors import AdapterpackError
from adapterpack.ops.convert import convert

EXAMPLE = Path(__file__).resolve().parents[1] / "adapterpack" / "examples" / "smollm2-pydoc-lora"
#: ΔW is computed for modules whose base weight has at most this many elements.
DELTA_LIMIT = 1 << 20
CONFIG_KEYS = (
    "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "target_modules",
    "layers_to_transform", "layers_pattern", "modules_to_save", "init_lora_weights", "peft_type", "base_model_name_or_path",
    "alora_invocation_tokens", "lora_bias", "layer_replication", "task_type", "trainable_token_indices", "exclude_modules",
)
DTYPES = (np.float16, np.float64, np.int8, np.int32, np.uint8, np.bool_, np.float32)


def seeds(work: Path) -> dict[str, Path]:
    """A PEFT folder with two modules of the bundled adapter, and the kohya file converted from it."""
    peft = work / "seed-peft"
    peft.mkdir()
    tensors = load_file(str(EXAMPLE / "adapter_model.safetensors"))
    keep = sorted(k for k in tensors if ".layers.0.self_attn.q_proj." in k or ".layers.1.self_attn.v_proj." in k)
    save_file({k: tensors[k] for k in keep}, str(peft / "adapter_model.safetensors"))
    shutil.copy(EXAMPLE / "adapter_config.json", peft / "adapter_config.json")
    kohya = work / "seed-kohya.safetensors"
    convert(peft, kohya, to="kohya", force=True)
    gguf = work / "seed.gguf"
    convert(peft, gguf, to="gguf", force=True, base=base_config(work))
    diffusers = work / "seed-diffusers.safetensors"
    save_file(diffusers_tensors(load_file(str(peft / "adapter_model.safetensors"))), str(diffusers))
    return {"peft": peft, "kohya": kohya, "gguf": gguf, "diffusers": diffusers}


#: Where the seed's two modules go in the diffusers seed: a UNet attention projection and a text encoder one.
DIFFUSERS_NAMES = {
    "model.layers.0.self_attn.q_proj": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "model.layers.1.self_attn.v_proj": "text_encoder.text_model.encoder.layers.0.self_attn.v_proj",
}


def diffusers_tensors(peft: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The seed PEFT folder's factors under diffusers pipeline keys (``unet.….lora_A.weight``), each module with an
    ``alpha`` tensor (the older kohya-style scale key diffusers files carry too)."""
    out: dict[str, np.ndarray] = {}
    for key, t in peft.items():
        path = key.removeprefix("base_model.model.")
        for src, dst in DIFFUSERS_NAMES.items():
            if path.startswith(src + "."):
                out[dst + path[len(src) :]] = t
                out[f"{dst}.alpha"] = np.array(16.0, np.float32)
    return out


def base_config(work: Path) -> Path:
    """The base model's ``config.json`` as far as GGUF export and import need it (SmolLM2-135M's head counts)."""
    path = work / "config.json"
    if not path.exists():
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "num_attention_heads": 9,
               "num_key_value_heads": 3}
        path.write_text(json.dumps(cfg))
    return path


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    """A random JSON value, biased towards the troublesome ones."""
    pick = rnd.randrange(12 if depth < 2 else 9)
    return [
        lambda: rnd.choice([0, -1, 1, 2, 3, 8, 2**31, 2**63, -(2**40), 10**30]),
        lambda: rnd.choice([0.0, -0.5, 1e-300, 1e300, float("nan"), float("inf"), 16.0]),
        lambda: rnd.choice([True, False]),
        lambda: None,
        lambda: rnd.choice(["", "q_proj", "all-linear", ".*", "([a-z]+)+$", "model.layers.0", "LORA", "\x00"]),
        lambda: "x" * rnd.choice([1, 300, 5000]),
        lambda: rnd.choice(["k_proj", "v_proj", "q_proj"]),
        lambda: rnd.randrange(-4, 70),
        lambda: rnd.random() * 40,
        lambda: [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))],
        lambda: {rnd.choice(["q_proj", "v_proj", "layers.0", "", ".*"]): random_value(rnd, depth + 1) for _ in range(3)},
        lambda: {"model.layers.0.self_attn.q_proj": rnd.choice([0, 1, 4, 16, -2, 2.5, "8"])},
    ][pick]()


def edit_config(folder: Path, rnd: random.Random) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    key = rnd.choice(CONFIG_KEYS)
    if rnd.random() < 0.15:
        cfg.pop(key, None)
    else:
        cfg[key] = random_value(rnd)
    path.write_text(json.dumps(cfg))  # NaN / Infinity written as JSON's extension, as Python writes them


def edit_tensors(path: Path, rnd: random.Random) -> None:
    with np.errstate(all="ignore"):  # the edits cast NaN, inf and 1e38 into any dtype: whatever value results will do
        _edit_tensors(path, rnd)


def _edit_tensors(path: Path, rnd: random.Random) -> None:
    tensors = dict(load_file(str(path)))
    names = sorted(tensors)
    name = rnd.choice(names)
    t = tensors[name]
    op = rnd.randrange(10)
    if op == 0:  # rename: a part of the name replaced
        parts = name.split(".")
        i = rnd.randrange(len(parts))
        parts[i] = rnd.choice(["lora_A", "lora_B", "lora_down", "lora_up", "alpha", "weight", "lora_magnitude_vector", "x", "0"])
        tensors[".".join(parts)] = tensors.pop(name)
    elif op == 1:
        del tensors[name]
    elif op == 2:  # duplicated under a sibling name
        tensors[name.replace("q_proj", "k_proj").replace("v_proj", "o_proj") + rnd.choice(["", ".extra"])] = t.copy()
    elif op == 3:  # reshaped
        shape = rnd.choice([t.shape[::-1], (*t.shape, 1), (t.size,), (0, *t.shape[1:]), (1, 1, *t.shape), ()])
        tensors[name] = np.resize(t, shape) if math.prod(shape) else np.zeros(shape, t.dtype)
    elif op == 4:
        tensors[name] = t.astype(rnd.choice(DTYPES))
    elif op == 5 and t.dtype.kind == "f" and t.size:
        t = t.copy()
        t.flat[rnd.randrange(t.size)] = rnd.choice([np.nan, np.inf, -np.inf, 1e38])
        tensors[name] = t
    elif op == 6:  # an extra tensor next to an existing module
        stem = name.rsplit(".", 2)[0]
        extra = rnd.choice(["lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B", "bias", "alpha", "dora_scale"])
        tensors[f"{stem}.{extra}" + rnd.choice(["", ".weight"])] = np.ones(rnd.choice([(), (8,), (576,), (8, 576)]), np.float32)
    elif op == 7 and t.size:  # a scalar alpha (kohya) or any tensor set to a troublesome value
        tensors[name] = np.full(t.shape, rnd.choice([0.0, -4.0, 1e30, np.nan]), t.dtype if t.dtype.kind == "f" else np.float32)
    elif op == 8:  # every tensor of one module dropped but one
        stem = name.rsplit(".", 2)[0]
        for k in [k for k in names if k.startswith(stem) and k != name]:
            del tensors[k]
    else:  # an empty tensor
        tensors[name] = np.zeros((0, *t.shape[1:]), t.dtype)
    save_file(tensors, str(path))


def damage_file(path: Path, rnd: random.Random) -> None:
    raw = bytearray(path.read_bytes())
    if rnd.random() < 0.4:
        del raw[rnd.randrange(len(raw)) :]
    else:
        header = int.from_bytes(raw[:8], "little") + 8 if len(raw) >= 8 else len(raw)
        at = rnd.randrange(min(header, len(raw))) if rnd.random() < 0.7 else rnd.randrange(len(raw))
        raw[at] ^= 1 << rnd.randrange(8)
    path.write_bytes(bytes(raw))


def damage_gguf(path: Path, rnd: random.Random) -> None:
    """Truncated, or bytes overwritten or inserted, mostly in the first 2,000 bytes (header, metadata, tensor table)."""
    raw = bytearray(path.read_bytes())
    r = rnd.random()
    if r < 0.2:
        del raw[rnd.randrange(len(raw)) :]
        path.write_bytes(bytes(raw))
        return
    at = rnd.randrange(min(len(raw), 2000)) if rnd.random() < 0.8 else rnd.randrange(len(raw))
    if r < 0.9:
        raw[at] = rnd.randrange(256)
    else:
        raw[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9)))
    path.write_bytes(bytes(raw))


def mutate(kind: str, seed: Path, dst: Path, rnd: random.Random) -> Path:
    """A copy of ``seed`` at ``dst`` with one to three edits."""
    if kind == "gguf":
        shutil.copy(seed, dst)
        for _ in range(rnd.randrange(1, 4)):
            damage_gguf(dst, rnd)
        return dst
    if kind == "peft":
        shutil.copytree(seed, dst)
        weights = dst / "adapter_model.safetensors"
    else:
        shutil.copy(seed, dst)
        weights = dst
    for _ in range(rnd.randrange(1, 4)):
        r = rnd.random()
        if kind == "peft" and r < 0.4:
            edit_config(dst, rnd)
        elif r < 0.9:
            try:
                edit_tensors(weights, rnd)
            except Exception:  # a file an earlier edit damaged: safetensors cannot reread it to edit
                damage_file(weights, rnd)
        else:
            damage_file(weights, rnd)
    return dst


def exercise(path: Path, out: Path) -> str:
    """Open, every tensor and small ΔW, save as .apack, convert to PEFT and kohya; "ok" or the error class."""
    try:
        ad = adapterpack.open(path, base=base_config(path.parent) if path.suffix == ".gguf" else None)
        for m in ad:
            for slot in m.tensors:
                m.array(slot)
            if math.prod(m.base_shape) <= DELTA_LIMIT:
                with np.errstate(all="ignore"):
                    m.delta()
        adapterpack.save(ad, out / "x.apack")
        for to in ("peft", "kohya"):
            dst = out / ("peft-out" if to == "peft" else "kohya-out.safetensors")
            convert(path, dst, to=to, force=True, base=base_config(path.parent) if path.suffix == ".gguf" else None)
        return "ok"
    except AdapterpackError as e:
        return type(e).__name__


def _base_args(path: Path) -> list[str]:
    return ["--base", str(base_config(path.parent))] if path.suffix == ".gguf" else []


def cli_commands(path: Path, out: Path) -> list[list[str]]:
    """The command lines :func:`exercise_cli` runs on ``path`` (outputs under ``out``)."""
    p, base = str(path), _base_args(path)
    return [
        ["inspect", p, *base],
        ["inspect", p, "--json", *base],
        ["audit", p],
        ["check", p, "--target", "vllm"],
        ["rerank", p, str(out / "rerank.apack"), "--energy", "0.9", "--force", *base],
        ["compress", p, str(out / "compress.apack"), "--budget-ratio", "0.25", "--force", *base],
    ]


def run_commands(commands: list[list[str]], *, named: bool = True) -> list[str]:
    """Each command line, in process (click's runner); its outcome per command, ``NAME ok`` or ``NAME exit N`` (NAME:
    the command, ``bank`` subcommands by their own name; without ``named``, just ``ok`` / ``exit N``). A command that
    ends in an exception the CLI did not turn into a message and an exit status raises it (a crash)."""
    from click.testing import CliRunner

    from adapterpack.cli import main as cli

    runner = CliRunner()
    outcomes = []
    for args in commands:
        result = runner.invoke(cli, args, catch_exceptions=True)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        status = "ok" if result.exit_code == 0 else f"exit {result.exit_code}"
        outcomes.append(f"{args[1] if args[0] == 'bank' else args[0]} {status}" if named else status)
    return outcomes


def tally_report(title: str, tally: dict[str, int], crashes: int) -> int:
    """Print a sweep's outcomes, most frequent first, and its crash count; the exit status (1 if any crash)."""
    print(title)
    for outcome, count in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:6d}  {outcome}")
    print(f"{crashes} crash(es)")
    return 1 if crashes else 0


def crash_note(what: str, e: BaseException, saved: Path) -> None:
    """Tell stderr about a crash and where its input was saved."""
    print(f"CRASH {what}: {type(e).__name__}: {str(e)[:300]}\n  input saved to {saved}", file=sys.stderr)
    traceback.print_exc(limit=4)


def exercise_cli(path: Path, out: Path) -> list[str]:
    """Each of :func:`cli_commands` (:func:`run_commands`): ``ok`` or ``exit N`` per command."""
    return run_commands(cli_commands(path, out), named=False)


def base_model(work: Path) -> Path:
    """A base model folder for the seed PEFT folder: its two adapted weights (float32 and float16) and a norm."""
    base = work / "base-model"
    if not base.exists():
        base.mkdir()
        rng = np.random.default_rng(0)
        save_file(
            {
                "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((576, 576)).astype(np.float32),
                "model.layers.1.self_attn.v_proj.weight": rng.standard_normal((192, 576)).astype(np.float16),
                "model.norm.weight": np.ones(576, np.float32),
            },
            str(base / "model.safetensors"),
        )
        (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return base


def exercise_merge(adapter: Path, base: Path, reference: Path, out: Path) -> list[str]:
    """``merge ADAPTER BASE``, ``diff ADAPTER REFERENCE`` and ``check ADAPTER --target peft --base BASE``
    (:func:`run_commands`)."""
    return run_commands([
        ["merge", str(adapter), str(base), str(out / "merged"), "--force"],
        ["diff", str(adapter), str(reference)],
        ["check", str(adapter), "--target", "peft", "--base", str(base)],
    ])


def mutate_merge(seed: Path, base: Path, work: Path, rnd: random.Random) -> tuple[Path, Path]:
    """(adapter, base) for :func:`exercise_merge`: the seed folder and an edited or damaged copy of ``base``, or an
    edited copy of the seed folder and ``base`` itself."""
    adapter, b = work / "merge-adapter", work / "merge-base"
    for p in (adapter, b):
        shutil.rmtree(p, ignore_errors=True)
    if rnd.random() < 0.3:
        return mutate("peft", seed, adapter, rnd), base
    shutil.copytree(base, b)
    for _ in range(rnd.randrange(1, 3)):
        try:
            edit_tensors(b / "model.safetensors", rnd)
        except Exception:  # a file an earlier edit damaged: safetensors cannot reread it to edit
            damage_file(b / "model.safetensors", rnd)
    if rnd.random() < 0.3:
        damage_file(b / "model.safetensors", rnd)
    return seed, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="inputs per format (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--cli", action="store_true", help="also run inspect, audit, check, rerank and compress on each input")
    ap.add_argument("--merge", action="store_true", help="only: merge, diff and check --base with edited adapters or base models")
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    crashes = 0
    status = 0
    with tempfile.TemporaryDirectory(prefix="apack-fuzz-import-") as tmp:
        work = Path(tmp)
        base = seeds(work)
        if args.merge:
            return _merge_sweep(work, base["peft"], args, rnd)
        for kind, seed in base.items():
            tally: dict[str, int] = {}
            for i in range(args.n):
                case = work / f"case-{kind}"
                out = work / "out"
                for p in (case, out):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                out.mkdir()
                target = case if kind == "peft" else case.with_suffix(".gguf" if kind == "gguf" else ".safetensors")
                target.unlink(missing_ok=True)
                mutate(kind, seed, target, rnd)
                try:
                    outcome = exercise(target, out)
                    if args.cli:
                        outcome += " / cli " + ",".join(sorted(set(exercise_cli(target, out))))
                except Exception as e:  # a crash: keep the input
                    crashes += 1
                    args.crash_dir.mkdir(parents=True, exist_ok=True)
                    keep = args.crash_dir / f"{kind}-{args.seed}-{i}"
                    shutil.copytree(target, keep, dirs_exist_ok=True) if target.is_dir() else shutil.copy(target, keep)
                    crash_note(f"{kind} #{i}", e, keep)
                    outcome = "CRASH " + type(e).__name__
                tally[outcome] = tally.get(outcome, 0) + 1
            status |= tally_report(f"{kind}: {args.n} inputs", tally, crashes)
            crashes = 0
    return status


def _merge_sweep(work: Path, seed: Path, args: argparse.Namespace, rnd: random.Random) -> int:
    model = base_model(work)
    tally: dict[str, int] = {}
    crashes = 0
    out = work / "out"
    out.mkdir(exist_ok=True)
    for i in range(args.n):
        adapter, b = mutate_merge(seed, model, work, rnd)
        try:
            outcomes = exercise_merge(adapter, b, seed, out)
        except Exception as e:
            crashes += 1
            keep = args.crash_dir / f"merge-{args.seed}-{i}"
            shutil.copytree(adapter, keep / "adapter", dirs_exist_ok=True)
            shutil.copytree(b, keep / "base", dirs_exist_ok=True)
            crash_note(f"merge #{i}", e, keep)
            outcomes = [f"CRASH {type(e).__name__}"]
        for o in outcomes:
            tally[o] = tally.get(o, 0) + 1
    return tally_report(f"merge: {args.n} inputs", tally, crashes)


if __name__ == "__main__":
    sys.exit(main())
