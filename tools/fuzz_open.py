"""Fuzz the .apack reader: open, read every tensor and ΔW, verify — on damaged files.

Any exception other than :class:`adapterpack.errors.AdapterpackError` is a crash (a numpy,
json, struct or zstd traceback escaping the reader). Run from the repository root::

    python -m tools.fuzz_open --seconds 60          # atheris (coverage-guided), when installed
    python -m tools.fuzz_open --hypothesis 5000     # N random mutations with Hypothesis, no atheris
    python -m tools.fuzz_open --hypothesis 5000 --torch   # ... and adapterpack.torch.load of each input
    python -m tools.fuzz_open --hypothesis 2000 --cli     # ... and inspect, audit, check, rerank, compress

Both start from small valid files covering every codec, every encoding (lora with each layout and
DoRA, svd, nola, shared) and a multi-adapter index. The limits of spec §7 are exercised: a ΔW is
computed for small modules, and for modules beyond the dense-ΔW limit ``delta()`` must refuse
(SizeLimitError) without allocating; anything else escaping is a crash.
Half of the mutated inputs get their index CRC-32C recomputed, so the JSON, schema and layout
checks see the damage instead of stopping at the checksum. Crashing inputs are written to
``--crash-dir`` (default ``fuzz-crashes/``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import adapterpack
from adapterpack.adapter import Adapter, Module, as_array
from adapterpack.checksum import crc32c
from adapterpack.container import ApackReader
from adapterpack.container.index import fill_implied, index_text
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, PREAMBLE_SIZE, data_start
from adapterpack.errors import AdapterpackError, SizeLimitError
from adapterpack.limits import MAX_DELTA_ELEMENTS, MAX_ZSTD_RATIO

CODECS = ("raw", "zstd", "byteplanes", "pco")
#: ΔW is computed for modules whose base weight has at most this many elements.
DELTA_LIMIT = 1 << 16


def _lora(name: str, rank: int, out_f: int, in_f: int, dtype: Any, seed: int, **params: Any) -> Module:
    rng = np.random.default_rng(seed)
    a = (rng.integers(-3, 4, (rank, in_f)) * 0.25).astype(dtype)
    b = (rng.integers(-3, 4, (out_f, rank)) * 0.125).astype(dtype)
    return Module(name, "lora", (out_f, in_f), {"rank": rank, "alpha": 2 * rank, **params}, {"A": a, "B": b})


def _encodings(rng: np.random.Generator) -> Adapter:
    """One small record of each other encoding: svd (rank 2, a prefix-readable spectrum), nola (seeded bases), shared."""
    svd = Module(
        "svd",
        "svd",
        (6, 5),
        {"rank": 2},
        {
            "S": np.array([2.0, 0.5], np.float32),
            "Ut": rng.standard_normal((2, 6)).astype(np.float32),
            "Vt": rng.standard_normal((2, 5)).astype(np.float32),
        },
    )
    nola_params = {"generator": "philox4x32-10", "generator_version": 1, "seed": 11, "stream": 2, "rank": 2, "k_A": 3, "k_B": 4}
    nola = Module(
        "nola",
        "nola",
        (8, 6),
        nola_params | {"scale": 0.5},
        {"alpha": rng.standard_normal(3).astype(np.float32), "beta": rng.standard_normal(4).astype(np.float16)},
    )
    u, v = rng.standard_normal((4, 2)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    shared = Module("shared", "shared", (4, 3), {"rank": 2, "form": "full"}, {"U": u, "V": v, "S": np.eye(2, dtype=np.float32)})
    sigma = np.array([1.5, 0.25], np.float32)
    diag = Module("diag", "shared", (4, 3), {"rank": 2, "form": "diagonal"}, {"U": u, "V": v, "S": sigma})
    from adapterpack.encodings import qsvd
    from adapterpack.factors import Factors

    ab = rng.standard_normal((3, 16)).astype(np.float32), rng.standard_normal((12, 3)).astype(np.float32)
    q = qsvd.from_factors("qsvd", Factors(ab[0], ab[1], 0.5, (12, 16)), [8, 4, 2], group_size=4)
    return Adapter("encodings", modules={m.name: m for m in (svd, nola, shared, diag, q)})


def seed_adapters() -> list[Adapter]:
    """Three adapters: plain linear modules (compressible); conv + embedding + DoRA/rsLoRA + pass-through;
    one record each of svd, nola, shared (full and diagonal) and qsvd."""
    plain = Adapter(
        "plain",
        base_model="tiny/base",
        modules={m.name: m for m in (_lora("q", 8, 64, 64, np.float32, 1), _lora("v", 4, 32, 64, np.float16, 2))},
        tensors={"head": np.repeat(np.arange(8, dtype=np.float32), 32).reshape(8, 32)},
        metadata={"k": "v"},
    )
    rng = np.random.default_rng(3)
    conv_ab = {"A": rng.standard_normal((2, 1, 2, 3)).astype(np.float16), "B": rng.standard_normal((3, 2, 1, 1)).astype(np.float16)}
    conv = Module("conv", "lora", (3, 1, 2, 3), {"rank": 2, "alpha": 4, "layout": "conv"}, conv_ab)
    emb = _lora("emb", 2, 4, 10, np.float32, 4, layout="embedding")
    emb.base_shape = (10, 4)
    dora = _lora("dora", 3, 5, 7, ml_dtypes.bfloat16, 5, dora=True, rslora=True, fan_in_fan_out=True)
    dora.base_shape = (7, 5)
    dora.tensors["magnitude"] = np.linspace(0.5, 1.5, 5).astype(np.float32)
    extra = Adapter(
        "extra",
        modules={m.name: m for m in (conv, emb, dora)},
        tensors={"ids": np.arange(5, dtype=np.int64), "mask": np.array([True, False, True])},
        source={"format": "peft", "config": {"r": 2}},
    )
    return [plain, extra, _encodings(np.random.default_rng(6))]


@functools.lru_cache(maxsize=1)
def seed_files() -> tuple[bytes, ...]:
    """The valid starting files, one per codec."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for codec in CODECS:
            path = Path(d) / f"{codec}.apack"
            adapterpack.save(seed_adapters(), path, codec=codec)
            out.append(path.read_bytes())
    return tuple(out)


