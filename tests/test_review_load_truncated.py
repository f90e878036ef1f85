"""A file truncated (or rewritten in place, as ``cp`` does) after it was opened: touching its mapping past the new end is
SIGBUS, which kills the process. Every read that touches the mapping checks the size first and raises TruncatedFileError."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import adapterpack
    import adapterpack.torch as apt
    from adapterpack.adapter import Adapter, Module
    from adapterpack.container import reader as reader_mod
    from adapterpack.container.reader import ApackReader
    from adapterpack.errors import TruncatedFileError

    reader_mod.PARALLEL_CRC_BYTES = 0  # the threaded span check runs on small files too
    rng = np.random.default_rng(0)
    mods = {f"m{k}": Module(f"m{k}", "lora", (256, 512), {"rank": 16, "alpha": 16.0},
            {"A": rng.standard_normal((16, 512)).astype(np.float32), "B": rng.standard_normal((256, 16)).astype(np.float32)})
            for k in range(6)}
    tmp = sys.argv[1]
    saved = {}
    for codec in ("raw", "zstd"):
        saved[codec] = os.path.join(tmp, codec + ".apack")
        adapterpack.save(Adapter(modules=mods), saved[codec], codec=codec)

    def case(name, codec, cow, act, truncate=True):
        path = os.path.join(tmp, name + ".apack")
        with open(saved[codec], "rb") as f, open(path, "wb") as g:
            g.write(f.read())
        r = ApackReader(path, copy_on_write=cow)
        ad = r.adapter()
        if truncate:
            os.truncate(path, r.data_start + 1024)  # the first blob's start survives, the rest is gone
        try:
            act(r, ad)
            print(name, "no error", flush=True)
        except TruncatedFileError as e:
            assert str(path) in str(e), e
            print(name, "TruncatedFileError", flush=True)
        r.close()

    last = lambda r: len(r.blobs) - 1
    case("read_blob", "raw", False, lambda r, ad: r.read_blob(last(r)))
    case("read_blob_cow", "raw", True, lambda r, ad: r.read_blob(last(r)))

    def later(r, ad):  # a reader that has read: truncated after it, the next read past the check interval sees it
        import time
        r.read_blob(0)
        os.truncate(r.path, r.data_start + 1024)
        time.sleep(2 * reader_mod.SIZE_CHECK_NS / 1e9)
        r.read_blob(last(r))

    case("read_after_read", "raw", False, later, truncate=False)
    case("read_rows", "raw", False, lambda r, ad: r.read_rows(last(r), 1))
    case("compressed", "zstd", False, lambda r, ad: r.read_blob(last(r)))
    case("check_raw_blobs", "raw", True, lambda r, ad: r.check_raw_blobs(range(len(r.blobs)), threads=2))
    case("start_raw_check", "raw", True, lambda r, ad: r.start_raw_check(range(len(r.blobs)), threads=2).wait())
    case("verify", "raw", False, lambda r, ad: r.verify())
    case("torch_views", "raw", True, lambda r, ad: apt.load(ad))
    case("torch_copy", "raw", False, lambda r, ad: apt.load(ad))
    case("torch_zstd", "zstd", False, lambda r, ad: apt.load(ad))
    """
)

CASES = ["read_blob", "read_blob_cow", "read_after_read", "read_rows", "compressed", "check_raw_blobs", "start_raw_check", "verify",
         "torch_views", "torch_copy", "torch_zstd"]  # fmt: skip


def test_reads_of_a_file_truncated_after_open_raise_truncated_file_error(tmp_path: Path) -> None:
    """In a child process (a SIGBUS would kill pytest): every case prints TruncatedFileError, none dies or passes."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300)
    got = r.stdout.split("\n")[:-1]
    assert r.returncode == 0, (r.returncode, got, r.stderr[-2000:])
    assert got == [f"{c} TruncatedFileError" for c in CASES], r.stderr[-2000:]
