"""`leanserve bench scoreboard`: LeanServe against llama.cpp's llama-server, vLLM (CPU build) and
transformers, one engine at a time on this machine, on the same workload; writes docs/benchmarks.md.

Workloads, each through `leanserve bench serve`'s load generator (streamed chat, greedy, ignore_eos):
  1. the first 64 requests of the workload, all at once;
  2. Poisson arrivals at 80% of llama-server's request capacity measured in (1);
  3. one request at a time (the first `--single-requests`).
transformers runs offline on workload (3)'s prompts, one at a time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from leanserve.bench.serve import plot, run_load, summarize
from leanserve.bench.workload import DEFAULT_WORKLOAD, load_workload
from leanserve.kernels.cpu_kernels import cpu_model, runnable_levels

PEERS = Path("../shared/peers")
MODELS = {"smollm2": "SmolLM2-135M-Instruct (the GGUF file for llama-server and LeanServe, the same weights "
                     "dequantized to safetensors for vLLM)",
          "gemma3-270m": "Gemma 3 270M Q4_K_M (the same GGUF file for llama-server and LeanServe; Gemma's chat turns)"}


def wait_healthy(base: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{base} did not become healthy in {timeout:.0f} s")


def wait_port_free(port: int, timeout: float = 120.0) -> None:
    """Wait until the port can be bound without SO_REUSEADDR: a server that does not set it (llama-server)
    cannot bind while the last server's connections on the port are in TIME_WAIT (up to 60 s)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} is still in use after {timeout:.0f} s") from None
        time.sleep(1)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def engine_commands(args: argparse.Namespace) -> dict[str, tuple[str, float]]:
    """name -> (shell command that serves the default model on its port, seconds it may take to start)."""
    from leanserve.engine.loader import resolve_model_path

    gguf = resolve_model_path(args.model)
    commands = {}
    # A Gemma file without a chat template: LeanServe renders Gemma's turns (loader), llama-server is told to.
    template = " --chat-template gemma" if args.model.startswith("gemma") else ""
    if "llama-server" in args.engines:
        binary = subprocess.run([str(PEERS / "build-llama-server")], check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1]
        commands["llama-server"] = (
            f"{binary} -m {gguf} --host 127.0.0.1 --port {args.port} -t {os.cpu_count()} "
            f"-np {args.llama_slots} -c {args.llama_slots * 4096} --cont-batching --alias {args.model}{template}", 120)
    if "vllm" in args.engines:
        if args.model != "smollm2":
            raise ValueError("the vLLM peer serves the default model only (--engines without vllm)")
        start = subprocess.run([str(PEERS / "setup-vllm-cpu"), str(args.port)], check=True, capture_output=True,
                               text=True).stdout.strip().splitlines()[-1]
        commands["vllm"] = (start, 600)
    serve = f"{shlex.quote(sys.executable)} -m leanserve.cli serve {args.model} --port {args.port} {args.leanserve_args}"
    if "leanserve" in args.engines:
        commands["leanserve"] = (serve, 180)
    if "leanserve-avx2" in args.engines:         # the AVX2 build, forced on a CPU that has better
        commands["leanserve-avx2"] = (f"LEANSERVE_CPU_ISA=avx2 {serve}", 180)
    return commands


def run_workloads(base: str, args: argparse.Namespace, name: str, workloads: list[str],
                  rate: float | None) -> dict[str, tuple[dict, list]]:
    """Each workload once against the server at `base`: {workload: (summary, per-request outcomes)}."""
    requests = load_workload(args.workload)
    specs = {"all_at_once": (requests[:64], float("inf"), None),
             "poisson": (requests[:args.poisson_requests], rate, None),
             "one_at_a_time": (requests[:args.single_requests], float("inf"), 1)}
    results = {}
    for workload in workloads:
        chosen, workload_rate, concurrency = specs[workload]
        outcomes, duration = asyncio.run(run_load(
            base, chosen, model=args.model, rate=workload_rate, burstiness=1.0, max_concurrency=concurrency,
            seed=args.seed, api_key=None))
        results[workload] = (summarize(outcomes, duration, {}), outcomes)
        print(f"{name} {workload}: {results[workload][0]['output_token_throughput']:.1f} output tok/s, "
              f"TTFT p50 {results[workload][0]['ttft_ms']['p50']:.0f} ms", flush=True)
    return results


