"""`leanserve bench attention`: decode attention over a paged KV cache.

One decode step's attention for one layer (one query token a sequence), with the
default model's head shapes: lean attention (the native executor's kernel, or
with --torch the torch backend's tiles: whole cache blocks, one flash-attention call,
log-sum-exp merge) reading keys and values from the paged cache, against

- padded SDPA: every sequence padded to the longest, one batched call with a
  padding mask, over a contiguous padded cache (built outside the timing);
- one SDPA call a sequence, over contiguous per-sequence caches (also built
  outside the timing).

Batches: ragged (16 sequences, contexts spaced geometrically from 64 to 8,192)
and equal contexts with the same total. Every output is checked against a float64
reference. Reports milliseconds a call, the speed-up over each baseline, and
lean attention's rate of useful KV bytes read against the machine's memory rate.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from leanserve.kernels.attention import AttentionMetadata, TorchAttentionBackend
from leanserve.kernels.cpu_kernels import native_kernels


def ragged_contexts(count: int, shortest: int, longest: int) -> list[int]:
    return [round(shortest * (longest / shortest) ** (i / (count - 1))) for i in range(count)]


def memory_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """Read rate of a large matrix-vector product (float32), GB/s."""
    matrix = torch.randn(megabytes * 2**20 // 4 // 4096, 4096)
    vector = torch.randn(4096)
    matrix @ vector
    start = time.perf_counter()
    for _ in range(repeats):
        matrix @ vector
    return matrix.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9


def timed_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def paged_batch(contexts: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, seed: int = 0):
    """Random queries and a paged cache holding each sequence's keys and values in shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks_each = [-(-c // block_size) for c in contexts]
    order = torch.randperm(sum(blocks_each) + 1, generator=g)[1:].tolist()      # block 0 left unused
    tables, start = [], 0
    for n in blocks_each:
        tables.append(order[start:start + n])
        start += n
    shape = (sum(blocks_each) + 1, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(len(contexts), heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables


def sequence_kv(cache: torch.Tensor, table: list[int], context: int) -> torch.Tensor:
    """[context, kv_heads, D] of one sequence, gathered from the paged cache."""
    return cache[torch.tensor(table)].flatten(0, 1)[:context]


def reference(q: torch.Tensor, k_cache, v_cache, tables, contexts) -> torch.Tensor:
    """float64 softmax attention, one sequence at a time."""
    out = []
    group = q.shape[1] // k_cache.shape[2]
    for b, (table, context) in enumerate(zip(tables, contexts)):
        k = sequence_kv(k_cache, table, context).double().repeat_interleave(group, dim=1)   # [L, H, D]
        v = sequence_kv(v_cache, table, context).double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), k) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def run_batch(name: str, contexts: list[int], args: argparse.Namespace, dtype: torch.dtype,
              memory_rate: float) -> dict:
    heads, kv_heads, head_dim, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    q, k_cache, v_cache, tables = paged_batch(contexts, heads, kv_heads, head_dim, bs, dtype)
    batch, longest = len(contexts), max(contexts)
    expected = reference(q, k_cache, v_cache, tables, contexts)

    kernels = None if args.torch else native_kernels()
    if kernels is not None:       # the native executor's lean attention, on its step plan
        width = max(len(t) for t in tables)
        padded_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        lens = torch.tensor(contexts)
        prepare_ms = timed_ms(lambda: kernels.StepPlan(list(range(batch)), [1] * batch, contexts, tables,
                                                       torch.zeros(batch, dtype=torch.long), bs, heads, kv_heads,
                                                       args.tile_size), args.repeats)

        def lean() -> torch.Tensor:
            return kernels.lean_attention_decode(q, k_cache, v_cache, padded_tables, lens, args.tile_size,
                                                 head_dim ** -0.5)
    else:
        backend = TorchAttentionBackend(tile_size=args.tile_size)
        md = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), query_starts=list(range(batch)),
                               query_lens=[1] * batch, context_lens=contexts, block_tables=tables, block_size=bs)
        prepare_ms = timed_ms(lambda: backend.prepare(md), args.repeats)
        no_new = torch.empty(0, kv_heads, head_dim, dtype=dtype)     # the step's own K/V are cached already

        def lean() -> torch.Tensor:
            return backend.forward(q, no_new, no_new, k_cache, v_cache, md)

    # Baselines over contiguous caches, as a padded (static) cache or per-sequence tensors would hold them.
    padded_k = torch.zeros(batch, kv_heads, longest, head_dim, dtype=dtype)
    padded_v = torch.zeros_like(padded_k)
    for b, (table, context) in enumerate(zip(tables, contexts)):
        padded_k[b, :, :context] = sequence_kv(k_cache, table, context).transpose(0, 1)
        padded_v[b, :, :context] = sequence_kv(v_cache, table, context).transpose(0, 1)
    valid = (torch.arange(longest) < torch.tensor(contexts)[:, None])[:, None, None, :]   # [B, 1, 1, L]
    per_seq = [(padded_k[b:b + 1, :, :c].contiguous(), padded_v[b:b + 1, :, :c].contiguous())
               for b, c in enumerate(contexts)]

    def padded() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None], padded_k, padded_v, attn_mask=valid,
                                              enable_gqa=True)[:, :, 0]

    def one_by_one() -> torch.Tensor:
        return torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, None], k, v, enable_gqa=True)[:, :, 0]
                          for b, (k, v) in enumerate(per_seq)])

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    row = {"batch": name, "contexts": contexts, "total_tokens": sum(contexts), "prepare_ms": prepare_ms}
    for label, fn in (("lean", lean), ("padded_sdpa", padded), ("per_sequence_sdpa", one_by_one)):
        error = float(((fn().double() - expected).abs().max() / expected.abs().max()))
        if error > tolerance:
            raise AssertionError(f"{label} on the {name} batch: relative error {error:.2e} over {tolerance}")
        row[f"{label}_ms"] = timed_ms(fn, args.repeats)
        row[f"{label}_rel_error"] = error
    kv_bytes = 2 * sum(contexts) * kv_heads * head_dim * dtype.itemsize
    row["lean_kv_gbps"] = kv_bytes / row["lean_ms"] / 1e6
    row["lean_kv_fraction_of_memory_rate"] = row["lean_kv_gbps"] / memory_rate
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--shortest", type=int, default=64)
    parser.add_argument("--longest", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=9, help="query heads (the default model's)")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tile-size", type=int, default=128, help="lean attention's tile, in tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="lean attention's torch tiles, not the native kernel")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the results here")


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    ragged = ragged_contexts(args.sequences, args.shortest, args.longest)
    equal = [sum(ragged) // args.sequences] * args.sequences
    memory_rate = memory_gbps()
    kernels = None if args.torch else native_kernels()
    print(f"decode attention ({f'native kernel, {kernels.ISA}' if kernels else 'torch tiles'}), one layer: {args.heads} heads, {args.kv_heads} KV heads, head dim {args.head_dim}, "
          f"{args.dtype}, block {args.block_size}, tile {args.tile_size}; {torch.get_num_threads()} threads; "
          f"memory read rate (matrix-vector) {memory_rate:.1f} GB/s")
    rows = [run_batch("ragged", ragged, args, dtype, memory_rate), run_batch("equal", equal, args, dtype, memory_rate)]
    print(f"{'batch':<8}{'tokens':>8}{'lean ms':>9}{'padded ms':>11}{'per-seq ms':>12}{'vs padded':>11}"
          f"{'vs per-seq':>12}{'KV GB/s':>9}{'of mem':>8}{'prepare ms':>12}")
    for r in rows:
        print(f"{r['batch']:<8}{r['total_tokens']:>8}{r['lean_ms']:>9.3f}{r['padded_sdpa_ms']:>11.3f}"
              f"{r['per_sequence_sdpa_ms']:>12.3f}{r['padded_sdpa_ms'] / r['lean_ms']:>10.2f}x"
              f"{r['per_sequence_sdpa_ms'] / r['lean_ms']:>11.2f}x{r['lean_kv_gbps']:>9.1f}"
              f"{r['lean_kv_fraction_of_memory_rate'] * 100:>7.0f}%{r['prepare_ms']:>12.3f}")
    print("prepare: the step's tile list, built once and shared by every layer; ragged contexts: "
          + ", ".join(map(str, ragged)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory_gbps": memory_rate, "threads": torch.get_num_threads(), "dtype": args.dtype,
                       "results": rows}, f, indent=2)
    return 0
