"""End to end: a real `leanserve serve` process on a free port, driven by the official openai client."""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "leanserve.cli", "serve", *args, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise AssertionError("the server did not become healthy")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def wait_until_idle(base: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if metric(base, "leanserve:num_requests_running") == 0 and metric(base, "leanserve:kv_cache_usage_perc") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("requests still hold KV-cache blocks")


@pytest.fixture(scope="module")
def server():
    process, base = start_server("smollm2", "--kv-cache-tokens", "65536", "--api-key", "test-key", "--deterministic",
                                 "true")
    yield base
    assert stop_server(process) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="test-key")


def test_openai_chat_streaming_and_not(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in plain.choices[0].message.content and plain.choices[0].finish_reason == "stop"
    assert plain.usage.prompt_tokens > 20 and plain.usage.total_tokens == plain.usage.prompt_tokens + \
        plain.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_openai_chat_stop_n_seed_logprobs(client):
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    # The `stop` request reads the prompt from the prefix cache: --deterministic makes that the same bits.
    free = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=30, temperature=0)
    text = free.choices[0].message.content
    stop = text.split()[3]
    cut = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=30, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=1.0,
                                              n=2, seed=5) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert len(sampled[0].choices) == 2
    with_lp = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=5, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = with_lp.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)


def test_openai_completions_streaming_and_not(client):
    plain = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                      temperature=0, logprobs=1)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == plain.choices[0].text and plain.usage.completion_tokens == len(
        plain.choices[0].logprobs.tokens)


def test_wrong_key_and_unknown_model(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="test-key").chat.completions.create(
            model="gpt-unknown", messages=[{"role": "user", "content": "hi"}])


def test_disconnect_mid_stream_frees_the_request(server):
    headers = {"Authorization": "Bearer test-key"}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(server, "leanserve:num_requests_running") == 1
    wait_until_idle(server, 5)
    # Not streaming: the client gives up (timeout) and the server notices.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": False}, headers=headers, timeout=2)
    wait_until_idle(server, 5)


def test_64_concurrent_streams_all_complete(server):
    finished_before = metric(server, "leanserve:request_success_total")
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="test-key", max_retries=0, timeout=300)

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Story number {i}, please."}],
            max_tokens=16, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(64)))

    assert asyncio.run(all_of_them()) == [16] * 64
    wait_until_idle(server, 5)
    assert metric(server, "leanserve:request_success_total") - finished_before == 64


def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_hf_dir):
    process, base = start_server(str(tiny_hf_dir), "--served-model-name", "tiny", "--kv-cache-tokens", "4096",
                                 "--shutdown-timeout", "60")
    body = {"prompt": [5, 6, 7], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10           # the signal reaches the server soon, not at once
        while httpx.get(f"{base}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still answers 200 after SIGTERM"
            time.sleep(0.05)
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}).status_code == 503
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
    assert process.wait(30) == 0


def test_load_generator_against_the_server(server, tmp_path):
    from leanserve.bench.serve import run_load, summarize

    workload = tmp_path / "w.jsonl"
    workload.write_text("".join(
        f'{{"id": "r{i}", "messages": [{{"role": "user", "content": "Say something {i}."}}], "max_tokens": {4 + i}}}\n'
        for i in range(4)))
    from leanserve.bench.workload import load_workload
    results, duration = asyncio.run(run_load(server, load_workload(workload), model=None, rate=20.0, burstiness=1.0,
                                             max_concurrency=2, seed=0, api_key="test-key", progress=False))
    summary = summarize(results, duration, {})
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["output_tokens"] == 4 + 5 + 6 + 7               # ignore_eos: exactly max_tokens each
    assert [len(r.token_times) for r in results] == [4, 5, 6, 7]
    assert all(r.ttft > 0 for r in results) and summary["itl_ms"]["mean"] > 0
