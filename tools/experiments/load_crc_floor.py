"""How far below ``load_file`` a CRC-checked numpy load of the bundled example can get, in the bench's own conditions.

Issue 13's numpy aim with CRC-32C on (``adapterpack.open`` + every tensor <= 1.0x ``safetensors.numpy.load_file``)
is the one load aim still missed. This runs the loaders of ``tools.bench.bench_load`` (the same round-robin, so the
caches see the same traffic: the torch loaders run in between) beside two variants that bound what a change could
win, all on the raw bundled example:

- ``one CRC call``: the Adapter built and every tensor read as with CRC off, plus ONE ``crc32c`` call over the
  whole data section instead of one per blob (what a stored whole-section checksum would allow);
- ``floor``: the index read and checked, then one CRC call over the data section and one ``frombuffer`` per blob,
  no Adapter at all (what is left without the object model).

Ratios are against ``load_file``'s fastest round, as in the bench. Run from the repository root::

    python -m tools.experiments.load_crc_floor            # 61 rounds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import adapterpack
from adapterpack.checksum import crc32c
from adapterpack.container import ApackReader
from tools.bench import bench_load, common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=61)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "example-raw.apack"
        ex = common.example_dir()
        adapterpack.save(adapterpack.open(ex), path, codec="raw")
        st = ex / common.PEFT_WEIGHTS
        common.warm_page_cache([path, st])

        def one_crc_call() -> list[np.ndarray]:
            reader = ApackReader(path, verify=False)
            ad = reader.adapter()
            crc32c(reader.buffer[reader.data_start : reader.file_size])
            arrs = common.decode_all(ad)
            common.touch(arrs)
            ad.close()
            return arrs

        def floor() -> list[np.ndarray]:
            reader = ApackReader(path, verify=False)
            buf = reader.buffer
            crc32c(buf[reader.data_start : reader.file_size])
            dt = np.dtype(np.float32)  # the example's one dtype
            arrs = [np.frombuffer(buf, dt, b.length // 4, reader.data_start + b.offset).reshape(b.shape) for b in reader.blobs]
            common.touch(arrs)
            return arrs

        fns = {
            "apack CRC on": lambda: bench_load.apack_numpy(path, True),
            "apack CRC off": lambda: bench_load.apack_numpy(path, False),
            "apack CRC off + one CRC call": one_crc_call,
            "floor: index + one CRC call + frombuffer": floor,
            "load_file (numpy)": lambda: bench_load.st_load_file(st, "np"),
            "safe_open (numpy)": lambda: bench_load.st_safe_open(st, "np"),
            "torch load, CRC on": lambda: bench_load.apack_torch(path, True),
            "load_file (torch)": lambda: bench_load.st_load_file(st, "pt"),
        }
        times = common.interleaved(fns, args.repeats)
    base = min(times["load_file (numpy)"])
    rows = [[name, f"{min(t) * 1e3:.2f}", f"{common.median(t) * 1e3:.2f}", f"{min(t) / base:.2f}"] for name, t in times.items()]
    print(f"Machine: {common.machine_line(common.machine())}; fastest of {args.repeats} interleaved rounds.\n")
    print(common.markdown_table(["loader", "fastest ms", "median ms", "fastest / load_file"], rows, "lrrr"))


if __name__ == "__main__":
    main()
