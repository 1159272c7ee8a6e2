"""Prepacking: bin-pack prompts of very different lengths into token budgets.

Best-fit decreasing: take items longest first and put each into the open bin
whose free space it fills most tightly, opening a new bin when none has room.
An item longer than the capacity gets a bin of its own (it will be chunked).
"""
from __future__ import annotations

import bisect


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most `capacity` (but for oversized single items)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []       # sorted (free space, bin index) of open bins
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[item]
        pos = bisect.bisect_left(free, (size, -1))
        if size <= capacity and pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(item)
        else:
            bins.append([item])
            space, b = capacity, len(bins) - 1
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return bins
