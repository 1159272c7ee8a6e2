"""Paged KV-cache bookkeeping: which cache blocks each request holds, and the prefix cache.

Ints, lists and hashes only; the tensors live in the model runner. A request's
block table maps its token position p to cache slot table[p // block_size] *
block_size + p % block_size.

Prefix caching: a full block is named by a hash chained over its parent's hash
and its own token ids, so equal hashes mean equal prefixes. The block keeps its
token ids too, and a hit is verified against them, so a hash collision can
never hand a request someone else's keys and values. Freed blocks keep their
contents and stay findable until their space is needed; the least recently
freed go first, and blocks that hold nothing reusable before any of them.
"""
from __future__ import annotations

from collections import OrderedDict

from leanserve.scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks in eviction order (first = evicted first); a value is unused.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Prefix cache: hash -> block, and each cached block's (hash, token ids).
        self.cached: dict[int, int] = {}
        self.block_content: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.prefix_cache_queries = 0   # prompt tokens looked up
        self.prefix_cache_hits = 0      # of those, tokens found cached

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

    def match_prefix(self, request: Request) -> None:
        """Give a request with no blocks yet every cached block of its longest cached prefix.

        At least the last token is left to compute, since its logits are needed.
        """
        assert not request.block_table and request.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        self.prefix_cache_queries += request.num_tokens
        parent = None
        for i in range((request.num_tokens - 1) // self.block_size):
            tokens = tuple(request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block = self.cached.get(h)
            if block is None or self.block_content[block] != (h, tokens):
                break
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            request.block_table.append(block)
            request.block_hashes.append(h)
            parent = h
        request.num_computed_tokens = len(request.block_table) * self.block_size
        self.prefix_cache_hits += request.num_computed_tokens

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table for its next tokens; False (and no change) if the cache is full."""
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            request.block_table.append(block)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Make the request's newly completed blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(request.block_hashes), request.num_computed_tokens // bs):
            parent = request.block_hashes[-1] if request.block_hashes else None
            tokens = tuple(request.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            request.block_hashes.append(h)
            block = request.block_table[i]
            if h not in self.cached and block not in self.block_content:
                self.cached[h] = block
                self.block_content[block] = (h, tokens)

    def free(self, request: Request) -> None:
        """Release the request's blocks: tail blocks become evictable before the prefix they extend."""
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if block not in self.block_content:     # nothing reusable: evict it first
                    self.free_blocks.move_to_end(block, last=False)
        request.block_table = []
        request.block_hashes = []

    def _forget(self, block: int) -> None:
        content = self.block_content.pop(block, None)
        if content is not None:
            del self.cached[content[0]]

    def invariant_problems(self, requests: list[Request]) -> list[str]:
        """What is wrong, naming requests and blocks: each block's reference count must equal the number
        of these requests' tables that hold it, the free list hold exactly the unreferenced blocks, and
        the prefix-cache index point at blocks that hold what it says. Its cost grows with the blocks
        held, not with the cache (but for the index), unless something is wrong."""
        holders: dict[int, list[str]] = {}
        for request in requests:
            for block in request.block_table:
                holders.setdefault(block, []).append(request.request_id)
        problems = []
        # Counts are never negative: if the held blocks' counts match and sum to all counts, no other
        # block is referenced; then a free list of the rest's size, holding no held block, is the rest.
        consistent = (all(self.ref_counts[b] == len(h) for b, h in holders.items())
                      and sum(self.ref_counts) == sum(len(h) for h in holders.values())
                      and len(self.free_blocks) == self.num_blocks - len(holders)
                      and not any(b in self.free_blocks for b in holders))
        if not consistent:
            problems += [f"block {b} has {c} references but is held by [{', '.join(holders.get(b, []))}]"
                         for b, c in enumerate(self.ref_counts) if c != len(holders.get(b, []))]
            if stray := [b for b, c in enumerate(self.ref_counts) if (c == 0) != (b in self.free_blocks)]:
                problems.append(f"free list and reference counts disagree on blocks {stray}")
        if stale := sorted(b for h, b in self.cached.items() if self.block_content.get(b, (None,))[0] != h):
            problems.append(f"prefix cache index is stale for blocks {stale}")
        return problems

    def check_invariants(self, requests: list[Request]) -> None:
        if problems := self.invariant_problems(requests):
            raise AssertionError("; ".join(problems))
