"""Prepacking: pack prompts of very different lengths into one step's token budget.

The most urgent waiting prompt is always packed (so nothing waits forever); the
rest of the budget goes to the shortest waiting prompts, as many as fit. Against
best-fit decreasing, which fills the budget with the longest prompts that fit,
this starts the most requests a step: on a burst of 64 chat requests (the first
64 of chat-256 through the server) the median time to first token went from 4.4
to 2.1-2.3 s at the same throughput and TTFT p99, since short prompts no longer
queue behind long ones that arrived earlier (TPOT p99 rose from 0.36 to 0.5 s:
more requests decode while the long prompts still prefill).
"""
from __future__ import annotations


def shortest_first_fill(lengths: list[int], capacity: int) -> list[int]:
    """Indices packed into one budget of `capacity` tokens: 0 (the most urgent, taken even when it
    alone is longer: it will be chunked), then the shortest of the others while they fit."""
    chosen, room = [0], capacity - lengths[0]
    for i in sorted(range(1, len(lengths)), key=lengths.__getitem__):
        if lengths[i] > room:
            break
        chosen.append(i)
        room -= lengths[i]
    return chosen
