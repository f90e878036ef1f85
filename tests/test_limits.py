"""The limits of spec §7 hold: sizes no bytes back, safetensors headers and PEFT pattern keys are
refused (or matched) in bounded time and memory, with the exact adapterpack error.

Each hostile input runs in a child process whose address space is capped at 1 GiB above what
it holds after its imports, with a timeout: a refusal that allocates first, or a match that
backtracks, fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack import errors, limits
from adapterpack.adapter import Adapter, Module
from adapterpack.encodings.lower import as_lora
from adapterpack.formats.patterns import get_pattern_key, resolve
from adapterpack.formats.regex_match import compile_key, matches
from adapterpack.formats.safetensors_header import TensorEntry, read_header
from tests.apack_builders import edited, nola_module

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "adapterpack" / "examples" / "smollm2-pydoc-lora"
N = 2**29 - 1  # the size bomb: a base weight of 2.9e17 elements

BOUNDED = """
import resource, sys, time
sys.path.insert(0, {repo!r})
import numpy as np
import adapterpack
from adapterpack.encodings.lower import as_lora
from adapterpack.errors import AdapterpackError
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
start, rss = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ad = adapterpack.open(sys.argv[1])
    for m in ad:
        {action}
    print("OK")
except AdapterpackError as e:
    print(type(e).__name__, str(e).replace(chr(10), " "))
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss)
"""


def bounded(path: Path, action: str = "m.delta()", timeout: float = 60) -> tuple[str, float, int]:
    """Open ``path`` and run ``action`` on every module in a child capped at +1 GiB and ``timeout`` seconds (the bound on
    runaway work; no test asserts a time): (outcome line, seconds, RSS growth KiB)."""
    script = textwrap.dedent(BOUNDED).format(repo=str(REPO), action=action)
    res = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    outcome, figures = res.stdout.strip().splitlines()[-2:]
    seconds, growth = figures.split()
    return outcome, float(seconds), int(growth)


# --- defect 6: size bombs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_shape", "action", "words"),
    [
        # the file: 2^30-2 regenerated factor elements (within the 1.1 limit) and a ΔW of 2.9e17 values
        ([N, N], "m.delta()", f"SizeLimitError module 'q': a dense ΔW of shape [{N}, {N}] holds {N * N} elements"),
        (
            [1 << 29, (1 << 29) + 1],
            "pass",
            "RankError {path}: module 'q': rank 1 on a 536870912x536870913 weight makes A and B hold",
        ),
    ],
    ids=["issue-file-delta", "factors-over-limit"],
)
def test_nola_size_bomb_is_refused_before_allocating(tmp_path: Path, base_shape: list[int], action: str, words: str) -> None:
    """One rank-1 nola record edited onto a huge weight: the issue's [2^29-1]² file passed every check and delta()
    raised numpy's MemoryError; now its ΔW is refused before anything is generated, and factors past 2^30 on open."""
    path = edited(tmp_path, nola_module("q", 6, 10, k_a=1, k_b=1), base_shape)  # one basis each: within the generator limit
    assert path.stat().st_size < 6000
    outcome, _seconds, growth = bounded(path, action)
    assert outcome.startswith(words.format(path=path)), outcome
    assert growth < 100 << 10


def test_nola_generator_work_is_refused_on_open(tmp_path: Path) -> None:
    """2^20 coefficients (a few KiB of zstd) at rank 16 on a 4096² weight would generate 2^36 random values (hours)."""
    path = edited(tmp_path, nola_module("q", 64, 64, r=1, k_a=1 << 20), [4096, 4096], rank=16)
    assert path.stat().st_size < 1 << 16
    outcome, _seconds, _ = bounded(path)
    assert outcome.startswith(f"RecordError {path}: module 'q': k_A 1048576, k_B 4 at rank 16"), outcome
    assert f"need {16 * ((1 << 20) + 4) * 4096} random values, over the limit of {limits.MAX_NOLA_GENERATED}" in outcome


