"""Whole-file byte budgets: the file a plan writes fits, index, padding and pass-through tensors included.

An allocation (rerank's ranks, compress's ranks × bits) counts the bytes of the records it chooses;
the file adds a preamble, a JSON index whose length depends on the choices (ranks, bit lists, blob
lengths), alignment padding and whatever else the adapter carries. :func:`fit_to_file` closes the gap
exactly: solve for an allocation budget, measure the exact size of the file that plan writes
(:func:`apack_file_size` runs the writer's own planner, nothing is written), shrink the allocation
budget by the excess and solve again until the file fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from adapterpack.adapter import Adapter
from adapterpack.container.writer import encode_blob, plan_apack
from adapterpack.errors import ConversionError

T = TypeVar("T")
#: Solve-and-measure rounds before giving up (each shrinks the allocation by the last excess).
MAX_ROUNDS = 12
#: A fitting plan that leaves less than this fraction of the budget unused is not grown further.
GROW_SLACK = 0.002


def apack_file_size(
    adapters: list[Adapter], codec: str = "raw", level: int | None = None, zstd_index: bool | None = None
) -> int:
    """Bytes :func:`~adapterpack.container.writer.write_apack` writes for ``adapters`` with ``codec`` and
    ``zstd_index`` (the writer's own blob encoder and planner; nothing is written)."""

    def encode(arr: np.ndarray) -> tuple[int, dict[str, Any], int]:
        data, cfg, crc = encode_blob(arr, codec, level)
        return len(data), cfg, crc

    return plan_apack(adapters, encode, zstd_index=zstd_index).file_size


@dataclass
class Fitted(Generic[T]):
    """A plan whose file fits: the plan, its exact file size, the allocation budget that produced it, rounds used."""

    plan: T
    file_bytes: int
    allocation_budget: int
    rounds: int


def fit_to_file(
    solve: Callable[[int], T],
    size: Callable[[T], int],
    budget: int,
    *,
    floor: int = 0,
    cost: Callable[[T], int] | None = None,
) -> Fitted[T]:
    """The plan ``solve(b)`` for the largest allocation budget ``b`` tried whose file (``size(plan)``) fits ``budget``.

    Starts at ``b = budget`` and shrinks ``b`` by each round's excess (at least one byte), so the
    overhead the index and padding add is learnt from the plan itself; a plan that fits with room to
    spare (a compressing codec) is grown by that room while it still fits. ``cost``: the bytes a plan's
    allocation actually spent (≤ its b); shrinking starts from there, so coarse choices cannot stall it. ``floor``: the smallest
    allocation budget ``solve`` accepts; a budget that cannot hold even that file is refused.
    """
    # a budget below the floor's allocation can still hold the floor's file when the codec compresses: start (or
    # land) on the floor once, so that file is measured and the room it leaves is grown into like any other
    b = max(budget, floor)
    best: Fitted[T] | None = None
    last_size, last_step = -1, 0
    floor_tried = False
    for rounds in range(1, MAX_ROUNDS + 1):
        if b < floor:
            if floor_tried:
                break
            b = floor
        floor_tried = floor_tried or b == floor
        plan = solve(b)
        n = size(plan)
        # progress: progress.task("fit", unit="rounds"): advance(note=f"{n:,} B") per round
        if n <= budget:
            same = best is not None and n == best.file_bytes  # more allocation changed nothing: the plan is as large as it gets
            if best is None or b > best.allocation_budget:
                best = Fitted(plan, n, b, rounds)
            slack = budget - n
            # close enough: what one more round could add is a rounding (a ratio: a budget past float's range stays exact)
            if same or slack <= 0 or slack / budget < GROW_SLACK:
                break
            b += slack  # a compressing codec can leave room: give the allocation what the file did not use
        else:
            if best is not None:  # grown past what fits: keep the last plan that fitted
                break
            spent = min(b, cost(plan)) if cost is not None else b
            step = max(n - budget, 1)
            if n == last_size:  # the same file again: shrink faster
                step = max(step, 2 * last_step)
            b = spent - step
            last_size, last_step = n, step
    if best is not None:
        best.rounds = rounds
        return best
    last = solve(floor)
    smallest = size(last)
    if smallest <= budget:
        return Fitted(last, smallest, floor, MAX_ROUNDS + 1)
    raise ConversionError(
        f"budget {budget:,} B is below {smallest:,} B, the whole file (index and padding included) at the smallest choices"
    )
