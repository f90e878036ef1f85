"""Codec sizes on real adapters against ZipNN and pcodec, and codec speed on the 7B-shaped adapter.

Installs nothing. ZipNN and pcodec (``pip install zipnn pcodec``; pcodec is also adapterpack's own
dependency, for the ``pco`` codec) are measured when they import, and reported missing otherwise.

**Sizes** (exact, deterministic). Every real adapter found — the bundled example, the r=64 one
(``~/.cache/adapterpack/rerank-r64``), the bank LoRAs (``~/.cache/adapterpack/bank-loras/lora*``) —
and the bundled example truncated by its exact SVD to ranks 1, 2 and 4 (``--ranks``: small adapters, where the
index and per-tensor headers weigh most) — cast to fp32, fp16 and bf16 (bf16 rounds to nearest even), then for
each codec the ``.apack`` that
``adapterpack.save(adapterpack.open(peft_folder), codec=...)`` writes at the codec's default level:

- *whole*: the file's bytes (preamble, index, padding and blobs);
- *payload*: the blobs' stored bytes alone (the writer keeps a blob raw where a codec would not make it smaller).

The peers are payload only, headers not counted, each tensor compressed on its own as the
shared notes measure them: ZipNN ``ZipNN(input_format="byte", bytearray_dtype=...)`` (a fresh
object per call: one object reused gave wrong bytes; and a copy of the bytes each time: its ``compress``
regroups the bytes of its input in place, even of a ``bytes`` object, in fp32 and bf16) and pcodec
``standalone.simple_compress(values, ChunkConfig())`` (bf16 as uint16, the others as floats).

**Speed** on the SYNTHETIC 7B-shaped adapter (:mod:`tools.bench.synthetic`): decoded MB (10^6 bytes)
per second, median of ``--repeats``, one thread, each codec alone on every tensor in memory; wall
time and the thread's CPU time (per core: what the codec costs where other processes share the
cores). ``load`` is ``adapterpack.open`` + decode + CRC-32C + touch, page cache warm. The peers'
decode is timed the same way (pcodec ``simple_decompress_into``, ZipNN ``decompress``).

Run from the repository root::

    python -m tools.bench.bench_codecs            # sizes on every real adapter + speed (32 layers)
    python -m tools.bench.bench_codecs --quick    # 4-layer synthetic, 2 repeats
    python -m tools.bench.bench_codecs --sizes-only / --speed-only
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack import codecs, dtypes
from adapterpack.container import ApackReader
from adapterpack.ops.convert import effective_level

from . import common, synthetic

CODECS = ("raw", "zstd", "byteplanes", "pco")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
CACHE = Path.home() / ".cache" / "adapterpack"
ZIPNN_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


# --- inputs ------------------------------------------------------------------------------------------


def missing_adapters() -> list[str]:
    """The real adapters :func:`real_adapters` looks for and does not find, with the fixture that trains them."""
    out = []
    if not (CACHE / "rerank-r64" / common.PEFT_WEIGHTS).is_file():
        out.append("r=64 (python -m tools.experiments.rerank_fixture)")
    if not any((p / common.PEFT_WEIGHTS).is_file() for p in (CACHE / "bank-loras").glob("lora*")):
        out.append("the bank LoRAs (python -m tools.fixtures.train_bank --n 5)")
    return out


def real_adapters() -> list[tuple[str, Path]]:
    """(name, PEFT folder) of every real adapter present: bundled, r=64, bank LoRAs (unfinished ``*.tmp`` skipped)."""
    found = [("bundled r=8", common.example_dir())]
    r64 = CACHE / "rerank-r64"
    if (r64 / common.PEFT_WEIGHTS).is_file():
        found.append(("r=64", r64))
    bank = CACHE / "bank-loras"
    if bank.is_dir():
        found += [(f"bank {p.name}", p) for p in sorted(bank.glob("lora*")) if (p / common.PEFT_WEIGHTS).is_file()]
    return found


# --- peers -------------------------------------------------------------------------------------------


def _zipnn() -> Any:
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    return ZipNN


def _pcodec() -> Any:
    try:
        import pcodec
    except ImportError:
        return None
    return pcodec


def _pcodec_values(a: np.ndarray) -> np.ndarray:
    """What pcodec is given: bf16 as uint16 (it has no bf16 type), other floats as themselves, 1-D."""
    a = np.ascontiguousarray(a)
    return (a.view(np.uint16) if dtypes.of_array(a).name == "bfloat16" else a).reshape(-1)


def zipnn_compress(a: np.ndarray) -> bytes | None:
    """ZipNN's stored bytes for one float tensor (fresh object per call); None for a dtype it has no mode for."""
    ZipNN = _zipnn()
    mode = ZIPNN_DTYPE.get(dtypes.of_array(a).name)
    if ZipNN is None or mode is None:
        return None
    return bytes(ZipNN(input_format="byte", bytearray_dtype=mode).compress(bytearray(np.ascontiguousarray(a).tobytes())))