def fix_index_crc(raw: bytearray) -> None:
    """Recompute the preamble's index CRC-32C where the claimed index fits in the file."""
    if len(raw) < 32:
        return
    length = struct.unpack_from("<Q", raw, 16)[0]
    if 32 + length <= len(raw):
        struct.pack_into("<I", raw, 24, crc32c(bytes(raw[32 : 32 + length])))


def load_everything(path: Path, verify: bool = True, delta_limit: int = 0) -> list[Adapter]:
    """Open, build every adapter and decode every tensor: what a user of the file would do.

    With ``delta_limit``, also compute ΔW of every module whose base weight has at most that
    many elements (a damaged alpha may make inf * 0 there: a value, not a crash), and ask for
    the ΔW of every module beyond the spec's dense-ΔW limit: it must be refused with
    SizeLimitError before anything is allocated (an AssertionError, a crash, otherwise).
    """
    reader = ApackReader(path, verify=verify)
    out = []
    for name in reader.adapter_names:
        ad = reader.adapter(name)
        for m in ad:
            for slot in m.tensors:
                m.array(slot)
            size = math.prod(m.base_shape)
            if size <= delta_limit:
                with np.errstate(all="ignore"):
                    m.delta()
            elif delta_limit and size > MAX_DELTA_ELEMENTS:
                try:
                    m.delta()
                except SizeLimitError:
                    pass
                else:
                    raise AssertionError(f"module {m.name!r}: a ΔW of {size} elements was not refused")
        for t in ad.tensors.values():
            as_array(t)
        out.append(ad)
    return out


def load_torch(path: Path) -> None:
    """``adapterpack.torch.load`` of every adapter (every record through its torch decoder, CRC-32C checked), and ΔW
    of every module whose base weight has at most :data:`DELTA_LIMIT` elements (``materialize``)."""
    import adapterpack.torch as apt

    with ApackReader(path) as reader:
        names = reader.adapter_names
    for name in names:
        for f in apt.load(path, adapter=name).values():
            if math.prod(f.base_shape) <= DELTA_LIMIT:
                apt.materialize(f)


