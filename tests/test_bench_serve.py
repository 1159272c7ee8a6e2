"""The load generator: arrival process and summary on synthetic results (the live run is in test_server_e2e)."""
import asyncio
import math
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from leanserve.bench.serve import RequestResult, arrival_gaps, parse_goodput, run_load, summarize
from leanserve.bench.workload import ChatRequest


def test_arrivals_are_gamma_with_the_asked_rate_and_burstiness():
    poisson = arrival_gaps(20000, rate=4.0, burstiness=1.0, seed=1)
    bursty = arrival_gaps(20000, rate=4.0, burstiness=0.25, seed=1)
    assert statistics.fmean(poisson) == pytest.approx(0.25, rel=0.05)
    assert statistics.fmean(bursty) == pytest.approx(0.25, rel=0.1)
    # Coefficient of variation is 1/sqrt(shape): 1 for Poisson, 2 for shape 0.25.
    assert statistics.pstdev(poisson) / statistics.fmean(poisson) == pytest.approx(1.0, rel=0.05)
    assert statistics.pstdev(bursty) / statistics.fmean(bursty) == pytest.approx(2.0, rel=0.1)
    assert arrival_gaps(3, rate=math.inf, burstiness=1.0, seed=0) == [0.0, 0.0, 0.0]


def test_summary_latencies_and_goodput():
    fast = RequestResult(ok=True, start=0.0, ttft=0.1, latency=1.0, prompt_tokens=10, output_tokens=10,
                         token_times=[0.1 + 0.1 * i for i in range(10)])
    slow = RequestResult(ok=True, start=0.0, ttft=3.0, latency=5.0, prompt_tokens=20, output_tokens=5,
                         token_times=[3.0, 3.5, 4.0, 4.5, 5.0])
    failed = RequestResult(error="HTTP 500")
    summary = summarize([fast, slow, failed], duration=10.0, goodput=parse_goodput(["ttft:1000", "tpot:200"]))
    assert (summary["completed"], summary["failed"]) == (2, 1)
    assert summary["output_token_throughput"] == pytest.approx(1.5)
    assert summary["total_token_throughput"] == pytest.approx(4.5)
    assert summary["ttft_ms"]["p50"] == pytest.approx(100) and summary["ttft_ms"]["p99"] == pytest.approx(3000)
    assert summary["tpot_ms"]["mean"] == pytest.approx((100 + 500) / 2)
    assert summary["goodput"] == pytest.approx(0.1)          # only the fast request meets both SLOs
    assert summary["errors"] == ["HTTP 500"]
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])


def test_scoreboard_verdict_compares_with_the_best_peer() -> None:
    from leanserve.bench.scoreboard import verdict

    def summary(tok_s: float, ttft_p50: float, ttft_p99: float, tpot_p99: float) -> dict:
        return {"completed": 64, "output_token_throughput": tok_s, "ttft_ms": {"p50": ttft_p50, "p99": ttft_p99},
                "tpot_ms": {"p50": 1.0, "p99": tpot_p99}}

    results = {"llama-server": {"all_at_once": summary(37, 40000, 90000, 300)},
               "vllm": {"all_at_once": summary(75, 24000, 60000, 500)},
               "leanserve": {"all_at_once": summary(150, 6000, 16000, 600)},
               "transformers": {"one_at_a_time": {}}}
    text = verdict(results, "all_at_once")[0]
    assert "(vllm): 2.00x the output tokens/s, TTFT p50 0.25x" in text
    assert "TTFT p99: leanserve 16000 ms, lowest peer 60000 ms" in text and "TPOT p99: leanserve 600 ms, lowest peer 300 ms" in text
    assert verdict(results, "poisson") == []


def test_a_server_without_its_model_is_a_clear_error():
    class Loading(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"error": {"message": "the model is not loaded"}}'
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Loading)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        request = ChatRequest("1", [{"role": "user", "content": "hi"}], 4)
        with pytest.raises(ValueError, match="answered 503 .*not loaded"):
            asyncio.run(run_load(f"http://127.0.0.1:{server.server_port}", [request], model=None, rate=math.inf,
                                 burstiness=1.0, max_concurrency=None, seed=0, api_key=None, progress=False))
    finally:
        server.shutdown()


def test_scoreboard_reports_the_median_of_repeated_runs(monkeypatch, tmp_path):
    """With --repeats, the run with the median output tokens/s stands for each workload."""
    from leanserve.bench import scoreboard

    monkeypatch.setattr(scoreboard, "plot", lambda outcomes, path, title: None)
    runs = [({"output_token_throughput": tok_s}, [tok_s]) for tok_s in (5.0, 10.0, 2.5)]
    summary = scoreboard.median_runs("engine", {"all_at_once": runs}, tmp_path)["all_at_once"]
    assert summary["output_token_throughput"] == 5.0
    assert summary["runs_output_token_throughput"] == [2.5, 5.0, 10.0]
    assert summary["plot"] == str(tmp_path / "engine-all_at_once.png")
    two = scoreboard.median_runs("engine", {"poisson": runs[:2]}, tmp_path)["poisson"]
    assert two["output_token_throughput"] == 5.0          # of two runs, the lower


def test_scoreboard_waits_for_the_port_the_last_server_held():
    """A server that cannot bind a port still in use (llama-server) starts only once the port is free."""
    import socket

    from leanserve.bench import scoreboard

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    with pytest.raises(RuntimeError, match="still in use"):
        scoreboard.wait_port_free(port, timeout=1.5)
    threading.Timer(0.5, holder.close).start()
    scoreboard.wait_port_free(port, timeout=10)