def pcodec_compress(a: np.ndarray) -> bytes | None:
    pcodec = _pcodec()
    if pcodec is None or not dtypes.of_array(a).is_float:
        return None
    return bytes(pcodec.standalone.simple_compress(_pcodec_values(a), pcodec.ChunkConfig()))


def peer_payload(arrs: list[np.ndarray], peer: str) -> int | None:
    """Sum of a peer's stored bytes over every tensor (raw bytes where it has no mode or does not shrink it);
    None when the peer is not installed."""
    if (_zipnn() if peer == "zipnn" else _pcodec()) is None:
        return None
    compress = zipnn_compress if peer == "zipnn" else pcodec_compress
    total = 0
    for a in arrs:
        s = compress(a)
        total += a.nbytes if s is None else min(len(s), a.nbytes)
    return total


# --- sizes -------------------------------------------------------------------------------------------


def apack_sizes(path: Path) -> tuple[int, int]:
    """(whole file bytes, payload = sum of stored blob bytes)."""
    r = ApackReader(path)
    try:
        return path.stat().st_size, sum(b.stored_length for b in r.blobs)
    finally:
        r.close()


def truncated_adapters(work: Path, ranks: Sequence[int]) -> list[tuple[str, Path]]:
    """(name, PEFT folder) of the bundled example re-ranked to each rank by its exact SVD (``adapterpack rerank --rank
    K --to peft``: the lora factors of the trained ΔW's best rank-K approximation), written under ``work``."""
    from adapterpack.ops.rerank import RerankPolicy, rerank_file

    out = []
    for k in ranks:
        folder = work / f"bundled-rank{k}"
        rerank_file(common.example_dir(), folder, RerankPolicy(rank=k), to="peft", force=True)
        out.append((f"bundled r=8 → rank {k} (SVD)", folder))
    return out


def measure_sizes(work: Path, level: int | None, ranks: Sequence[int] = (1, 2, 4)) -> list[dict[str, Any]]:
    """One row per (real adapter, dtype): every codec's whole and payload bytes, and both peers' payloads."""
    rows = []
    for name, src in real_adapters() + truncated_adapters(work, ranks):
        for dt in DTYPE_NAMES:
            folder = common.cast_peft(src, work / f"{src.name}-{dt}", dt)
            ad = adapterpack.open(folder)
            arrs = common.decode_all(ad)
            row: dict[str, Any] = {"adapter": name, "dtype": dt, "tensors": len(arrs), "decoded_bytes": sum(a.nbytes for a in arrs)}
            for codec in CODECS:
                path = work / f"{src.name}-{dt}-{codec}.apack"
                adapterpack.save(ad, path, codec=codec, level=level)
                row[f"{codec}_whole"], row[f"{codec}_payload"] = apack_sizes(path)
                path.unlink()
            row["zipnn_payload"] = peer_payload(arrs, "zipnn")
            row["pcodec_payload"] = peer_payload(arrs, "pcodec")
            rows.append(row)
            print(f"  sizes: {name} {dt} done", flush=True)
    return rows


def render_sizes(rows: list[dict[str, Any]], what: str) -> str:
    """``what`` = whole or payload: each codec's bytes, the peers' payloads, and pco against the better peer."""

    def n(x: int | None) -> str:
        return "—" if x is None else f"{x:,}"

    table = []
    for r in rows:
        peers = [p for p in (r["zipnn_payload"], r["pcodec_payload"]) if p is not None]
        best = min(peers) if peers else None
        vs = "—" if best is None else f"**{r[f'pco_{what}'] / best:.4f}**"
        table.append([r["adapter"], r["dtype"], r["tensors"], *(n(r[f"{c}_{what}"]) for c in CODECS),
                      n(r["zipnn_payload"]), n(r["pcodec_payload"]), vs])
    headers = ["adapter", "dtype", "tensors", *(f"{c} {what}" for c in CODECS), "ZipNN payload", "pcodec payload",
               f"pco {what} / best peer"]
    return common.markdown_table(headers, table, "llr" + "r" * len(CODECS) + "rrr")


