"""Memory stays bounded where no limit of spec §7 applies: allocations that fail are adapterpack errors.

Each case runs in a child process whose address space is capped (RLIMIT_AS) a fixed amount above
what it holds after its imports, so an allocation the code does not bound fails there instead of
exhausting the machine, and what the child prints (never a traceback) is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack import limits
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader, index
from adapterpack.container.writer import write_apack
from tests.apack_builders import assemble

REPO = Path(__file__).resolve().parents[1]

CAPPED = """
import resource, sys
sys.path.insert(0, {repo!r})
import numpy as np
import adapterpack
from adapterpack.errors import AdapterpackError
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + ({headroom_mib} << 20), resource.RLIM_INFINITY))
"""


def capped(body: str, *args: str, headroom_mib: int = 1024, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a child capped at ``headroom_mib`` MiB of address space above its imports."""
    script = textwrap.dedent(CAPPED).format(repo=str(REPO), headroom_mib=headroom_mib) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


# --- a dense ΔW the process cannot allocate ------------------------------------------------------------


def test_delta_out_of_memory_is_a_size_limit_error(tmp_path: Path) -> None:
    """A rank-1 lora on a 20000² weight: its ΔW (1.6 GB of float32) is under MAX_DELTA_ELEMENTS but over the cap;
    delta() raised numpy's _ArrayMemoryError, now SizeLimitError naming the module and the bytes it needed."""
    n = 20000
    rng = np.random.default_rng(0)
    tensors = {"A": rng.standard_normal((1, n)).astype(np.float16), "B": rng.standard_normal((n, 1)).astype(np.float16)}
    m = Module("model.layers.0.mlp.x", "lora", (n, n), {"rank": 1, "alpha": 1.0}, tensors)
    path = tmp_path / "edge.apack"
    adapterpack.save(Adapter(modules={m.name: m}), path, codec="raw")
    res = capped(
        """
        ad = adapterpack.open(sys.argv[1])
        try:
            ad.delta("model.layers.0.mlp.x")
        except AdapterpackError as e:
            print(type(e).__name__, e)
        """,
        str(path),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == (
        f"SizeLimitError module 'model.layers.0.mlp.x': out of memory computing a dense ΔW of shape [{n}, {n}] "
        f"({n * n * 4} bytes in float32)"
    )


def test_cli_prints_memory_error_on_one_line(tmp_path: Path) -> None:
    """A MemoryError anywhere under a command (here: numpy failing to allocate 16 GiB while inspect summarizes a
    module) is one line ``adapterpack: out of memory (...)`` and exit status 1, never a traceback."""
    m = Module("q", "lora", (4, 3), {"rank": 1, "alpha": 1.0}, {"A": np.ones((1, 3), np.float32), "B": np.ones((4, 1), np.float32)})
    path = tmp_path / "small.apack"
    adapterpack.save(Adapter(modules={"q": m}), path, codec="raw")
    res = capped(
        """
        from adapterpack.adapter import Module
        from adapterpack.cli import main
        Module.summary = lambda self: np.ones(1 << 31)
        main(["inspect", sys.argv[1]])
        """,
        str(path),
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adapterpack: out of memory (Unable to allocate 16.0 GiB"), lines


# --- shared blobs decoded once, in bounded memory ------------------------------------------------------


def test_shared_blob_cache_is_bounded(tmp_path: Path) -> None:
    """Two adapters reference the same eight zstd blobs of 64 MiB of zeros (a small file): reading every tensor of
    one, each dropped after use, kept all 512 MiB decoded (a MemoryError under the cap); now the reader keeps at
    most SHARED_CACHE_BYTES of them, so the child's peak stays under the cached cap plus two blobs."""
    from adapterpack.limits import SHARED_CACHE_BYTES
    from tests.apack_builders import split, write

    out, inp, rank, n = 1 << 18, 8, 64, 8
    modules = {}
    for i in range(n):
        v, s = np.full((inp, rank), i, np.float32), np.eye(rank, dtype=np.float32)
        tensors = {"U": np.zeros((out, rank), np.float32), "V": v, "S": s}
        modules[f"m{i}"] = Module(f"m{i}", "shared", (out, inp), {"rank": rank, "form": "full"}, tensors)
    src = tmp_path / "src.apack"
    adapterpack.save(Adapter(name="a", modules=modules), src, codec="zstd")
    parts = split(src.read_bytes())
    parts.index["adapters"].append(parts.index["adapters"][0] | {"name": "b"})
    path = write(tmp_path / "shared.apack", parts.build(minor=parts.minor))
    assert path.stat().st_size < 1 << 20
    res = capped(
        """
        from adapterpack.container import ApackReader
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with ApackReader(sys.argv[1]) as reader:
            for m in reader.adapter("a"):
                assert not m.array("U").any()
            u = reader.adapter("a").module("m7").array("U")  # held here: the other adapter reuses it, no second decode
            assert np.shares_memory(reader.adapter("b").module("m7").array("U"), u)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) << 10)
        """,
        str(path),
        headroom_mib=448,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout) < SHARED_CACHE_BYTES + 2 * out * rank * 4


# --- the index: counted from its bytes before it is parsed --------------------------------------------

TRICKY = [
    b"{}",
    b'{"a":[{}]}',
    rb'{"[[\"[":"]]\\","b":[["{\\\"}"]]}',
    rb'{"a":"\\\\\\\\","b":[1,[2,{"c,":"}\"{,"}]],"d":"\\","e":[[],{},"\\\"[,"]}',
    b'{"x":[' + b",".join([b'"\\\\\\\\\\"]"', b"[]", b'{"k":[0,1]}'] * 5) + b"]}",
]


def _reference(obj: object, level: int = 1) -> tuple[int, int, int]:
    """(depth, containers, values) of parsed JSON: values are containers plus commas (n − 1 in a container of n)."""
    if isinstance(obj, dict | list):
        items = list(obj.values()) if isinstance(obj, dict) else obj
        inner = [_reference(v, level + 1) for v in items]
        depth = max([level] + [d for d, _, _ in inner])
        containers = 1 + sum(c for _, c, _ in inner)
        return depth, containers, 1 + max(len(items) - 1, 0) + sum(v for _, _, v in inner)
    return 0, 0, 0


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1 << 20])
def test_json_shape_is_exact_at_every_chunk_boundary(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked scan carries depth and string state across chunks: any chunk size (a chunk ending inside a run of
    backslashes, between a backslash and the quote it escapes) gives the figures of the parsed JSON."""
    monkeypatch.setattr(index, "_CHUNK", chunk)
    for data in TRICKY:
        shape = index.json_shape(data)
        assert (shape.depth, shape.containers, shape.values) == _reference(json.loads(data)), data


def _hostile(tmp_path: Path, junk: bytes, n: int) -> Path:
    """A valid file with no blobs whose index holds an unknown key listing ``n`` copies of ``junk``."""
    head = b'{"adapters":[{"name":"default","modules":[],"tensors":[]}],"blobs":[],"junk":['
    path = tmp_path / "junk.apack"
    path.write_bytes(assemble(head + b",".join([junk] * n) + b"]}", minor=2))
    return path


@pytest.mark.parametrize(
    ("junk", "n", "words"),
    [
        (b"{}", limits.MAX_JSON_CONTAINERS, f"arrays and objects, over the limit of {limits.MAX_JSON_CONTAINERS}"),
        (b'"ab"', limits.MAX_JSON_VALUES, f"values, over the limit of {limits.MAX_JSON_VALUES}"),
    ],
    ids=["containers", "values"],
)
def test_index_of_tiny_json_values_is_refused_before_parsing(tmp_path: Path, junk: bytes, n: int, words: str) -> None:
    """An index of millions of tiny JSON values (text 3-5 bytes each, tens to hundreds once parsed) was parsed whole
    (and its depth computed with index-sized int32 arrays): numpy's MemoryError under the cap. Now its containers
    and values are counted from its bytes in O(chunk) memory and the index refused before json.loads."""
    path = _hostile(tmp_path, junk, n)
    res = capped(
        """
        try:
            adapterpack.open(sys.argv[1])
        except AdapterpackError as e:
            print(type(e).__name__, e)
        """,
        str(path),
        headroom_mib=256,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"IndexFormatError {path}: index JSON holds "), res.stdout
    assert res.stdout.strip().endswith(words)


def _densest(tmp_path: Path, mods: dict[str, Module]) -> tuple[float, float]:
    """(containers, values) of the index adapterpack writes for ``mods``, grown to the largest index allowed, as
    fractions of the JSON count limits: the denser of its two forms, plain (every BLOB key written) and compressed
    (1.5: BLOB offsets and lengths left out, so more records to a byte of text)."""
    dens = []
    for zstd_index in (False, True):
        path = tmp_path / f"dense-{zstd_index}.apack"
        write_apack(path, Adapter(modules=mods), codec="raw", zstd_index=zstd_index)
        with ApackReader(path) as reader:
            assert reader.preamble.implied is zstd_index
            data = reader.index._data
        shape, scale = index.json_shape(data), limits.MAX_INDEX_LENGTH / len(data)
        dens.append((shape.containers * scale / limits.MAX_JSON_CONTAINERS, shape.values * scale / limits.MAX_JSON_VALUES))
    return max(d[0] for d in dens), max(d[1] for d in dens)


def test_densest_written_index_fits_the_json_limits(tmp_path: Path) -> None:
    """An index adapterpack writes (one-character module names, 1x1 weights, three blobs of its own a record), grown
    to the largest index allowed, stays under both JSON count limits with room to spare."""

    def own() -> dict[str, np.ndarray]:
        return {"U": np.ones((1, 1), np.float16), "V": np.ones((1, 1), np.float16), "S": np.ones((1, 1), np.float16)}

    mods = {f"{i}": Module(f"{i}", "shared", (1, 1), {"rank": 1, "form": "full"}, own()) for i in range(2000)}
    containers, values = _densest(tmp_path, mods)
    assert containers < 0.55 and values < 0.8, (containers, values)


def test_densest_written_index_of_shared_blobs_fits_the_json_limits(tmp_path: Path) -> None:
    """Records that reference blobs others hold too (the writer stores a blob several slots hold once) carry no blob
    entries of their own: the densest index (1x1 lora records sharing one A and one B) grown to the largest index
    allowed still stays under both limits (spec §7: about 60 % and 90 % of them)."""
    ab = {"A": np.ones((1, 1), np.float16), "B": np.ones((1, 1), np.float16)}
    mods = {f"{i}": Module(f"{i}", "lora", (1, 1), {"rank": 1, "alpha": 1}, ab) for i in range(2000)}
    containers, values = _densest(tmp_path, mods)
    assert containers < 0.65 and values < 0.95, (containers, values)