def median_runs(name: str, runs: dict[str, list[tuple[dict, list]]], plots: Path, tag: str = "") -> dict:
    """Per workload, the run with the median output tokens/s (the lower middle one of an even count), with
    its plot and every run's output tokens/s: this machine's speed drifts by 10-15% over minutes."""
    results = {}
    for workload, measured in runs.items():
        measured = sorted(measured, key=lambda run: run[0]["output_token_throughput"])
        summary, outcomes = measured[(len(measured) - 1) // 2]
        summary["runs_output_token_throughput"] = [s["output_token_throughput"] for s, _ in measured]
        path = plots / f"{tag}{name}-{workload}.png"
        plot(outcomes, str(path), f"{name}: {workload}")
        summary["plot"] = str(path)
        results[workload] = summary
    return results


def transformers_one_at_a_time(args: argparse.Namespace) -> dict:
    from leanserve.bench.throughput import transformers_figures
    options = argparse.Namespace(model=args.model, decode_tokens=64, hf_requests=args.single_requests)
    return transformers_figures(options, load_workload(args.workload, args.single_requests))


def verdict(results: dict, workload: str) -> list[str]:
    """Each LeanServe build against the best peer on `workload`, as ratios (lines for the markdown)."""
    peers = {e: r[workload] for e, r in results.items()
             if not e.startswith("leanserve") and e != "transformers" and workload in r and r[workload].get("completed")}
    if not peers:
        return []
    best = max(peers, key=lambda e: peers[e]["output_token_throughput"])
    out = []
    for name in [e for e in results if e.startswith("leanserve") and workload in results[e]]:
        ours = results[name][workload]
        lines = [f"{name} against the peer with the most output tokens/s ({best}): "
                 f"{ours['output_token_throughput'] / peers[best]['output_token_throughput']:.2f}x the output "
                 f"tokens/s, TTFT p50 {ours['ttft_ms']['p50'] / peers[best]['ttft_ms']['p50']:.2f}x theirs."]
        for stat in ("ttft_ms", "tpot_ms"):
            lowest = min(p[stat]["p99"] for p in peers.values() if p[stat]["p99"] is not None)
            lines.append(f"{stat[:4].upper()} p99: {name} {ours[stat]['p99']:.0f} ms, lowest peer {lowest:.0f} ms.")
        out += [" ".join(lines), ""]
    return out


def write_markdown(results: dict, commands: dict, args: argparse.Namespace, path: Path) -> None:
    def cell(summary: dict | None, key: str, stat: str | None = None) -> str:
        if summary is None:
            return "—"
        value = summary[key] if stat is None else summary[key][stat]
        return "—" if value is None else f"{value:.1f}"

    lines = ["# Benchmarks: LeanServe and its peers, side by side", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on one machine, one engine at a time: "
             f"{cpu_model()} ({runnable_levels()[0]}: LeanServe's native kernels run that level; leanserve-avx2, "
             f"where present, is its AVX2 build forced), {os.cpu_count()} cores, Python {platform.python_version()}.",
             f"Workload: `{args.workload}` (streamed chat, greedy, `ignore_eos`: every engine produces exactly "
             f"`max_tokens` tokens). Model: {MODELS[args.model]}.", ""]
    if args.repeats > 1:
        lines += [f"Each engine was started {args.repeats} times, the engines in turn (so that each samples the "
                  "same stretches of the machine's speed), and run through the workloads each time (a fresh "
                  "server, so no prefix cache carries over); each row is the run with the median output tokens/s, "
                  "with the lowest and highest of all runs in parentheses.", ""]
    for workload, title in [("all_at_once", "(1) first 64 requests, all at once"),
                            ("poisson", "(2) Poisson arrivals at 80% of llama-server's capacity"),
                            ("one_at_a_time", "(3) one request at a time")]:
        lines += [f"## {title}", "", "| engine | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
                  "| TPOT p99 ms | E2E p50 ms | failed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for engine, by_workload in results.items():
            s = by_workload.get(workload)
            if s is not None and engine == "transformers":
                lines.append(f"| transformers (offline, float32) | {s['one_at_a_time_output_tokens_per_s']:.1f} "
                             "| — | — | — | — | — | — | 0 |")
                continue
            if s is None:
                continue
            runs = s.get("runs_output_token_throughput", [])
            spread = f" ({runs[0]:.1f}-{runs[-1]:.1f})" if len(runs) > 1 else ""
            lines.append(f"| {engine} | {cell(s, 'output_token_throughput')}{spread} | {s['request_throughput']:.3f} | "
                         f"{cell(s, 'ttft_ms', 'p50')} | {cell(s, 'ttft_ms', 'p99')} | {cell(s, 'tpot_ms', 'p50')} | "
                         f"{cell(s, 'tpot_ms', 'p99')} | {cell(s, 'e2el_ms', 'p50')} | {s['failed']} |")
        lines += [""] + verdict(results, workload) + [f"![{e} {workload}](plots/{Path(r[workload]['plot']).name})"
                         for e, r in results.items() if "plot" in r.get(workload, {})]
        lines.append("")
    failed = [f"- {engine}: {r['error']}" for engine, r in results.items() if "error" in r]
    if failed:
        lines += ["## Engines that failed", ""] + failed + [""]
    lines += ["## Commands", "", "```sh", f"leanserve bench scoreboard {' '.join(sys.argv[3:])}"]
    lines += [f"# {name}: {command}" for name, (command, _) in commands.items()]
    lines += ["```", ""]
    path.write_text("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    out = Path(args.out)
    plots = out.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    commands = engine_commands(args)
    names = [e for e in ("llama-server", "vllm", "leanserve", "leanserve-avx2") if e in commands]
    runs: dict[str, dict[str, list]] = {name: {} for name in names}
    failed: dict[str, str] = {}
    rate = None
    # Round robin, each run on a fresh server (no prefix cache carries over): every engine's runs sample
    # the same stretches of the machine's speed, which drifts by 10-15% over minutes here.
    for attempt in range(args.repeats):
        for name in [n for n in names if n not in failed]:
            command, startup = commands[name]
            print(f"starting {name} ({attempt + 1} of {args.repeats}): {command}", flush=True)
            try:
                wait_port_free(args.port)
                process = subprocess.Popen(command, shell=True, start_new_session=True, stdout=subprocess.DEVNULL,
                                           stderr=open(plots / f"{name}.log", "w"))
                try:
                    base = f"http://127.0.0.1:{args.port}"
                    wait_healthy(base, process, startup)
                    measured = run_workloads(base, args, name, ["all_at_once"], None)
                    if name == "llama-server" and rate is None:     # its capacity sets everyone's Poisson rate
                        rate = 0.8 * measured["all_at_once"][0]["request_throughput"]
                    measured.update(run_workloads(base, args, name, ["poisson", "one_at_a_time"] if rate else
                                                  ["one_at_a_time"], rate))
                    for workload, run in measured.items():
                        runs[name].setdefault(workload, []).append(run)
                finally:
                    stop(process)
            except Exception as e:  # noqa: BLE001 - one engine failing must not lose the others' figures
                print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
                failed[name] = f"{type(e).__name__}: {e}"
    results: dict = {}
    for name in names:
        results[name] = {"error": failed[name]} if name in failed else {}
        results[name].update(median_runs(name, runs[name], plots, "" if args.model == "smollm2" else f"{args.model}-"))
    if "transformers" in args.engines:
        results["transformers"] = {"one_at_a_time": transformers_one_at_a_time(args)}
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, commands, args, out)
    print(f"wrote {out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines", nargs="+", default=["llama-server", "vllm", "leanserve", "transformers"],
                        choices=["llama-server", "vllm", "leanserve", "leanserve-avx2", "transformers"],
                        help="leanserve-avx2: LeanServe's AVX2 build forced (LEANSERVE_CPU_ISA=avx2)")
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS), help="the model alias every engine serves")
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD))
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--llama-slots", type=int, default=8, help="llama-server parallel slots")
    parser.add_argument("--leanserve-args", default="", help="extra options for leanserve serve")
    parser.add_argument("--poisson-requests", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="times each engine is started and run through the workloads, the engines in turn; per "
                             "workload, the run with the median output tokens/s is reported")
    parser.add_argument("--out", default="docs/benchmarks.md")