def exercise(path: Path, torch: bool = False) -> str:
    """Open, build every adapter, decode every tensor and small ΔW, verify (and with ``torch``, :func:`load_torch`);
    returns "ok" or the error class.

    Raises whatever the reader raises that is not an AdapterpackError.
    """
    try:
        load_everything(path, delta_limit=DELTA_LIMIT)
        with ApackReader(path) as reader:
            ok = reader.verify().ok
        if torch:
            load_torch(path)
        return "ok" if ok else "verify-problem"
    except AdapterpackError as e:
        return type(e).__name__


def _scratch_dir() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="apack-fuzz-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_allowance(n: int) -> int:
    """The most an ``n``-byte input may raise the peak RSS by: what spec §7 lets its bytes declare (every byte decoded
    up to 32768 times), twice over (a decoded blob and one array made from it), plus 256 MiB of slack; more is a crash
    (the harness cannot see an allocation that is freed before the next peak it measures, only peaks)."""
    return 2 * MAX_ZSTD_RATIO * n + (256 << 20)


def _save_crash(crash_dir: Path, data: bytes, exc: BaseException) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"crash-{crc32c(data):08x}.apack"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text("".join(traceback.format_exception(exc)))
    return path


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indices) to a value inside a JSON document."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def rebuild(raw: bytes, index: Any) -> bytes:
    """``raw`` (a valid file) with its index replaced by ``index`` and the preamble made consistent."""
    flags, length = struct.unpack_from("<IQ", raw, 12)
    data = raw[data_start(length, flags) :]
    text = json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    flags &= ~FLAG_INDEX_ZSTD  # written back as plain JSON text (the layout, and so the layout flags, unchanged)
    pad = data_start(len(text), flags) - PREAMBLE_SIZE - len(text)
    return raw[:12] + struct.pack("<IQI", flags, len(text), crc32c(text)) + raw[28:32] + text + b"\0" * pad + data


INTERESTING: list[Any] = [-1, 0, 1, 2, 3, 7, 8, 255, 256, 4096, 2**31, 2**32, 2**53 - 1, 2**53, 2**63, 2**64, 10**400]
INTERESTING += [2**16, 2**29 - 1, 2**30 + 1, 2**31 + 1, 2**32 + 1]  # around the limits of spec §7
INTERESTING += [0.5, -0.0, 1e308, 1e-320, float("nan"), float("inf"), None, True, False, [], {}]
INTERESTING += ["", "raw", "zstd", "byteplanes", "pco", "lora", "svd", "nola", "shared"]
INTERESTING += ["float16", "bool", "conv", "embedding", "x"]
KEYS = ["id", "name", "blob", "x"]


#: Index texts longer than this are not edited: a compressed index may declare up to 64 MiB of hostile JSON, which
#: ``json.loads`` (unlike the reader, which counts its containers first, spec §7) would turn into gigabytes of objects
#: in the mutator, outside the harness's memory check.
EDIT_TEXT_LIMIT = 1 << 20


def json_edit(raw: bytes, pick: Callable[[Sequence[Any]], Any], value: Callable[[], Any]) -> bytes:
    """One or two structure-aware edits of ``raw``'s index (replace, delete, duplicate or nudge a value), CRC fixed.

    ``pick`` chooses from a sequence and ``value`` makes a replacement value (Hypothesis draws, or a seeded
    ``random.Random``). Returns ``raw`` unchanged when its index cannot be parsed.
    """
    try:
        flags, length = struct.unpack_from("<IQ", raw, 12)
        text = index_text(raw[32 : 32 + length], bool(flags & FLAG_INDEX_ZSTD))
        if len(text) > EDIT_TEXT_LIMIT:
            return raw
        index = json.loads(text)
    except (struct.error, ValueError, RecursionError, AdapterpackError):
        return raw
    if flags & FLAG_IMPLIED and isinstance(index, dict) and pick([False, True]):
        # the offsets and lengths a 1.5 index leaves out, written in (present, they are checked), so they can be edited
        try:  # best effort: a mutated input's blob table may hold anything (huge shapes, wrong types)
            fill_implied(index["blobs"], bool(flags & FLAG_PACKED))
        except Exception:  # then its keys stay left out, as the input has them
            pass
    for _ in range(pick([1, 2])):
        paths = _paths(index)[1:]
        if not paths:
            break
        path = pick(paths)
        parent = index
        for key in path[:-1]:
            parent = parent[key]
        how = pick(["replace", "delete", "duplicate", "nudge"])
        if how == "delete":
            del parent[path[-1]]
        elif how == "duplicate" and isinstance(parent, list):
            parent.insert(path[-1], json.loads(json.dumps(parent[path[-1]])))
        elif how == "nudge" and type(parent[path[-1]]) is int:
            parent[path[-1]] += pick([-8, -1, 1, 8, 256])
        else:
            parent[path[-1]] = value()
    return rebuild(raw, index)


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    """An interesting JSON value, sometimes a small list or object of them."""
    kind = rnd.randrange(6) if depth < 2 else 0
    if kind == 4:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if kind == 5:
        return {rnd.choice(KEYS): random_value(rnd, depth + 1) for _ in range(rnd.randrange(3))}
    return rnd.choice(INTERESTING)


