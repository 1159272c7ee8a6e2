"""Perplexity, closeness to float and decode-step time of each weight format, on one model.

The text is the first `--num-prompts` requests of a chat workload, each rendered with the
model's chat template (no generation prompt) and run as one sequence: full-sequence logits
from the model's forward (one prefill segment), mean next-token NLL over all of them,
perplexity = exp(mean NLL). Against the float model, per predicted token: mean KL(float || mode)
and how often both put the same token first. The decode step is the model's forward and
logits for `batch` sequences of one new token each, over a `--context`-token cache.

Modes: float (the checkpoint's weights in float32: a GGUF file's dequantized), int8, int4 and
llm_int8 (what `LLM(..., quantization=mode)` runs).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time

import torch

from leanserve.bench.attention import timed_ms
from leanserve.bench.workload import DEFAULT_WORKLOAD, load_workload
from leanserve.engine.engine_config import KV_CACHE_DTYPES, EngineConfig
from leanserve.engine.loader import Checkpoint, load_checkpoint
from leanserve.engine.model_runner import ModelRunner
from leanserve.engine.quantize import quantize_model, resolve_quantization
from leanserve.kernels.attention import AttentionMetadata

MODES = ("float", "int8", "int4", "llm_int8")
BLOCK_SIZE = 16


def build_runner(checkpoint: Checkpoint, mode: str, num_blocks: int, kv_cache_dtype: str = "auto") -> ModelRunner:
    """A float32 runner of `mode`, its KV cache as the engine would make it."""
    quantization = resolve_quantization(mode, checkpoint)
    return ModelRunner(checkpoint.config, checkpoint.weights, torch.float32, num_blocks, BLOCK_SIZE,
                       quantize=functools.partial(quantize_model, mode=quantization, checkpoint=checkpoint),
                       kv_cache_dtype=EngineConfig(kv_cache_dtype=kv_cache_dtype).kv_cache_torch_dtype)


def _metadata(runner: ModelRunner, query_lens: list[int], context_lens: list[int]) -> AttentionMetadata:
    """Sequences side by side in the cache, each with blocks for its whole context."""
    tables, slots, start = [], [], 0
    for q_len, ctx in zip(query_lens, context_lens):
        blocks = -(-ctx // BLOCK_SIZE)
        tables.append(list(range(start, start + blocks)))
        start += blocks
        slots += [tables[-1][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx - q_len, ctx)]
    query_starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    return AttentionMetadata(slot_mapping=torch.tensor(slots), query_starts=query_starts, query_lens=query_lens,
                             context_lens=context_lens, block_tables=tables, block_size=BLOCK_SIZE)


@torch.inference_mode()
def sequence_log_probs(runner: ModelRunner, ids: list[int]) -> tuple[torch.Tensor, float]:
    """Next-token log-probabilities [len(ids) - 1, vocab] of one sequence, run as one prefill segment,
    and the seconds its forward pass (the prefill, without logits) took."""
    md = _metadata(runner, [len(ids)], [len(ids)])
    start = time.perf_counter()
    hidden = runner.executor.forward(torch.tensor(ids), torch.arange(len(ids)), md)
    seconds = time.perf_counter() - start
    return torch.log_softmax(runner.executor.compute_logits(hidden[:-1]), dim=-1), seconds


@torch.inference_mode()
def decode_step_ms(runner: ModelRunner, batch: int, context: int, repeats: int = 10) -> float:
    """Median time of one decode step (forward of `batch` new tokens, logits) over `context` cached tokens."""
    md = _metadata(runner, [1] * batch, [context + 1] * batch)
    tokens = torch.randint(runner.config.vocab_size, (batch,))
    positions = torch.full((batch,), context)

    def step() -> None:
        runner.executor.compute_logits(runner.executor.forward(tokens, positions, md))

    return timed_ms(step, repeats)


def prompt_token_ids(checkpoint: Checkpoint, workload: str, num_prompts: int) -> list[list[int]]:
    tokenizer = checkpoint.tokenizer
    return [tokenizer.encode(tokenizer.apply_chat_template(r.messages, add_generation_prompt=False),
                             add_special_tokens=False) for r in load_workload(workload, num_prompts)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a HuggingFace directory")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD))
    parser.add_argument("--num-prompts", type=int, default=64, help="prompts of the workload the text is made of")
    parser.add_argument("--step-batches", default="1,8,32", help="decode batch sizes to time ('' for none)")
    parser.add_argument("--context", type=int, default=256, help="cached tokens of each sequence in a decode step")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *sorted(KV_CACHE_DTYPES)],
                        help="KV-cache element type of the decode steps (auto: the engine's default)")
    parser.add_argument("--repeats", type=int, default=10, help="timed decode steps per batch size")
    parser.add_argument("--no-perplexity", action="store_true", help="time decode steps only")
    parser.add_argument("--output", help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {list(MODES)}")
    modes.sort(key=lambda m: m != "float")        # the reference first
    batches = [int(b) for b in args.step_batches.split(",") if b]
    checkpoint = load_checkpoint(args.model)
    prompts = [] if args.no_perplexity else prompt_token_ids(checkpoint, args.workload, args.num_prompts)
    num_tokens = sum(len(p) - 1 for p in prompts)
    longest = max([len(p) for p in prompts], default=0)
    num_blocks = max(-(-longest // BLOCK_SIZE), max(batches, default=0) * -(-(args.context + 1) // BLOCK_SIZE), 1)
    print(f"{args.model}: {len(prompts)} prompts, {num_tokens} predicted tokens; decode steps over "
          f"{args.context} cached tokens; {torch.get_num_threads()} threads", flush=True)
    runners = {mode: build_runner(checkpoint, mode, num_blocks, args.kv_cache_dtype) for mode in modes}
    rows = {mode: {"mode": mode, "nll": 0.0, "kl": 0.0, "agree": 0, "prefill_s": 0.0} for mode in modes}
    for ids in prompts:
        targets = torch.tensor(ids[1:])[:, None]
        reference = None
        for mode, runner in runners.items():
            log_probs, seconds = sequence_log_probs(runner, ids)
            row = rows[mode]
            row["prefill_s"] += seconds
            row["nll"] -= float(log_probs.gather(1, targets).sum())
            if mode == "float":
                reference = log_probs
            elif reference is not None:   # KL(float || mode) and agreement of the most likely token
                row["kl"] += float((reference.exp() * (reference - log_probs)).sum())
                row["agree"] += int((reference.argmax(-1) == log_probs.argmax(-1)).sum())
    results = []
    for mode, runner in runners.items():
        row = {"mode": mode}
        if prompts:
            row["perplexity"] = math.exp(rows[mode]["nll"] / num_tokens)
            row["prefill_tokens_per_s"] = (num_tokens + len(prompts)) / rows[mode]["prefill_s"]
            if "float" in runners and mode != "float":
                row["kl_vs_float"] = rows[mode]["kl"] / num_tokens
                row["top1_agreement"] = rows[mode]["agree"] / num_tokens
        row["step_ms"] = {b: decode_step_ms(runner, b, args.context, args.repeats) for b in batches}
        results.append(row)
    base = results[0].get("perplexity") if results[0]["mode"] == "float" else None
    print(f"{'mode':<18}{'perplexity':>11}{'vs float':>10}{'KL nats':>10}{'top-1':>8}{'prefill tok/s':>15}"
          + "".join(f"{f'B={b} ms':>10}{'tok/s':>8}" for b in batches))
    for row in results:
        ppl = row.get("perplexity", math.nan)
        change = (ppl / base - 1) * 100 if base else math.nan
        print(f"{row['mode']:<18}{ppl:>11.4f}{change:>+9.3f}%{row.get('kl_vs_float', math.nan):>10.5f}"
              f"{row.get('top1_agreement', math.nan) * 100:>7.2f}%{row.get('prefill_tokens_per_s', math.nan):>15.0f}"
              + "".join(f"{row['step_ms'][b]:>10.2f}{b / row['step_ms'][b] * 1e3:>8.1f}" for b in batches))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "num_prompts": len(prompts), "predicted_tokens": num_tokens,
                       "context": args.context, "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0