def test_rank_zero_record_lowered_to_lora_is_refused(tmp_path: Path) -> None:
    """A rank-0 svd record of shapes [0, 2^29], [0, 2^29+1] (no bytes at all) lowered to lora would need 2^30+1 zero elements."""
    out, inp = 1 << 29, (1 << 29) + 1
    m = Module("svd0", "svd", (out, inp), {"rank": 0}, {"S": np.zeros(0), "Ut": np.zeros((0, out)), "Vt": np.zeros((0, inp))})
    path = tmp_path / "zero.apack"
    adapterpack.save(Adapter(modules={"svd0": m}), path, codec="raw")
    outcome, _seconds, growth = bounded(path, "as_lora(m)")
    assert outcome.startswith("SizeLimitError module 'svd0': a rank-0 ΔW") and f"over the limit of {1 << 30}" in outcome
    assert growth < 200 << 10
    small = Module("z", "svd", (3, 5), {"rank": 0}, {"S": np.zeros(0), "Ut": np.zeros((0, 3)), "Vt": np.zeros((0, 5))})
    assert as_lora(small).delta().tolist() == np.zeros((3, 5)).tolist()


def test_delta_limit_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """prod(base_shape) == limit is computed, one more element is refused (the check reads the one constant)."""
    monkeypatch.setattr("adapterpack.adapter.MAX_DELTA_ELEMENTS", 24)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 6)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    ok = Module("ok", "lora", (4, 6), {"rank": 2, "alpha": 2.0}, {"A": a, "B": b})
    np.testing.assert_allclose(ok.delta(), b.astype(np.float64) @ a.astype(np.float64), rtol=1e-6)
    over = Module("over", "lora", (4, 7), {"rank": 2, "alpha": 2.0}, {"A": np.zeros((2, 7), np.float32), "B": b})
    with pytest.raises(errors.SizeLimitError, match=r"module 'over': a dense ΔW of shape \[4, 7\] holds 28 elements"):
        over.delta()


def test_nola_factor_limit_is_exact() -> None:
    """rank · (out + in) == 2^30 (the 1.1 limit) is accepted, one more refused; the error names the module."""
    enc = adapterpack.encodings.get_encoding("nola")
    enc.validate(nola_module("edge", 1 << 29, 1 << 29, k_a=1, k_b=1))
    with pytest.raises(errors.RankError, match=r"module 'over': rank 1 on a 536870912x536870913 weight"):
        enc.validate(nola_module("over", 1 << 29, (1 << 29) + 1, k_a=1, k_b=1))


def test_nola_generator_limit_is_exact() -> None:
    """rank · (k_A · in + k_B · out) == 2^30 is accepted, one more coefficient is refused."""
    assert limits.MAX_NOLA_GENERATED == 1 << 30
    enc = adapterpack.encodings.get_encoding("nola")
    enc.validate(nola_module("edge", 4096, 4096, r=8, k_a=1 << 14, k_b=1 << 14))
    with pytest.raises(errors.RecordError, match=rf"module 'over': .* need {(1 << 30) + 8 * 4096} random values"):
        enc.validate(nola_module("over", 4096, 4096, r=8, k_a=1 << 14, k_b=(1 << 14) + 1))


@pytest.mark.parametrize(
    ("out", "inp", "r", "k"),
    [(4096, 4096, 8, 4096), (28672, 8192, 16, 512), (28672, 8192, 16, 1536), (128256, 16384, 2048, 1)],
    ids=["4096-square-k4096", "70b-mlp-nola-recipe", "70b-mlp-3x-bases", "rank-2048-embedding"],
)
def test_real_nola_sizes_are_within_the_limits(out: int, inp: int, r: int, k: int) -> None:
    """Honest large adapters open: k=4096 at rank 8 on a 4096² weight (2^28 generated values), NOLA's LLaMA-2 70B recipe
    (rank 16, 512 bases: 3.0e8 on its MLP weights) and three times its bases, and rank 2048 on a 128256x16384
    embedding (3.0e8 factor elements, valid under the 1.1 spec's 2^30)."""
    adapterpack.encodings.get_encoding("nola").validate(nola_module("m", out, inp, r=r, k_a=k, k_b=k))


# --- defect 8: safetensors amplification -----------------------------------------------------------------