# --- Hypothesis mode -----------------------------------------------------------------------------


def mutations() -> Any:
    """Hypothesis strategy: a seed file with 1–3 random edits (flips, overwrites, truncation, insertion, deletion)."""
    from hypothesis import strategies as st

    json_bytes = b'{}[]",:0123456789-.eE \\tfnu' + bytes([0x80, 0xFF])
    leaves = st.sampled_from(INTERESTING)
    values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(KEYS), c), max_leaves=4)

    @st.composite
    def strategy(draw: Any) -> bytes:
        seeds = seed_files()
        seed = seeds[draw(st.integers(0, len(seeds) - 1))]
        if draw(st.integers(0, 2)) == 0:  # a third of inputs: structure-aware edits of the index
            seed = json_edit(seed, lambda seq: draw(st.sampled_from(seq)), lambda: draw(values))
            if draw(st.booleans()):
                return seed
        raw = bytearray(seed)
        index_end = 32 + struct.unpack_from("<Q", raw, 16)[0]

        def at(low: int, high: int) -> int:
            """A position in [low, high), spread evenly (Hypothesis favours the ends of an integer range)."""
            low = min(low, high - 1)
            return low + draw(st.integers(0, 1 << 20)) % (high - low)

        for _ in range(draw(st.integers(1, 3))):
            if not raw:
                break
            kind = draw(
                st.sampled_from(["flip", "byte", "index-byte", "data-byte", "truncate", "insert", "delete", "preamble-int"])
            )
            # positions start past the magic, which tests/test_malformed.py covers
            if kind == "flip":
                raw[at(8, len(raw))] ^= 1 << draw(st.integers(0, 7))
            elif kind == "byte":
                raw[at(8, len(raw))] = draw(st.integers(0, 255))
            elif kind == "index-byte" and index_end <= len(raw):
                raw[at(32, index_end)] = draw(st.sampled_from(json_bytes))
            elif kind == "data-byte" and len(raw) > index_end:
                raw[at(index_end, len(raw))] = draw(st.integers(0, 255))
            elif kind == "truncate":
                del raw[at(0, len(raw)) :]
            elif kind == "insert":
                pos = at(0, len(raw) + 1)
                raw[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif kind == "delete":
                pos = at(0, len(raw))
                del raw[pos : pos + draw(st.integers(1, 16))]
            elif kind == "preamble-int" and len(raw) >= 32:
                off, fmt = draw(st.sampled_from([(8, "<H"), (10, "<H"), (12, "<I"), (16, "<Q"), (28, "<I")]))
                struct.pack_into(fmt, raw, off, draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1)))
        if draw(st.booleans()):
            fix_index_crc(raw)
        return bytes(raw)

    return strategy()


