"""`leanserve bench soak`: many requests through a real server, mixed as users send them, then what is left.

Starts `leanserve serve` with a small `--max-queued-requests` and sends `--requests` requests, `--concurrency`
at a time to a server running few sequences at once (so requests queue, and bursts past the queue limit get
429, which the client retries after a pause as clients do), each drawn from a seeded mix: chat and
completions, streamed and not, `n` up to 4, stop strings, clients that disconnect mid-stream, and invalid
bodies. Reports anonymous resident memory (RssAnon) after a warm-up and at the end, its growth per request,
the KV-cache blocks still in use (must be 0), requests lost (no complete answer and no error: must be 0) and
5xx answers (must be 0). Exits 1 if one of those is not 0 or memory grew by more than --max-growth bytes per
request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from leanserve.bench.scoreboard import stop, wait_healthy, wait_port_free

WORDS = "the lighthouse keeper walked along a quiet shore under grey skies and counted every wave".split()
INVALID = [
    (b"{not json", "chat"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), "chat"),
    (json.dumps({"messages": []}).encode(), "chat"),
    (json.dumps({"prompt": "x", "max_tokens": 10**7}).encode(), "completions"),
    (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), "completions"),
]


def rss_anon_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/PID/status")


def metric(base: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def wait_idle(base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(base, "leanserve:num_requests_running") or metric(base, "leanserve:num_requests_waiting"):
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not go idle")
        time.sleep(0.2)


def make_request(rng: random.Random, max_tokens: int) -> dict:
    """One request of the mix: what to send and how the client behaves."""
    kind = rng.choices(["chat", "completions", "disconnect", "invalid"], weights=[50, 30, 12, 8])[0]
    if kind == "invalid":
        body, endpoint = rng.choice(INVALID)
        return {"kind": kind, "endpoint": endpoint, "raw": body, "stream": False}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
    body = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0.0, 0.7, 1.0]),
            "n": rng.choice([1, 1, 2, 4]), "seed": rng.randint(0, 2**31)}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(WORDS, 2)
    if kind == "completions":
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    stream = kind == "disconnect" or rng.random() < 0.5
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return {"kind": kind, "endpoint": "completions" if kind == "completions" else "chat", "body": body,
            "stream": stream}


async def send_retrying(client: httpx.AsyncClient, request: dict, rng: random.Random, refusals: Counter) -> str:
    """Send one request, retrying a 429 after a pause of up to a second (the server's Retry-After is 1 s), up
    to 20 times."""
    for _ in range(20):
        outcome = await send(client, request, rng)
        if outcome != "429":
            return outcome
        refusals["429"] += 1
        await asyncio.sleep(rng.uniform(0.1, 1.0))
    return "429 20 times"


async def send(client: httpx.AsyncClient, request: dict, rng: random.Random) -> str:
    """Send one request; its outcome: 'ok', '4xx', '429', 'disconnected', '5xx' or 'lost: why'."""
    url = f"/v1/{'chat/completions' if request['endpoint'] == 'chat' else 'completions'}"
    content = request.get("raw") or json.dumps(request["body"]).encode()
    headers = {"content-type": "application/json"}
    try:
        if not request["stream"]:
            response = await client.post(url, content=content, headers=headers)
            return _judge(response.status_code, request, response.json() if response.status_code == 200 else None)
        async with client.stream("POST", url, content=content, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return _judge(response.status_code, request, None)
            events, keep = [], rng.randint(1, 4)
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if request["kind"] == "disconnect" and len(events) >= keep:
                    return "disconnected"                 # closing the stream here is the disconnect
            if not events or events[-1] != "[DONE]":
                return "lost: the stream ended without [DONE]"
            if any("error" in json.loads(e) for e in events[:-1]):
                return "5xx"
            return "ok"
    except httpx.HTTPError as e:
        return f"lost: {type(e).__name__}"


def _judge(status: int, request: dict, answer: dict | None) -> str:
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    if 400 <= status < 500:
        return "4xx" if request["kind"] == "invalid" else f"lost: {status} for a valid request"
    if request["kind"] == "invalid":
        return f"lost: {status} for an invalid request"
    n = request["body"]["n"]
    if answer is None or len(answer.get("choices", [])) != n:
        return "lost: wrong number of choices"
    return "ok"


async def run_mix(base: str, count: int, concurrency: int, max_tokens: int, seed: int, on_done,
                  refusals: Counter) -> Counter:
    rng = random.Random(seed)
    requests = [make_request(rng, max_tokens) for _ in range(count)]
    outcomes: Counter = Counter()
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def one(i: int, request: dict) -> None:
            async with semaphore:
                outcome = await send_retrying(client, request, random.Random(seed + i), refusals)
            outcomes[outcome] += 1
            on_done(sum(outcomes.values()))
        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return outcomes


def run(args: argparse.Namespace) -> int:
    wait_port_free(args.port)
    command = [sys.executable, "-m", "leanserve.cli", "serve", args.model, "--port", str(args.port),
               "--max-num-seqs", str(args.max_num_seqs), "--max-queued-requests", str(args.max_queued_requests),
               "--kv-cache-tokens", str(args.kv_cache_tokens),
               "--log-level", "warning"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(base, process, 600)
        memory: dict[str, int] = {"start": rss_anon_bytes(process.pid)}

        def progress(done: int) -> None:
            if done == args.warmup:
                memory["warm"] = rss_anon_bytes(process.pid)
            if done % 100 == 0:
                print(f"{done} of {args.requests} requests", flush=True)

        start, refusals = time.perf_counter(), Counter()
        outcomes = asyncio.run(run_mix(base, args.requests, args.concurrency, args.max_tokens, args.seed, progress,
                                       refusals))
        elapsed = time.perf_counter() - start
        wait_idle(base)
        memory["end"] = rss_anon_bytes(process.pid)
        kv_usage = metric(base, "leanserve:kv_cache_usage_perc")
    finally:
        stop(process)
    lost = sum(n for outcome, n in outcomes.items() if outcome.startswith("lost"))
    growth = (memory["end"] - memory["warm"]) / max(1, args.requests - args.warmup)
    print(f"\n{args.requests} requests in {elapsed:.0f} s, {args.concurrency} at a time, "
          f"--max-queued-requests {args.max_queued_requests}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
          + f"; {refusals['429']} answers 429 on the way (each retried after a pause)")
    print(f"RssAnon: {memory['start'] / 2**20:.1f} MiB at start, {memory['warm'] / 2**20:.1f} MiB after "
          f"{args.warmup} requests, {memory['end'] / 2**20:.1f} MiB at the end: {growth:.0f} bytes per request after "
          f"the warm-up (target < {args.max_growth})")
    print(f"KV cache in use when idle: {kv_usage:.4f} (must be 0); lost: {lost} (must be 0); "
          f"5xx: {outcomes['5xx']} (must be 0)")
    failed = kv_usage != 0 or lost or outcomes["5xx"] or growth > args.max_growth
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200, help="requests before the first memory reading")
    parser.add_argument("--concurrency", type=int, default=24, help="requests in flight")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the server's; few, so that requests queue")
    parser.add_argument("--max-queued-requests", type=int, default=8, help="the server's; bursts past it get 429")
    parser.add_argument("--kv-cache-tokens", type=int, default=4096,
                        help="the server's; small, so that the warm-up touches all of the cache's pages (it is "
                             "allocated untouched, and its pages count in RssAnon as blocks are first used)")
    parser.add_argument("--max-tokens", type=int, default=24, help="each request's max_tokens is drawn from 1..this")
    parser.add_argument("--max-growth", type=int, default=2048, help="bytes of RssAnon growth per request allowed")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--seed", type=int, default=0)
