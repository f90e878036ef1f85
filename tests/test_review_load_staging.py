"""torch staging's shared pinned buffers: the lock one GPU load holds while it streams through them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adapterpack.torch import staging


def test_a_failed_pinned_allocation_does_not_keep_the_staging_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """_Stream took the lock, then allocated the pinned buffers: when that failed (cudaHostAlloc refused: a low
    ``ulimit -l``, a driver error) the constructor raised with the lock held and every later GPU load in the process
    waited for ever. A CUDA target is faked on the CPU (the destination allocated on the CPU)."""
    real_empty = torch.empty

    def empty(*args: Any, **kw: Any) -> torch.Tensor:
        kw.pop("device", None)
        return real_empty(*args, **kw)

    def refuses(size: int = staging.CHUNK) -> list[torch.Tensor]:
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(staging, "pinned_buffers", refuses)

    class FakeCuda:
        type = "cuda"

    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="cudaHostAlloc"):
                staging._Stream(FakeCuda(), 1024, True)  # type: ignore[arg-type]
            assert not staging._staging_lock.locked()
    finally:
        if staging._staging_lock.locked():  # leave the process as it was, fixed or not
            staging._staging_lock.release()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_load_to_another_gpu_than_the_current_one(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event that says a pinned chunk's copy has left it was recorded on the current device's stream while the copy ran
    on the target's: the host refilled a buffer still being copied from. Small chunks, many flushes, bit-exact."""
    import numpy as np

    import adapterpack
    import adapterpack.torch as apt
    from adapterpack.adapter import Adapter, Module

    real_pinned = staging.pinned_buffers
    monkeypatch.setattr(staging, "pinned_buffers", lambda size=0: real_pinned(4096))  # 4 KiB chunks: many flushes
    rng = np.random.default_rng(0)
    f32 = np.float32
    mods = {f"m{k}": Module(f"m{k}", "lora", (512, 768), {"rank": 16, "alpha": 16.0},
                            {"A": rng.standard_normal((16, 768)).astype(f32), "B": rng.standard_normal((512, 16)).astype(f32)})
            for k in range(8)}  # fmt: skip
    path = tmp_path / "a.apack"
    adapterpack.save(Adapter(modules=mods), path, codec="raw")
    with torch.cuda.device(0):
        for _ in range(5):
            got = apt.load(path, device="cuda:1")
            for name, m in mods.items():
                assert torch.equal(got[name].A.cpu(), torch.from_numpy(m.tensors["A"]))  # type: ignore[arg-type]
                assert torch.equal(got[name].B.cpu(), torch.from_numpy(m.tensors["B"]))  # type: ignore[arg-type]
