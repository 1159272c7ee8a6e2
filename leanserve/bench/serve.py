"""`leanserve bench serve`: a load generator for any OpenAI-compatible server.

Sends the workload's chat requests streamed, greedy and with `ignore_eos`, so
each asks exactly its `max_tokens`; arrivals follow vLLM's `bench serve`
(gamma-distributed gaps: burstiness 1 is a Poisson process, lower is
burstier). Reports throughput, TTFT, TPOT, inter-token and end-to-end latency
(mean, p50, p99) and goodput under the given SLOs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from leanserve.bench.workload import DEFAULT_WORKLOAD, ChatRequest, load_workload


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)   # arrival time of each content chunk

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between request starts: gamma(shape=burstiness, mean=1/rate), all zero for rate inf."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(count)]


async def send(client: httpx.AsyncClient, url: str, model: str, request: ChatRequest, headers: dict,
               extra_body: dict | None = None) -> RequestResult:
    body = {"model": model, "messages": request.messages, "max_tokens": request.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra_body or {})}
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                now = time.perf_counter()
                if any(c.get("delta", {}).get("content") for c in event.get("choices") or []):
                    if not result.token_times:
                        result.ttft = now - result.start
                    result.token_times.append(now)
                    chunks += 1
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
        result.latency = time.perf_counter() - result.start
        result.output_tokens = result.output_tokens or chunks
        result.ok = bool(result.token_times)
        if not result.ok:
            result.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(base_url: str, requests: list[ChatRequest], *, model: str | None, rate: float,
                   burstiness: float, max_concurrency: int | None, seed: int, api_key: str | None,
                   progress: bool = True, extra_body: dict | None = None) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        if model is None:
            response = await client.get(f"{base_url}/v1/models", headers=headers)
            if response.status_code != 200:
                raise ValueError(f"{base_url}/v1/models answered {response.status_code} ({response.text[:200]}); "
                                 "is the server up with its model loaded? Or name the model with --model")
            model = response.json()["data"][0]["id"]
        url = f"{base_url}/v1/chat/completions"
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)

        async def one(request: ChatRequest) -> RequestResult:
            if gate is None:
                result = await send(client, url, model, request, headers, extra_body)
            else:
                async with gate:
                    result = await send(client, url, model, request, headers, extra_body)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, arrival_gaps(len(requests), rate, burstiness, seed)):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return results, duration


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))] * scale
    return {"mean": statistics.fmean(values) * scale, "p50": pct(50), "p99": pct(99)}


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float]) -> dict:
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)

    def meets_slo(r: RequestResult) -> bool:
        measured = {"ttft": r.ttft * 1000, "tpot": (r.tpot or 0.0) * 1000, "e2el": r.latency * 1000}
        return all(measured[k] <= limit for k, limit in goodput.items())

    summary = {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "request_throughput": len(done) / duration, "output_token_throughput": output / duration,
        "total_token_throughput": (output + prompt) / duration, "prompt_tokens": prompt, "output_tokens": output,
        "ttft_ms": _stats([r.ttft for r in done]), "tpot_ms": _stats([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats([x for r in done for x in r.itls]), "e2el_ms": _stats([r.latency for r in done]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }
    if goodput:
        summary["goodput"] = sum(meets_slo(r) for r in done) / duration
        summary["slo_ms"] = goodput
    return summary


def print_summary(summary: dict) -> None:
    print(f"{'completed / failed':<32} {summary['completed']} / {summary['failed']}")
    print(f"{'duration (s)':<32} {summary['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':<32} {summary['request_throughput']:.3f}")
    print(f"{'output token throughput (tok/s)':<32} {summary['output_token_throughput']:.1f}")
    print(f"{'total token throughput (tok/s)':<32} {summary['total_token_throughput']:.1f}")
    for key, label in [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")]:
        s = summary[key]
        if s["mean"] is not None:
            print(f"{label + ' (ms) mean / p50 / p99':<32} {s['mean']:.1f} / {s['p50']:.1f} / {s['p99']:.1f}")
    if "goodput" in summary:
        print(f"{'goodput (req/s)':<32} {summary['goodput']:.3f}  under {summary['slo_ms']}")
    for error in summary["errors"]:
        print(f"error: {error}")


def plot(results: list[RequestResult], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    t0 = min((r.start for r in done), default=0.0)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, values, label in [(axes[0], [r.ttft for r in done], "TTFT (s)"),
                              (axes[1], [r.tpot * 1000 for r in done if r.tpot is not None], "TPOT (ms)"),
                              (axes[2], [r.latency for r in done], "end-to-end latency (s)")]:
        ax.hist(values, bins=30)
        ax.set_xlabel(label)
        ax.set_ylabel("requests")
    times = sorted(t - t0 for r in done for t in r.token_times)
    if times:
        seconds = int(times[-1]) + 1
        counts = [0] * seconds
        for t in times:
            counts[int(t)] += 1
        axes[3].plot(range(seconds), counts)
    axes[3].set_xlabel("time (s)")
    axes[3].set_ylabel("output tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[name] = float(value)
    return slos


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model name to send (default: the server's first model)")
    parser.add_argument("--api-key")
    parser.add_argument("--goodput", nargs="*", metavar="SLO", help="SLOs like ttft:2000 tpot:100 (milliseconds)")
    parser.add_argument("--json", help="write the summary (and the command's arguments) to this file")
    parser.add_argument("--plot", help="write latency distributions and tokens/s over time to this PNG")
    parser.add_argument("--extra-body", type=json.loads, help="JSON fields added to every request, e.g. "
                        """'{"response_format": {"type": "json_object"}}'""")


def run(args: argparse.Namespace) -> int:
    goodput = parse_goodput(args.goodput)
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be positive")
    requests = load_workload(args.workload, args.num_prompts)
    results, duration = asyncio.run(run_load(
        args.base_url, requests, model=args.model, rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, seed=args.seed, api_key=args.api_key, extra_body=args.extra_body))
    summary = summarize(results, duration, goodput)
    print_summary(summary)
    if args.json:
        arguments = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and not callable(v)}
        Path(args.json).write_text(json.dumps({"arguments": arguments, **summary}, indent=2, default=str))
    if args.plot:
        plot(results, args.plot, f"{args.base_url}: {len(requests)} requests, rate {args.request_rate}")
    return 0 if summary["failed"] == 0 else 1