def empty_tensors_file(path: Path, count: int) -> Path:
    """A kohya-named safetensors file of ``count`` empty float32 tensors (no data bytes at all)."""
    entry = '"{0}.lora_down.weight":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = ("{" + ",".join(entry.format(i) for i in range(count)) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.mark.parametrize(
    ("count", "words"),
    [(1_100_000, "safetensors header of"), (200_000, "module '0' needs both lora_down and lora_up; found only 0.lora_down.weight")],
)
def test_many_empty_tensors_are_refused_before_per_tensor_objects(tmp_path: Path, count: int, words: str) -> None:
    """The issue's files (71 MB / 1.1M and 200k empty tensors took 2.8 GB and 747 MB on main before being refused):
    the first is over the header limit, the second a header within the limits whose tensors the importer refuses."""
    path = empty_tensors_file(tmp_path / "many.safetensors", count)
    outcome, _seconds, growth = bounded(path, timeout=120)  # the timeout bounds runaway work; no timed assert (noisy CI)
    assert outcome.startswith("InputError ") and words in outcome, outcome
    assert growth < 200 << 10


def safetensors_file(path: Path, header: dict[str, Any] | str, data: bytes = b"") -> Path:
    """A safetensors file of ``header`` (a dict as JSON, a str as it is) and ``data``."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def filled(entry: str, head: str, tail: str) -> str:
    """``head`` + numbered copies of ``entry`` (``%d``) + ``tail``: as many as the header limit holds."""
    out, n = [], len(head) + len(tail)
    while n + len(entry % len(out)) + 1 <= limits.MAX_SAFETENSORS_HEADER:
        out.append(entry % len(out))
        n += len(out[-1]) + 1
    return head + ",".join(out) + tail


@pytest.mark.parametrize(
    ("head", "entry", "tail", "words"),
    [
        ("{", '"%d":0', "}", "tensor '0' is not described by an object of at most 4096 characters"),
        ('{"t":{"dtype":{', '"%d":0', "}}}", "tensor 't' is not described by an object of at most 4096 characters"),
        ('{"__metadata__":{', '"%d":""', "}}", "more than 4096 metadata entries, over the limit"),
    ],
    ids=["scalar-entries", "nested-description", "metadata-entries"],
)
def test_hostile_headers_are_refused_in_bounded_memory(tmp_path: Path, head: str, entry: str, tail: str, words: str) -> None:
    """16 MiB headers of tiny JSON values (1.5M ``"i":0`` entries took 472 MB on main before being refused): each
    member is parsed and checked alone, so the refusal costs about the header's own bytes."""
    path = safetensors_file(tmp_path / "x.safetensors", filled(entry, head, tail))
    outcome, _seconds, growth = bounded(path)
    assert outcome == f"InputError {path}: {words}"
    assert growth < 3 * limits.MAX_SAFETENSORS_HEADER >> 10


def test_mixture_of_experts_header_is_read(tmp_path: Path) -> None:
    """An all-expert LoRA of Qwen3-235B-A22B: 94 layers x 128 experts x 3 projections x (A, B) = 72,192 tensors,
    more than main's limit of 65,536, which refused the PEFT files adapterpack itself writes for such an adapter."""
    names = [
        f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}.lora_{ab}.weight"
        for layer in range(94)
        for e in range(128)
        for proj in ("gate_proj", "up_proj", "down_proj")
        for ab in "AB"
    ]
    header = {n: {"dtype": "BF16", "shape": [1, 2], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)}
    path = safetensors_file(tmp_path / "moe.safetensors", header, bytes(4 * len(names)))
    got = read_header(path)
    assert len(got.tensors) == 72_192 and got.metadata is None
    assert got.tensors[names[-1]] == TensorEntry("BF16", (1, 2), 4 * 72_191, 4 * 72_192)


