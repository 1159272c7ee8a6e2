"""Paged KV-cache bookkeeping: which cache blocks each request holds.

Ints and lists only; the tensors live in the model runner. A request's block
table maps its token position p to cache slot table[p // block_size] *
block_size + p % block_size.
"""
from __future__ import annotations

from collections import deque

from leanserve.scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so the request can hold `num_new_tokens` more computed tokens."""
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(request.block_table))

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table for its next tokens; False (and no change) if the cache is full."""
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            request.block_table.append(block)
        return True

    def free(self, request: Request) -> None:
        """Release every block the request holds (last-allocated first, so they are reused last)."""
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        request.block_table = []

    def check_invariants(self, requests: list[Request]) -> None:
        """free + used == total, and each block's reference count equals the number of tables holding it."""
        holders = [0] * self.num_blocks
        for request in requests:
            for block in request.block_table:
                holders[block] += 1
        assert holders == self.ref_counts, "reference counts differ from the block tables"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is free twice"
        assert all((self.ref_counts[b] == 0) == (b in free) for b in range(self.num_blocks)), "free list and ref counts disagree"