def run_hypothesis(n: int, crash_dir: Path, torch: bool = False, cli: bool = False) -> int:
    """Run ``n`` mutated inputs; print a tally of outcomes. Returns the number of crashes (0 or 1: Hypothesis stops at one)."""
    from hypothesis import HealthCheck, given, settings

    work = _scratch_dir()
    tally: dict[str, int] = {}
    crashes: list[Path] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(raw=mutations())
    def one(raw: bytes) -> None:
        path = work / "input.apack"
        path.write_bytes(raw)
        try:
            outcome = exercise(path, torch)
            if cli:  # the commands a user runs on the file: a clean refusal is an exit status, anything else escapes
                from tools.fuzz_import import exercise_cli

                out = work / "out"
                out.mkdir(exist_ok=True)
                outcome += " / cli " + ",".join(sorted(set(exercise_cli(path, out))))
        except Exception as e:
            crashes.append(_save_crash(crash_dir, raw, e))
            raise
        tally[outcome] = tally.get(outcome, 0) + 1

    start = time.perf_counter()
    try:
        one()
    except Exception as e:
        print(f"CRASH: {type(e).__name__}: {e}\n  input saved to {crashes[-1] if crashes else '?'}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(tally.values())
    print(f"hypothesis: {total} inputs in {time.perf_counter() - start:.1f} s, {len(crashes) and 1} crash(es)")
    for outcome, count in sorted(tally.items(), key=lambda kv: -kv[1]):
        print(f"  {count:7d}  {outcome}")
    return 1 if crashes else 0


# --- atheris mode --------------------------------------------------------------------------------


def run_atheris(seconds: int, crash_dir: Path, extra_args: list[str]) -> int:
    """Coverage-guided fuzzing with atheris (libFuzzer); the seeds form the starting corpus."""
    import atheris

    work = _scratch_dir()
    corpus = work / "corpus"
    corpus.mkdir()
    for i, raw in enumerate(seed_files()):
        (corpus / f"seed{i}.apack").write_bytes(raw)
    path = work / "input.apack"

    def test_one_input(data: bytes) -> None:
        path.write_bytes(data)
        before = _peak_rss()
        try:
            exercise(path)
        except Exception as e:
            saved = _save_crash(crash_dir, data, e)
            print(f"CRASH saved to {saved}", file=sys.stderr)
            raise
        grown = _peak_rss() - before
        if grown > memory_allowance(len(data)):
            e = MemoryError(f"the process's peak RSS grew by {grown >> 20} MiB on a {len(data)}-byte input")
            saved = _save_crash(crash_dir, data, e)
            print(f"MEMORY CRASH saved to {saved}: {e}", file=sys.stderr)
            raise e

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rnd = random.Random(seed)
        if rnd.random() < 0.25:  # structure-aware: edit a value of the index
            out = json_edit(data, rnd.choice, lambda: random_value(rnd))
            if out is not data:
                return out[:max_size]
        raw = bytearray(atheris.Mutate(data, max_size))
        if seed % 2:
            fix_index_crc(raw)
        return bytes(raw)

    # Under atheris this process's RSS grows about 5 KB per run whatever the inputs do (the corpus such a run built,
    # replayed through exercise() in a plain loop 20 times, stays at 70 MB), so libFuzzer's 2 GB default ends a run
    # after ~350k inputs; each input's own peak is checked by the harness instead (memory_allowance).
    limit = [] if any(a.startswith("-rss_limit_mb") for a in extra_args) else ["-rss_limit_mb=16384"]
    argv = [sys.argv[0], f"-max_total_time={seconds}", "-max_len=65536", "-print_final_stats=1", *limit, *extra_args]
    argv.append(str(corpus))
    atheris.instrument_all()
    atheris.Setup(argv, test_one_input, custom_mutator=mutator)
    atheris.Fuzz()  # exits the process
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: atheris when installed (or --atheris), else --hypothesis N."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypothesis", type=int, metavar="N", help="run N random mutations with Hypothesis (no atheris)")
    parser.add_argument("--torch", action="store_true", help="also adapterpack.torch.load every intact input (hypothesis mode)")
    parser.add_argument("--cli", action="store_true", help="also run inspect, audit, check, rerank and compress (hypothesis mode)")
    parser.add_argument("--seconds", type=int, default=60, help="atheris run time (default 60)")
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"), help="where crashing inputs are written")
    args, rest = parser.parse_known_args(argv)
    if args.hypothesis is not None:
        return run_hypothesis(args.hypothesis, args.crash_dir, args.torch, args.cli)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install atheris); running --hypothesis 2000 instead", file=sys.stderr)
        return run_hypothesis(2000, args.crash_dir)
    return run_atheris(args.seconds, args.crash_dir, rest)


if __name__ == "__main__":
    sys.exit(main())
