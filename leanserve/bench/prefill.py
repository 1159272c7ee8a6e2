"""Prefill benchmarks.

`leanserve bench prefill`: 32 prompts of the workload spread over its length
range, prefilled (a) as transformers' padded batch (every prompt padded to the
longest, attention mask), (b) one at a time (transformers and LeanServe), and
(c) prepacked by LeanServe. Reports seconds, tokens/s, peak memory and the
fraction of the machine's float32 matrix-product rate reached.

`leanserve bench chunked-prefill`: inter-token latency of decoding requests
while a long prompt arrives, with and without chunked prefill.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from leanserve.bench.workload import DEFAULT_WORKLOAD, load_workload


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def spread_prompts(llm, workload: str, count: int) -> list[list[int]]:
    """`count` chat prompts of the workload at evenly spaced ranks of their token length."""
    tokenizer = llm.tokenizer
    prompts = sorted((tokenizer.encode(tokenizer.apply_chat_template(r.messages), add_special_tokens=False)
                      for r in load_workload(workload)), key=len)
    step = (len(prompts) - 1) / (count - 1)
    return [prompts[round(i * step)] for i in range(count)]


def _measure(label: str, run, tokens: int, flop_per_token: float, machine_gflops: float) -> dict:
    reset_peak_rss()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    gflops = flop_per_token * tokens / seconds / 1e9
    result = {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_rss_gib": peak_rss_bytes() / 2**30,
              "gflops": gflops, "fraction_of_matmul_rate": gflops / machine_gflops}
    print(f"{label:<34} {seconds:8.2f} s {tokens / seconds:9.0f} tok/s  peak {result['peak_rss_gib']:5.2f} GiB"
          f"  {gflops:6.1f} GFLOP/s ({100 * result['fraction_of_matmul_rate']:.0f}% of matmul)")
    return result


def run_prefill(args: argparse.Namespace) -> int:
    from leanserve import LLM, SamplingParams

    # float32 weights: the figure is against the float32 matrix-product rate and transformers' float32.
    llm = LLM(args.model, max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
              quantization="float")
    prompts = spread_prompts(llm, args.workload, args.num_prompts)
    tokens = sum(len(p) for p in prompts)
    cfg = llm.engine.model_config
    # Matrix-product work per token: every weight but the embedding table (the head runs once per prompt).
    params = sum(p.numel() for n, p in llm.engine.runner.model.named_parameters() if "embed" not in n)
    flop_per_token = 2 * params
    machine = matmul_gflops()
    print(f"{len(prompts)} prompts, {tokens} tokens (shortest {len(prompts[0])}, longest {len(prompts[-1])}); "
          f"{params / 1e6:.1f} M matrix parameters; float32 matmul {machine:.0f} GFLOP/s; "
          f"{torch.get_num_threads()} threads")
    first_token = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(prompts[:2], first_token, use_tqdm=False)     # warm-up
    results = {"prompts": len(prompts), "tokens": tokens, "matmul_gflops": machine, "matrix_parameters": params}
    results["leanserve_prepacked"] = _measure(
        "LeanServe prepacked", lambda: llm.generate(prompts, first_token, use_tqdm=False),
        tokens, flop_per_token, machine)
    results["leanserve_one_at_a_time"] = _measure(
        "LeanServe one at a time", lambda: [llm.generate([p], first_token, use_tqdm=False) for p in prompts],
        tokens, flop_per_token, machine)
    if args.transformers:
        from leanserve.bench.reference import load_transformers
        model = load_transformers(args.model)[1]
        pad = cfg.vocab_size - 1

        def padded():
            width = len(prompts[-1])
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

        def one_at_a_time():
            with torch.inference_mode():
                for p in prompts:
                    model(input_ids=torch.tensor([p]), logits_to_keep=1)

        results["transformers_one_at_a_time"] = _measure("transformers one at a time", one_at_a_time, tokens,
                                                         flop_per_token, machine)
        results["transformers_padded"] = _measure("transformers padded batch", padded, tokens,
                                                  flop_per_token, machine)
        results["speedup_prepacked_vs_padded"] = (results["transformers_padded"]["seconds"]
                                                  / results["leanserve_prepacked"]["seconds"])
        print(f"prepacked is {results['speedup_prepacked_vs_padded']:.1f}x faster than the padded batch")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def run_chunked(args: argparse.Namespace) -> int:
    """Inter-token latency of `--decoders` decoding requests while a `--prompt-tokens` prompt is prefilled."""
    from leanserve import LLM, SamplingParams

    results = {}
    for chunked in (True, False):
        llm = LLM(args.model, max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=chunked,
                  enable_prefix_caching=False)
        engine = llm.engine
        decode = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
        for i in range(args.decoders):
            engine.add_request(f"decoder-{i}", [1 + i, 2, 3, 4], decode)
        for _ in range(4):                                  # all decoding before the long prompt comes
            engine.step()
        g = torch.Generator().manual_seed(0)
        long_prompt = torch.randint(10, engine.model_config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        engine.add_request("long", long_prompt, SamplingParams(temperature=0.0, max_tokens=1))
        gaps, last, prefilled = [], time.perf_counter(), False
        while not prefilled:
            outputs = engine.step()
            now = time.perf_counter()
            if any(o.request_id.startswith("decoder") for o in outputs):
                gaps.append(now - last)
                last = now
            prefilled = any(o.request_id == "long" and o.finished for o in outputs)
        for i in range(args.decoders):
            engine.abort_request(f"decoder-{i}")
        label = "chunked" if chunked else "not chunked"
        results[label] = {"max_itl_s": max(gaps), "mean_itl_s": statistics.mean(gaps), "decode_steps": len(gaps)}
        print(f"{label:<12} inter-token latency while the prompt prefills: max {max(gaps):.2f} s, "
              f"mean {statistics.mean(gaps):.3f} s over {len(gaps)} steps")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def add_prefill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--transformers", action="store_true", help="also time transformers (padded and one at a time)")
    parser.add_argument("--json", help="write the figures to this file")


def add_chunked_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--decoders", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--json", help="write the figures to this file")
