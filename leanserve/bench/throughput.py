"""Offline throughput: LeanServe's LLM against HuggingFace transformers on the same prompts.

Prints a table and optionally writes JSON. Every request is greedy with
ignore_eos, so each engine produces exactly `max_tokens` tokens.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from leanserve.bench.workload import DEFAULT_WORKLOAD, load_workload


def _leanserve(args, requests) -> dict:
    from leanserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
              quantization=args.quantization, deterministic=args.deterministic)
    single = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    question = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    llm.chat(question, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)   # warm-up
    start = time.perf_counter()
    llm.chat(question, single, use_tqdm=False)
    decode_tps = args.decode_tokens / (time.perf_counter() - start)

    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.chat([r.messages for r in requests], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"quantization": llm.engine.quantization, "single_request_decode_tokens_per_s": decode_tps,
            "batch_seconds": elapsed,
            "batch_prompt_tokens": prompt_tokens, "batch_output_tokens": generated,
            "batch_output_tokens_per_s": generated / elapsed}


def transformers_figures(args, requests) -> dict:
    """transformers float32 on the same GGUF: single-request decode, the requests one at a time and padded."""
    from leanserve.bench.reference import load_transformers

    tokenizer, model = load_transformers(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]

    def generate(ids, attention_mask, max_new):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=attention_mask, max_new_tokens=max_new,
                                  min_new_tokens=max_new, do_sample=False, pad_token_id=pad)

    question = encode([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
    ids = torch.tensor([question])
    start = time.perf_counter()
    generate(ids, torch.ones_like(ids), args.decode_tokens)
    decode_tps = args.decode_tokens / (time.perf_counter() - start)

    subset = requests[:args.hf_requests]
    prompts = [encode(r.messages) for r in subset]
    useful = sum(r.max_tokens for r in subset)
    start = time.perf_counter()
    for p, r in zip(prompts, subset):
        ids = torch.tensor([p])
        generate(ids, torch.ones_like(ids), r.max_tokens)
    sequential = time.perf_counter() - start
    # Padded batch: left-padded to the longest prompt, run to the largest max_tokens.
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    generate(ids, mask, max(r.max_tokens for r in subset))
    padded = time.perf_counter() - start
    return {"single_request_decode_tokens_per_s": decode_tps, "requests": len(subset),
            "one_at_a_time_output_tokens_per_s": useful / sequential, "one_at_a_time_seconds": sequential,
            "padded_batch_output_tokens_per_s": useful / padded, "padded_batch_seconds": padded}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", help="weight format (default: the engine's choice for the model)")
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens for the single-request decode figure")
    parser.add_argument("--deterministic", action="store_true", help="batch-invariant logits (LLM(deterministic=True))")
    parser.add_argument("--transformers", action="store_true", help="also measure HuggingFace transformers")
    parser.add_argument("--hf-requests", type=int, default=16,
                        help="requests of the workload transformers runs (one at a time and as a padded batch)")
    parser.add_argument("--json", help="write the figures to this file")


def run(args: argparse.Namespace) -> int:
    requests = load_workload(args.workload, args.num_prompts)
    results = {"workload": args.workload, "num_prompts": len(requests), "threads": torch.get_num_threads(),
               "leanserve": _leanserve(args, requests)}
    if args.transformers:
        results["transformers"] = transformers_figures(args, requests)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