def test_tensor_count_limit_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As many tensors as the limit are read, one more is refused before its description is parsed."""
    monkeypatch.setattr("adapterpack.formats.safetensors_header.MAX_SAFETENSORS_TENSORS", 100)
    assert len(read_header(empty_tensors_file(tmp_path / "ok.safetensors", 100)).tensors) == 100
    with pytest.raises(errors.InputError, match="more than 100 tensors, over the limit"):
        read_header(empty_tensors_file(tmp_path / "over.safetensors", 101))


@pytest.mark.parametrize(
    ("header", "data", "words"),
    [
        ({"x.lora_down.weight": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 0]}}, b"", "needs 4398046511104 bytes"),
        ({"x.lora_down.weight": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4, "at most 8"),
        (
            {
                "a.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "a.lora_up.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps another tensor",
        ),
        ({"x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaves a gap"),
        ({"x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12, "the file holds 12"),
        ({"x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**70]}}, b"\0" * 4, "needs 4 bytes"),
        ({"x" * 3000 + ".lora_down.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, b"", "limit of 2048"),
        ('{"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"y":{}}}', b"", "not described by a flat JSON object"),
        ('{"x":{"dtype":"}","shape":[0],"data_offsets":[0,0]}}', b"", "not described by a flat JSON object"),
        ('{"x":{"dtype":"F32","shape":[' + "0," * 2100 + '0],"data_offsets":[0,0]}}', b"", "at most 4096 characters"),
        (
            '{"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
            b"",
            "named twice",
        ),
        ('{"__metadata__":{"a":1}}', b"", "metadata must be an object of strings (key 'a')"),
    ],
    ids=[
        "huge-shape-no-bytes",
        "ndim",
        "overlap",
        "gap",
        "trailing",
        "huge-offset",
        "long-name",
        "nested-object",
        "brace-in-string",
        "long-description",
        "duplicate-name",
        "metadata-not-string",
    ],
)
def test_inconsistent_safetensors_headers_are_refused(
    tmp_path: Path, header: dict[str, Any] | str, data: bytes, words: str
) -> None:
    path = safetensors_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(errors.InputError) as info:
        adapterpack.open(path)
    assert type(info.value) is errors.InputError and words in str(info.value), str(info.value)


def test_every_safetensors_reader_checks_the_header_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT folders (the weights file) and importance files go through the same checked header."""
    monkeypatch.setattr("adapterpack.formats.safetensors_header.MAX_SAFETENSORS_TENSORS", 100)
    folder = tmp_path / "peft"
    shutil.copytree(EXAMPLE, folder)
    empty_tensors_file(folder / "adapter_model.safetensors", 101)
    with pytest.raises(errors.InputError, match="more than 100 tensors, over the limit"):
        adapterpack.open(folder)
    from adapterpack.ops.importance import load_importance

    with pytest.raises(errors.InputError, match="more than 100 tensors, over the limit"):
        load_importance(folder / "adapter_model.safetensors")


# --- defect 5: ReDoS in rank_pattern / alpha_pattern ---------------------------------------------------------

REDOS = r"([a-z_.0-9]+)+X"


