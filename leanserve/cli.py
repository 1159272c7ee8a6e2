"""The `leanserve` command."""
from __future__ import annotations

import argparse
import logging
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from leanserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, quantization=args.quantization)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    prompts = args.prompt or ["Write a haiku about a small, fast inference engine.",
                              "What is the capital of France? Answer in one sentence.",
                              "Explain what a KV cache is in two sentences."]
    start = time.perf_counter()
    if args.raw:
        outputs = llm.generate(prompts, params)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    elapsed = time.perf_counter() - start
    for prompt, output in zip(prompts, outputs):
        print(f"\n>>> {prompt}\n{output.outputs[0].text}  [{output.outputs[0].finish_reason}]")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests, {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from leanserve.engine.quantize import save_quantized

    start = time.perf_counter()
    formats = save_quantized(args.model, args.out, args.quantization, group_size=args.group_size)
    counts = {fmt: list(formats.values()).count(fmt) for fmt in sorted(set(formats.values()))}
    print(f"wrote {args.out} ({args.quantization}: {counts} modules) in {time.perf_counter() - start:.1f} s")
    return 0


def _env(args: argparse.Namespace) -> int:
    """Print the CPU, the ISA levels it runs and the native kernels' build; build them if needed."""
    import platform
    import subprocess

    import torch

    from leanserve.kernels import cpu_kernels

    if args.build_all:          # each level in its own process: importing a level this CPU cannot run may crash
        for level in cpu_kernels.buildable_levels():
            code = f"from leanserve.kernels import cpu_kernels; cpu_kernels.build({level!r})"
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            runnable = level in cpu_kernels.runnable_levels()
            if result.returncode != 0 and (runnable or "error" in result.stderr.lower()):
                print(f"{level}: build failed\n{result.stderr[-2000:]}", file=sys.stderr)
                return 1
            print(f"built {level}" + ("" if runnable else " (this CPU cannot run it)"))
    info = cpu_kernels.describe()
    for key, value in info.items():
        print(f"{key + ':':<18}{value}")
    print(f"{'platform:':<18}{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    kernels = cpu_kernels.native_kernels()
    native = kernels is not None
    path = f"native {kernels.ISA}" if native else "torch (dequantized float32 linears, SDPA attention)"
    for op in ("linear (int4/int8 blocks as stored, float32)", "decode attention (lean)", "prefill attention",
               "rotary + KV-cache write", "RMSNorm, SiLU-and-multiply", "layer loop"):
        print(f"  {op:<48}{path}")
    if native:
        print("  (a model the native executor cannot take, such as LLM.int8 or bfloat16, runs on the torch model;")
        print("   the server's load log and leanserve:kernels_info in /metrics name what each model runs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanserve", description="LLM inference serving engine")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate from prompts offline (chat template by default)")
    gen.add_argument("prompt", nargs="*", help="prompts (a few demo prompts if none)")
    gen.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a HuggingFace directory")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--quantization", choices=["int8", "int4", "llm_int8", "float"],
                     help="weight format (default: the checkpoint's)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.set_defaults(func=_generate)

    quant = commands.add_parser("quantize", help="write a quantized copy of a model (loads with LLM(OUT) or serve OUT)")
    quant.add_argument("model", help="'smollm2', a .gguf file or a HuggingFace directory")
    quant.add_argument("out", help="output directory (config.json, tokenizer files, model.safetensors)")
    quant.add_argument("--quantization", required=True, choices=["int8", "int4", "llm_int8"],
                       help="int8 or int4 weight-only, or LLM.int8() (W8A8 with float outliers)")
    quant.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                       help="int4 group size along K (GGUF Q4_0/Q4_1 blocks stay group 32, as stored)")
    quant.set_defaults(func=_quantize)

    env = commands.add_parser("env", help="the CPU, its ISA levels and the native kernels (builds them if needed)")
    env.add_argument("--build-all", action="store_true",
                     help="also build every level this compiler can build, for CPUs other than this one")
    env.set_defaults(func=_env)

    from leanserve.server import serve
    srv = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    serve.add_arguments(srv)
    srv.set_defaults(func=serve.run)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from leanserve.bench import (attention, masks, perplexity, prefill, scoreboard, serve as bench_serve, soak,
                                 throughput)
    for name, help_text, add_arguments, func in [
        ("scoreboard", "LeanServe against llama-server, vLLM and transformers; writes docs/benchmarks.md",
         scoreboard.add_arguments, scoreboard.run),
        ("serve", "load generator against an OpenAI-compatible server", bench_serve.add_arguments, bench_serve.run),
        ("throughput", "offline throughput on a chat workload, optionally against transformers",
         throughput.add_arguments, throughput.run),
        ("prefill", "prepacked prefill against padded and one-at-a-time prefill",
         prefill.add_prefill_arguments, prefill.run_prefill),
        ("chunked-prefill", "decode latency while a long prompt arrives, chunked or not",
         prefill.add_chunked_arguments, prefill.run_chunked),
        ("attention", "lean decode attention against padded and per-sequence SDPA on ragged contexts",
         attention.add_arguments, attention.run),
        ("perplexity", "perplexity and decode-step time of each weight format (float, int8, int4, llm_int8)",
         perplexity.add_arguments, perplexity.run),
        ("masks", "what a structured output adds to each step: masks, applying them, consuming tokens",
         masks.add_arguments, masks.run),
        ("soak", "a mix of requests as users send them through a real server, then memory, leaks and errors",
         soak.add_arguments, soak.run),
    ]:
        sub = bench.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)      # one line per benchmark request is noise
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"leanserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
