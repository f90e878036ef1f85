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