def test_redos_key_on_the_real_adapter_is_matched_in_bounded_time(tmp_path: Path) -> None:
    """The issue's key hung inspect and convert on the bundled adapter's module names; now it matches nothing, fast."""
    folder = tmp_path / "redos"
    shutil.copytree(EXAMPLE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {REDOS: 4}
    cfg["alpha_pattern"] = {REDOS: 3.0}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    for cmd in (["inspect", str(folder)], ["convert", str(folder), str(tmp_path / "out.apack")]):
        res = subprocess.run([sys.executable, "-m", "adapterpack", *cmd], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert res.returncode == 0, res.stderr
    with adapterpack.open(tmp_path / "out.apack") as ad:
        assert {m.params["rank"] for m in ad} == {cfg["r"]} and {m.params["alpha"] for m in ad} == {cfg["lora_alpha"]}


@pytest.mark.parametrize(
    ("key", "words"),
    [
        (r"(a)\1", "uses groupref"),
        (r"q_proj(?=x)", "uses assert"),
        (r"(?<!x)q_proj", "uses assert_not"),
        (r"(?>q)_proj", "uses atomic_group"),
        (r"q_pro+j", None),  # supported: no error
        (r"(?i:Q)_proj", "flags"),
        (r"x{1001}", "over the limit of 1000"),
        ("x" * (limits.MAX_PATTERN_LENGTH + 1), "over the limit of 4096"),
        ("(?:" + "|".join([r"\ba", r"\Ba"] * 500) + "){1000}", "needs more than the 1000000 steps"),
        ("(" * 101 + "q_proj" + ")" * 101, "nests groups 101 deep, over the limit of 100"),
        (r"q_proj(", "not a valid regular expression"),
    ],
)
def test_pattern_keys_beyond_the_matcher_are_refused_naming_the_key(key: str, words: str | None) -> None:
    name = "model.layers.0.self_attn.q_proj"
    if words is None:
        assert get_pattern_key([key], name) == key
        return
    with pytest.raises(errors.InputError) as info:
        get_pattern_key([key], "a" * 1000 if "steps" in words else name)
    assert type(info.value) is errors.InputError
    assert f"pattern {key!r:.200}" in str(info.value) and words in str(info.value), str(info.value)


HOSTILE_KEYS = {
    "nested": "(" * 500 + "q_proj" + ")" * 500,
    "boundaries": r"(?:(?:\b){1000}){199}",
    "boundary runs": r"(?:\b){1000}" * 100,
    "costly": "(?:" + "|".join([r"\ba", r"\Ba"] * 500) + "){1,1000}[ab]",
}


@pytest.mark.parametrize("what", HOSTILE_KEYS)
def test_hostile_keys_on_the_real_adapter_end_in_bounded_time(tmp_path: Path, what: str) -> None:
    """A nested key made inspect die of RecursionError; a 21-character one made it run for minutes (each step
    rebuilt a mask, a zero-width repeat ran all its counts); a costly key cost its budget once per module. Now
    inspect answers, or refuses with one line naming the key; the timeout only guards against a hang."""
    key = HOSTILE_KEYS[what]
    folder = tmp_path / "hostile"
    shutil.copytree(EXAMPLE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {key: 4}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "adapterpack", "inspect", str(folder)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    if what == "nested":
        assert res.returncode != 0 and res.stderr.strip().splitlines() == [
            f"adapterpack: adapter_config.json: pattern {key!r:.200} nests groups 500 deep, over the limit of 100"
        ], res.stderr
    else:
        assert res.returncode == 0, res.stderr  # matches no module name: every module keeps r
    names = [m.name for m in adapterpack.open(EXAMPLE)]
    assert len(names) == 120
    matched = sum(re.match(rf"(.*\.)?({key})$", n) is not None for n in names) if what != "nested" else 0
    assert matched == 0


def test_one_budget_for_all_the_modules_of_a_map() -> None:
    """A key costing well under the budget for one name is refused on the third: the budget is per map
    (one config's rank_pattern), not per match, so the work does not grow with the number of modules."""
    from adapterpack.formats.regex_match import Budget

    key = "(?:" + "|".join([r"\ba", r"\Ba"] * 500) + "){1,1000}X"
    names = ["a" * 150, "b." + "a" * 150, "c." + "a" * 150]
    budget = Budget()
    assert not matches(compile_key(key), names[0], budget) and budget.left > limits.MAX_PATTERN_STEPS // 2
    patterns = {key: 4}
    assert resolve(patterns, 8, names[0]) == 8 and resolve(patterns, 8, names[1]) == 8
    assert resolve(patterns, 8, names[0]) == 8  # answered again without matching again
    with pytest.raises(errors.InputError, match=f"pattern {re.escape(repr(key)[:200])} needs more than the 1000000 steps"):
        resolve(patterns, 8, names[2])
    assert resolve({key: 4}, 8, names[2]) == 8  # another map (another config) has its own budget


def test_deep_keys_match_up_to_the_limit_and_recursion_is_an_input_error() -> None:
    """100 nested groups match as re does; where the stack is shallower than a key needs, the RecursionError
    of the parser or of the matcher becomes the same one-line InputError naming the key."""
    key = "(" * 99 + "(a|b)+" + ")" * 99 + "c"
    for name in ("x.ababc", "c", "x.abd"):
        assert resolve({key: 1}, 0, name) == (re.match(rf"(.*\.)?({key})$", name) is not None)
    parsed, matched = "(" * 40 + "a" + ")" * 40 + "d", "(?:(" * 40 + "a" + ")*)*" * 40 + "e"
    compile_key(matched)  # parsed (and cached) at the normal limit: only its match runs short of stack
    limit, frames = sys.getrecursionlimit(), len(__import__("inspect").stack())
    for shallow, stage in ((parsed, "parsed"), (matched, "matched")):
        sys.setrecursionlimit(frames + 60)
        try:
            with pytest.raises(errors.InputError, match=f"pattern {re.escape(repr(shallow)[:200])} nests too deeply to be {stage}"):
                resolve({shallow: 1}, 0, "x.aae")
        finally:
            sys.setrecursionlimit(limit)


def test_peft_config_size_is_bounded(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    shutil.copytree(EXAMPLE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["notes"] = " " * limits.MAX_PEFT_CONFIG
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.InputError, match=f"adapter_config.json is over the limit of {limits.MAX_PEFT_CONFIG} bytes"):
        adapterpack.open(folder)


def test_empty_non_boundary_follows_the_running_python() -> None:
    """Python 3.14 made \\B match the empty string; the matcher asks the running re instead of assuming."""
    for key in (r"\B", r"(?:\B)*", r"a|\B"):
        assert matches(compile_key(key), "") == (re.match(rf"(.*\.)?({key})$", "") is not None)
    from adapterpack.formats import regex_match

    assert regex_match._EMPTY_NON_BOUNDARY == (re.fullmatch(r"\B", "") is not None)


def test_long_names_are_refused_only_for_non_literal_keys() -> None:
    name = "m." * 600 + "q_proj"
    assert resolve({"q_proj": 4}, 8, name) == 4  # literal: string operations, any length
    with pytest.raises(errors.InputError, match="module name of 1206 characters"):
        resolve({"q_pro+j": 4}, 8, name)


ATOMS = [
    "a",
    "b",
    ".",
    r"\.",
    "[ab]",
    "[^a]",
    r"\d",
    r"\w",
    r"\s",
    r"\W",
    r"\b",
    r"\B",
    "^",
    "$",
    r"\A",
    r"\Z",
    "_",
    "1",
    "\n",
    "[a-c.]",
]
NAMES = [
    "",
    "a",
    "ab",
    "a.b",
    "x.ab",
    "a\n",
    "a.b\n",
    "1a_",
    "a b",
    "..",
    "model.layers.0.q_proj",
    "\na.b",
    "a.\nb",
    "ba.a.a",
    "é.b",
]


def _random_key(rnd: random.Random, depth: int = 0) -> str:
    """A random key over the supported syntax: concatenation, alternation, groups, every kind of repetition."""
    kind = rnd.randrange(7) if depth < 3 else 0
    if kind == 0:
        return rnd.choice(ATOMS)
    if kind == 6:
        return rnd.choice(ATOMS) + rnd.choice(["*", "+", "?"])
    a, b, c = (_random_key(rnd, depth + 1) for _ in range(3))
    if kind == 1:
        return a + b + c
    if kind == 2:
        return f"({a}|{b})"
    if kind == 3:
        return f"(?:{a}){rnd.choice(['*', '+', '?', '*?', '+?', '{2}', '{1,3}', '{0,2}', '{2,}'])}"
    return f"({a})" if kind == 4 else f"(?:{a}|{b}{c})+"


def test_matcher_agrees_with_python_re() -> None:
    """PEFT's rule is re.match(rf"(.*\\.)?({key})$", name): the bounded matcher gives the same answer on random keys."""
    rnd = random.Random(12)
    checked = 0
    for _ in range(1500):
        key = _random_key(rnd)
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error:
            continue
        compiled = compile_key(key)
        for name in [*NAMES, "".join(rnd.choice("ab._1\n x") for _ in range(rnd.randrange(9)))]:
            assert matches(compiled, name) == (re.match(rf"(.*\.)?({key})$", name) is not None), (key, name)
            checked += 1
    assert checked > 15_000


@pytest.mark.parametrize(
    "key", ["q_proj", "self_attn.q_proj", "0.self_attn.q_proj", "^model\\.layers\\.0\\.self_attn\\.q_proj", "", "a)(b"]
)
def test_literal_keys_follow_pythons_rule(key: str) -> None:
    for name in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "q_proj",
        "xq_proj",
        "q_proj\n",
        "a.b",
        "a",
    ]:
        assert matches(compile_key(key), name) == (re.match(rf"(.*\.)?({key})$", name) is not None), (key, name)


def test_key_sets_agree_with_peft() -> None:
    """resolve() looks fixed-text keys up by suffix and matches the rest in order: on random maps mixing both,
    the key it picks is the first one PEFT's re.match picks (keys of the hostile tests included)."""
    rnd = random.Random(5)
    extra = [HOSTILE_KEYS["boundaries"], HOSTILE_KEYS["boundary runs"], r"\B", r"(?:\b)*a", r"\.", "^", "^a.b"]
    for _ in range(400):
        keys = []
        for _ in range(rnd.randrange(1, 5)):
            if rnd.random() < 0.6:
                keys.append(
                    ("^" if rnd.random() < 0.2 else "")
                    + "".join(rnd.choice(["a", "b", ".", r"\.", "_", "\n"]) for _ in range(rnd.randrange(5)))
                )
            else:
                keys.append(rnd.choice(extra) if rnd.random() < 0.3 else _random_key(rnd))
        try:
            for k in keys:
                re.compile(rf"(.*\.)?({k})$")
        except re.error:
            continue
        patterns = {k: i for i, k in enumerate(keys)}
        for name in [*NAMES, "".join(rnd.choice("ab._\n") for _ in range(rnd.randrange(7)))]:
            expected = patterns.get(next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), name), -1)
            assert resolve(patterns, -1, name) == expected, (keys, name)


PY310 = """
import re, sys, types
for pkg, sub in (("adapterpack", ""), ("adapterpack.formats", "/formats")):  # their __init__s import numpy
    mod = types.ModuleType(pkg)
    mod.__path__ = [sys.argv[1] + "/adapterpack" + sub]
    sys.modules[pkg] = mod
from adapterpack.formats.patterns import resolve
keys = ["q_pro+j", r"\\bk\\B_proj", "(a|b)+[.]c", "v_proj"]
names = ["model.layers.0.self_attn.q_proj", "a.k_proj", "ab.c", "x.v_proj", "v_proj.x"]
print([resolve({k: i for i, k in enumerate(keys)}, -1, n) for n in names])
print([next((i for i, k in enumerate(keys) if re.match(rf"(.*\\.)?({k})$", n)), -1) for n in names])
"""


def _python_310() -> str | None:
    """A working Python 3.10 interpreter: on the PATH, or one pyenv installed."""
    for exe in [shutil.which("python3.10"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10")))]:
        if exe and subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
            return exe
    return None


def test_patterns_import_and_match_on_python_310() -> None:
    """pyproject says Python >= 3.10, where re's parser is sre_parse: importing the matcher failed there."""
    exe = _python_310()
    if exe is None:
        pytest.skip("no Python 3.10 on this machine")
    res = subprocess.run([exe, "-c", PY310, str(REPO)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got, expected = res.stdout.splitlines()
    assert got == expected == "[0, 1, 2, 3, -1]"


# --- defect 6: a bank's shared bases, referenced by every member, are decoded once ------------------------


def test_shared_bases_are_decoded_once_for_all_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every member of a bank references the same compressed U and V blobs; reading all members' ΔW decodes
    each of them once (decoding per reference would amplify a small file's work by the member count)."""
    from adapterpack.bank.store import Bank, BankMember, BankModule, write_bank
    from adapterpack.codecs.base import Codec
    from adapterpack.container import ApackReader

    rng = np.random.default_rng(1)
    u, v = np.tile([0.5, 1.0, -2.0], (200, 1)), np.tile([0.25, 3.0, 1.5], (150, 1))  # compressible: stored as zstd
    members = [BankMember(f"m{j}", {"q": rng.standard_normal(3)}) for j in range(5)]
    path = tmp_path / "bank.apack"
    write_bank(path, Bank({"q": BankModule("q", u, v, "diagonal")}, members), codec="zstd")
    decoded: list[int] = []
    original = Codec.decode_new

    def counting(self: Codec, stored: Any, length: int, itemsize: int) -> bytearray:
        decoded.append(length)
        return original(self, stored, length, itemsize)

    monkeypatch.setattr(Codec, "decode_new", counting)
    with ApackReader(path) as reader:
        assert [b.codec_id for b in reader.blobs[:2]] == ["zstd", "zstd"]
        for j, mem in enumerate(members):
            got = reader.adapter(f"m{j}").delta("q")
            np.testing.assert_allclose(got, (u * mem.S["q"]) @ v.T, rtol=1e-12)
    assert sorted(decoded) == sorted([u.nbytes, v.nbytes])  # U and V once each (each member's 3 values of S are raw)