# --- speed -------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median thread CPU seconds) of ``fn`` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            w, c = time.perf_counter(), time.thread_time()
            fn()
            cpus.append(time.thread_time() - c)
            walls.append(time.perf_counter() - w)
        finally:
            gc.enable()
    return common.median(walls), common.median(cpus)


def _rates(total: int, stored: int, encode: Callable[[], object], decode: Callable[[], object],
           repeats: int) -> dict[str, float]:
    """Encode and decode MB/s (wall and thread CPU) of ``total`` decoded bytes stored in ``stored`` bytes."""
    ew, ec = _timed(encode, max(1, repeats // 2))
    dw, dc = _timed(decode, repeats)
    mb = total / common.MB
    return {"stored": stored, "encode_mb_s": mb / ew, "encode_cpu_mb_s": mb / ec, "decode_mb_s": mb / dw,
            "decode_cpu_mb_s": mb / dc}


def codec_speed(arrs: list[np.ndarray], codec: str, level: int | None, repeats: int) -> dict[str, float]:
    """Encode and decode MB/s (wall and CPU) of one codec over all arrays, in memory; checks the round trip."""
    c = codecs.get_codec({"id": codec} if level is None else {"id": codec, "level": level})
    items = [(dtypes.as_bytes(a), dtypes.of_array(a).itemsize) for a in arrs]
    total = sum(len(d) for d, _ in items)
    stored = [c.encode(d, k) for d, k in items]
    outs = [bytearray(len(d)) for d, _ in items]

    def encode() -> None:
        for d, k in items:
            c.encode(d, k)

    def decode() -> None:
        for s, (_, k), out in zip(stored, items, outs):
            c.decode(memoryview(s), memoryview(out), k)

    decode()
    if any(bytes(out) != bytes(d) for (d, _), out in zip(items, outs)):
        raise SystemExit(f"{codec} did not round-trip")
    return _rates(total, sum(map(len, stored)), encode, decode, repeats)


def peer_speed(arrs: list[np.ndarray], peer: str, repeats: int) -> dict[str, float] | None:
    """The same for a peer (None if not installed); checks its round trip too."""
    total = sum(a.nbytes for a in arrs)
    if peer == "pcodec":
        pcodec = _pcodec()
        if pcodec is None:
            return None
        vals = [_pcodec_values(a) for a in arrs]
        stored = [bytes(pcodec.standalone.simple_compress(v, pcodec.ChunkConfig())) for v in vals]
        outs = [np.empty_like(v) for v in vals]

        def decode() -> None:
            for s, o in zip(stored, outs):
                pcodec.standalone.simple_decompress_into(s, o)

        def encode() -> None:
            for v in vals:
                pcodec.standalone.simple_compress(v, pcodec.ChunkConfig())

        decode()
        ok = all(o.tobytes() == v.tobytes() for o, v in zip(outs, vals))
    else:
        ZipNN = _zipnn()
        if ZipNN is None:
            return None
        mode = ZIPNN_DTYPE[dtypes.of_array(arrs[0]).name]
        raw = [np.ascontiguousarray(a).tobytes() for a in arrs]
        # one thread, so that its cost is the calling thread's CPU time (ZipNN's default is every core)
        stored = [bytes(ZipNN(input_format="byte", bytearray_dtype=mode, threads=1).compress(bytearray(b))) for b in raw]
        got: list[bytes] = []

        def decode() -> None:
            got.clear()
            got.extend(bytes(ZipNN(input_format="byte", bytearray_dtype=mode, threads=1).decompress(s)) for s in stored)

        def encode() -> None:
            for b in raw:
                ZipNN(input_format="byte", bytearray_dtype=mode, threads=1).compress(bytearray(b))

        decode()
        ok = got == raw
    if not ok:
        raise SystemExit(f"{peer} did not round-trip")
    return _rates(total, sum(map(len, stored)), encode, decode, repeats)


def load_speed(path: Path, repeats: int) -> float:
    """MB/s of adapterpack.open + decode + verify + touch, page cache warm."""
    common.warm_page_cache([path])
    total = adapterpack.open(path).decoded_bytes

    def load() -> object:
        arrs = common.decode_all(adapterpack.open(path, verify=True))
        common.touch(arrs)
        return arrs

    return total / common.median(common.interleaved({"load": load}, repeats)["load"]) / common.MB


def measure_speed(work: Path, layers: int, repeats: int, level: int | None) -> list[dict[str, Any]]:
    """One row per (dtype, codec or peer) on the synthetic adapter."""
    rows = []
    for dt in DTYPE_NAMES:
        ad = synthetic.build_adapter(dt, layers=layers)
        arrs = [np.asarray(t) for m in ad.modules.values() for t in m.tensors.values()]
        decoded = sum(a.nbytes for a in arrs)
        for codec in CODECS:
            path = work / f"synthetic-{dt}-{codec}.apack"
            adapterpack.save(ad, path, codec=codec, level=level)
            row = {"dtype": dt, "codec": codec, "level": effective_level(codec, level), "decoded_bytes": decoded}
            row |= codec_speed(arrs, codec, level, repeats)
            row["whole"] = path.stat().st_size
            row["load_mb_s"] = load_speed(path, repeats)
            path.unlink()
            rows.append(row)
        for peer in ("ZipNN", "pcodec"):
            got = peer_speed(arrs, peer.lower() if peer == "pcodec" else "zipnn", repeats)
            if got is not None:
                rows.append({"dtype": dt, "codec": f"{peer} (peer)", "level": None, "decoded_bytes": decoded, "whole": None,
                             "load_mb_s": None} | got)
        print(f"  speed: {dt} done", flush=True)
    return rows


def pco_breakdown(layers: int, repeats: int) -> list[dict[str, Any]]:
    """Where pco's decode time goes on the synthetic adapter: thread-CPU MB/s of each step, every tensor in turn.

    ``engine`` is Pco alone (chunk metadata + page decode from ready ``bytes``: the floor for this codec),
    ``engine + unrotate`` adds the sign un-rotation right after each page (cache-hot, as in the codec),
    ``pco codec`` is ``Pco.decode_into`` on a memoryview (adds the checks, parsing and the one page copy),
    ``pcodec peer`` is ``standalone.simple_decompress_into`` on the unrotated values, and ``pcodec peer from a
    view`` is the same given the stored bytes as a memoryview, as a reader of a mapped file holds them (pcodec reads
    ``bytes`` objects only, so they are copied first).
    """
    pcodec = _pcodec()
    if pcodec is None:
        return []
    rows = []
    for dt in DTYPE_NAMES:
        ad = synthetic.build_adapter(dt, layers=layers)
        rows.append({"dtype": dt} | _pco_steps([np.asarray(t) for m in ad.modules.values() for t in m.tensors.values()],
                                               repeats, pcodec))
        print(f"  pco breakdown: {dt} done", flush=True)
    return rows


def _pco_steps(arrs: list[np.ndarray], repeats: int, pcodec: Any) -> dict[str, float]:
    """The five timings of :func:`pco_breakdown` for one list of arrays (checks the codec's round trip)."""
    from adapterpack.codecs import pco as pco_codec

    k = dtypes.of_array(arrs[0]).itemsize
    kind, npdt = pco_codec._TYPES[k]
    codec = pco_codec.Pco()
    raws = [dtypes.as_bytes(a) for a in arrs]
    stored = [codec.encode(r, k) for r in raws]
    parts = []
    for s in stored:
        fd, pos = pcodec.wrapped.FileDecompressor.new(s)
        _, used = fd.chunk_decompressor(s[pos:], kind)
        parts.append((fd, s[pos : pos + used], s[pos + used :]))
    outs = [bytearray(len(r)) for r in raws]
    dsts = [np.frombuffer(o, npdt) for o in outs]
    views = [(memoryview(s), memoryview(o)) for s, o in zip(stored, outs)]
    vals = [np.ascontiguousarray(_pcodec_values(a)).reshape(-1) for a in arrs]
    peer = [bytes(pcodec.standalone.simple_compress(v, pcodec.ChunkConfig())) for v in vals]
    peer_out = [np.empty_like(v) for v in vals]
    peer_views = [memoryview(s) for s in peer]

    def engine(unrotate: bool) -> Callable[[], None]:
        def run() -> None:
            for (fd, meta, page), d in zip(parts, dsts):
                cd, _ = fd.chunk_decompressor(meta, kind)
                cd.read_page_into(page, len(d), d)
                if unrotate:
                    pco_codec.unrotate_inplace(d)
        return run

    def full() -> None:
        for s, o in views:
            codec.decode_into(s, o, k)

    def peer_run() -> None:
        for s, o in zip(peer, peer_out):
            pcodec.standalone.simple_decompress_into(s, o)

    def peer_from_view() -> None:
        for s, o in zip(peer_views, peer_out):
            pcodec.standalone.simple_decompress_into(bytes(s), o)

    full()
    if any(bytes(o) != bytes(r) for o, r in zip(outs, raws)):
        raise SystemExit("pco did not round-trip")
    total = sum(map(len, raws)) / common.MB
    return {name: total / _timed(fn, repeats)[1] for name, fn in (
        ("engine", engine(False)), ("engine + unrotate", engine(True)), ("pco codec", full), ("pcodec peer", peer_run),
        ("pcodec peer from a view", peer_from_view))}


def render_speed(rows: list[dict[str, Any]]) -> str:
    def f(x: float | None) -> str:
        return "—" if x is None else f"{x:,.0f}"

    table = [[r["dtype"], r["codec"], f"{r['stored']:,}", f"{r['decoded_bytes'] / r['stored']:.3f}×", f(r["encode_mb_s"]),
              f(r["decode_mb_s"]), f(r["decode_cpu_mb_s"]), f(r["load_mb_s"])] for r in rows]
    headers = ["dtype", "codec", "payload bytes", "ratio", "encode MB/s", "decode MB/s", "decode MB/s (CPU time)", "load MB/s"]
    return common.markdown_table(headers, table, "llrrrrrr")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4-layer synthetic adapter, 2 repeats")
    ap.add_argument("--repeats", type=int, help="timed repeats (default 7, quick 2)")
    ap.add_argument("--level", type=int, default=None, help="one level for every codec (default: each codec's own)")
    ap.add_argument("--sizes-only", action="store_true", help="only the real-adapter size tables")
    ap.add_argument("--speed-only", action="store_true", help="only the synthetic speed table")
    ap.add_argument("--pco-breakdown", action="store_true",
                    help="only: where pco's decode time goes (Pco engine, un-rotation, codec, pcodec), synthetic adapter")
    ap.add_argument("--workdir", type=Path, help="where to write the test files (default: a temporary folder)")
    ap.add_argument("--ranks", default="1,2,4",
                    help="ranks the bundled example is also truncated to for the size tables (comma-separated; '' for none)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    layers = 4 if args.quick else 32
    missing = [p for p, mod in (("zipnn", _zipnn()), ("pcodec", _pcodec())) if mod is None]
    sizes: list[dict[str, Any]] = []
    speed: list[dict[str, Any]] = []
    if args.pco_breakdown:
        rows = pco_breakdown(layers, repeats)
        print(f"\nMachine: {common.machine_line(common.machine())}. MB = 10^6 bytes. Decode MB/s by thread CPU time, "
              f"median of {repeats}, {synthetic.description('bf16', layers=layers).replace('bfloat16', 'each dtype')}\n")
        names = ["engine", "engine + unrotate", "pco codec", "pcodec peer", "pcodec peer from a view"]
        print(common.markdown_table(["dtype", *names], [[r["dtype"], *(f"{r[n]:,.0f}" for n in names)] for r in rows],
                                    "l" + "r" * len(names)))
        return
    with tempfile.TemporaryDirectory(prefix="apack-codecs-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.speed_only:
            sizes = measure_sizes(work, args.level, [int(k) for k in args.ranks.split(",") if k.strip()])
        if not args.sizes_only:
            speed = measure_speed(work, layers, repeats, args.level)
    m = common.machine()
    print(f"\nMachine: {common.machine_line(m)}. MB = 10^6 bytes.")
    if missing:
        print(f"Not installed, so not measured: {', '.join(missing)} (pip install {' '.join(missing)}).")
    if sizes:
        if gone := missing_adapters():
            print(f"Not found in {CACHE}, so not measured: {'; '.join(gone)}.")
        print("\nWhole .apack files (preamble + index + padding + blobs) against the peers' payloads:\n")
        print(render_sizes(sizes, "whole"))
        print("\nPayloads alone (sum of stored blob bytes):\n")
        print(render_sizes(sizes, "payload"))
    if speed:
        print(f"\n{synthetic.description('bf16', layers=layers).replace('bfloat16', 'each dtype')} Median of {repeats}.\n")
        print(render_speed(speed))
    if args.json:
        common.write_json(args.json, {"machine": m, "quick": args.quick, "repeats": repeats, "level": args.level,
                                      "sizes": sizes, "speed": speed})


if __name__ == "__main__":
    main()
