"""The HTTP API against the ASGI app (httpx), on the tiny model: protocol, errors, faults, metrics."""
import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from leanserve.engine.async_llm import AsyncLLM
from leanserve.engine.engine_config import EngineConfig
from leanserve.server.app import ServerConfig, create_app
from leanserve.server.metrics import METRIC_NAMES
from leanserve.server.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "tiny"


@pytest.fixture(scope="module")
def llm(tiny_hf_dir):
    engine = AsyncLLM(EngineConfig(model=str(tiny_hf_dir), kv_cache_tokens=4096, max_model_len=1024))
    engine.start()
    assert engine.ready.wait(120) and engine.load_error is None
    yield engine
    engine.stop()


def make_client(llm, **config) -> httpx.AsyncClient:
    app = create_app(llm, ServerConfig(served_model_names=config.pop("names", [MODEL]), **config))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


def run(coro):
    return asyncio.run(coro)


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12,
            "temperature": 0, **extra}


def sse_events(text: str) -> list:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_streamed_text_equals_non_streamed(llm):
    async def go():
        async with make_client(llm) as client:
            plain = (await client.post("/v1/chat/completions", json=chat_body(ignore_eos=True))).json()
            streamed = await client.post("/v1/chat/completions",
                                         json=chat_body(ignore_eos=True, stream=True,
                                                        stream_options={"include_usage": True}))
            return plain, streamed
    plain, streamed = run(go())
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")     # the second one may hit the prefix cache
    assert events[-1]["choices"] == [] and [events[-1]["usage"][k] for k in counts] == [plain["usage"][k] for k in counts]
    assert plain["usage"]["completion_tokens"] == 12 and plain["object"] == "chat.completion"


def test_completions_n_seed_logprobs_stop(llm):
    async def go():
        async with make_client(llm) as client:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0,
                    "n": 3, "seed": 11, "logprobs": 2, "ignore_eos": True}
            first = (await client.post("/v1/completions", json=body)).json()
            again = (await client.post("/v1/completions", json=body)).json()
            greedy = (await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 8,
                                                                   "temperature": 0, "ignore_eos": True})).json()
            return first, again, greedy
    first, again, greedy = run(go())
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in first["choices"]}) == 3
    lp = first["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and "".join(lp["tokens"]) == first["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] == 24

    text = greedy["choices"][0]["text"]
    stop = text[3:6]

    async def stopped():
        async with make_client(llm) as client:
            body = {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "stop": [stop], "ignore_eos": True}
            return (await client.post("/v1/completions", json=body)).json()
    out = run(stopped())["choices"][0]
    assert out["text"] == text[:text.index(stop)] and out["finish_reason"] == "stop"


def test_a_streamed_choice_that_finishes_first_reports_its_finish_once(llm):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 12,
            "temperature": 1.0, "n": 3, "seed": 11, "ignore_eos": True}

    async def go(extra: dict):
        async with make_client(llm) as client:
            return await client.post("/v1/chat/completions", json={**body, **extra})
    texts = [c["message"]["content"] for c in run(go({})).json()["choices"]]
    # A stop string only the first choice contains (seeded: each choice samples the same alone or not).
    stop = next(texts[0][i:i + 3] for i in range(len(texts[0]) - 2)
                if all(texts[0][i:i + 3] not in t for t in texts[1:]))
    events = sse_events(run(go({"stream": True, "stop": [stop]})).text)
    finishes = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [(0, "stop"), (1, "length"), (2, "length")]
    assert finishes[0] == (0, "stop")                    # it ended first, and said so once


def test_chat_logprobs_shape(llm):
    async def go():
        async with make_client(llm) as client:
            return (await client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=3))).json()
    content = run(go())["choices"][0]["logprobs"]["content"]
    assert content and all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)
    assert content[0]["top_logprobs"][0]["token"] == content[0]["token"]    # greedy picks the top one


def test_models_health_tokenize_detokenize(llm):
    async def go():
        async with make_client(llm) as client:
            models = (await client.get("/v1/models")).json()
            health = await client.get("/health")
            tokens = (await client.post("/tokenize", json={"prompt": "Hello world"})).json()
            text = (await client.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
            chat = (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})).json()
            docs = await client.get("/docs")
            return models, health, tokens, text, chat, docs
    models, health, tokens, text, chat, docs = run(go())
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 1024
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert tokens["count"] == len(tokens["tokens"]) > 0 and text["prompt"] == "Hello world"
    assert chat["count"] > 10 and docs.status_code == 200


def test_several_served_model_names(llm):
    async def go():
        async with make_client(llm, names=[MODEL, "alias"]) as client:
            models = (await client.get("/v1/models")).json()
            by_alias = (await client.post("/v1/chat/completions", json=chat_body(model="alias"))).json()
            unnamed = (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).json()
            unknown = await client.post("/v1/completions", json={"model": "other", "prompt": "x"})
            return models, by_alias, unnamed, unknown
    models, by_alias, unnamed, unknown = run(go())
    assert [m["id"] for m in models["data"]] == [MODEL, "alias"]
    assert by_alias["model"] == "alias" and by_alias["choices"][0]["message"]["content"] is not None
    assert unnamed["model"] == MODEL
    assert unknown.status_code == 404 and f"'{MODEL}', 'alias'" in unknown.json()["error"]["message"]


@pytest.mark.parametrize("field,value,param", [
    ("response_format", {"type": "json_object", "strictness": 2}, "response_format.strictness"),
    ("functions", [{"name": "f"}], "functions"),
    ("stream_options", {"include_usage": True, "include_obfuscation": True}, "stream_options.include_obfuscation"),
    ("messages", [{"role": "user", "content": "x", "audio": "1"}], "messages.0.audio"),
])
def test_a_field_the_server_does_not_implement_is_a_400_naming_it(llm, field, value, param):
    body = {**chat_body(), field: value}

    async def go():
        async with make_client(llm) as client:
            return await client.post("/v1/chat/completions", json=body)
    response = run(go())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and repr(param) in error["message"], error


def test_fields_that_mean_nothing_for_generation_are_accepted():
    ignored = {"user": "u-1", "metadata": {"team": "a"}, "store": False, "service_tier": "auto"}
    plain = ChatCompletionRequest(**chat_body())
    with_them = ChatCompletionRequest(**chat_body(**ignored))
    assert with_them.sampling_params(12, None) == plain.sampling_params(12, None)
    assert CompletionRequest(prompt="x", **ignored).sampling_params(16, None) == CompletionRequest(
        prompt="x").sampling_params(16, None)


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**70}, 400, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_chat_requests_get_openai_errors(llm, body, status, param):
    async def go():
        async with make_client(llm) as client:
            return await client.post("/v1/chat/completions", json=body)
    response = run(go())
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] is not None and error["param"].startswith(param)


def test_malformed_json_oversized_body_and_bad_completions(llm):
    async def go():
        async with make_client(llm, max_body_bytes=2000) as client:
            malformed = await client.post("/v1/chat/completions", content=b"{not json",
                                          headers={"content-type": "application/json"})
            huge = await client.post("/v1/completions", json={"prompt": "x" * 5000})
            empty = await client.post("/v1/completions", json={"prompt": ""})
            bad_ids = await client.post("/v1/completions", json={"prompt": [10**9]})
            bad_detok = await client.post("/detokenize", json={"tokens": [-1]})
            return malformed, huge, empty, bad_ids, bad_detok
    malformed, huge, empty, bad_ids, bad_detok = run(go())
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert empty.status_code == bad_ids.status_code == bad_detok.status_code == 400


def test_a_prompt_the_engine_refuses_is_a_400_even_streamed_and_runs_none_of_its_batch(llm):
    # The engine validates each prompt as it takes it; the answer waits for that, so a streamed request
    # gets its 400 (not a 200 stream ending in an error), and the valid prompts sent with it never run.
    async def go():
        async with make_client(llm) as client:
            streamed = await client.post("/v1/completions", json={"prompt": [5, 10**9], "stream": True})
            batch = await client.post("/v1/completions", json={"prompt": [[5, 6], [7, 10**9]], "max_tokens": 500,
                                                              "ignore_eos": True})
            return streamed, batch
    streamed, batch = run(go())
    assert streamed.status_code == batch.status_code == 400
    assert "prompt token ids must be in" in streamed.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while llm.engine.has_unfinished_requests():            # the first prompt of the batch is aborted
        assert time.monotonic() < deadline, "a prompt of the refused batch kept running"
        time.sleep(0.01)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_api_key_guards_the_api_but_not_health_or_metrics(llm):
    async def go():
        async with make_client(llm, api_key="s3cret") as client:
            missing = await client.post("/v1/chat/completions", json=chat_body())
            wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            right = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            health, metrics = await client.get("/health"), await client.get("/metrics")
            return missing, wrong, right, health, metrics
    missing, wrong, right, health, metrics = run(go())
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert right.status_code == health.status_code == metrics.status_code == 200


def test_full_queue_answers_429_with_retry_after(llm):
    async def go():
        async with make_client(llm, max_queued_requests=0) as client:
            return await client.post("/v1/chat/completions", json=chat_body())
    response = run(go())
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_failing_step_fails_only_its_requests(llm, monkeypatch):
    runner = llm.engine.runner
    real_execute = runner.execute

    def execute(batch):
        if any(4242 in r.prompt_token_ids for r in batch.requests):
            raise RuntimeError("injected fault")
        return real_execute(batch)

    monkeypatch.setattr(runner, "execute", execute)

    async def go():
        async with make_client(llm) as client:
            poisoned = await client.post("/v1/completions", json={"prompt": [4242, 5], "max_tokens": 4})
            streamed = await client.post("/v1/completions", json={"prompt": [4242, 6], "max_tokens": 4,
                                                                   "stream": True})
            healthy = await client.post("/v1/completions", json={"prompt": [7, 8], "max_tokens": 4})
            return poisoned, streamed, healthy
    poisoned, streamed, healthy = run(go())
    assert poisoned.status_code == 500 and "injected fault" in poisoned.json()["error"]["message"]
    assert "injected fault" in sse_events(streamed.text)[-1]["error"]["message"]
    assert healthy.status_code == 200 and healthy.json()["usage"]["completion_tokens"] == 4
    assert llm.engine.block_manager.num_used_blocks == 0


def test_metrics_count_requests_tokens_and_latencies(llm):
    # The engine is shared with the other tests: every count is compared as a difference across the calls.
    async def go():
        async with make_client(llm) as client:
            before = (await client.get("/metrics")).text
            answers = [await client.post("/v1/chat/completions", json=chat_body(ignore_eos=True)) for _ in range(2)]
            await client.post("/v1/chat/completions", json={"messages": []})
            return before, answers, (await client.get("/metrics")).text
    before, answers, text = run(go())

    def parse(text: str) -> list:
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    samples, samples_before = parse(text), parse(before)

    def value(name: str, **labels) -> float:
        labels = {"model_name": MODEL, **labels}
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    def delta(name: str, **labels) -> float:
        labels = {"model_name": MODEL, **labels}
        return value(name, **labels) - sum(s.value for s in samples_before
                                           if s.name == name and labels.items() <= s.labels.items())

    prompt_tokens = sum(a.json()["usage"]["prompt_tokens"] for a in answers)
    assert delta("leanserve:generation_tokens_total") == 24
    assert delta("leanserve:prompt_tokens_total") == prompt_tokens
    assert delta("leanserve:request_success_total", finished_reason="length") == 2
    assert delta("leanserve:request_success_total") == 2
    # One request at a time: 12 steps each (its prefill samples the first token).
    for histogram, count in [("time_to_first_token_seconds", 2), ("inter_token_latency_seconds", 22),
                             ("e2e_request_latency_seconds", 2), ("request_queue_time_seconds", 2),
                             ("iteration_tokens_total", 24), ("request_prompt_tokens", 2),
                             ("request_generation_tokens", 2)]:
        assert delta(f"leanserve:{histogram}_count") == count, histogram
    assert delta("leanserve:request_prompt_tokens_sum") == prompt_tokens
    assert value("leanserve:num_requests_running") == value("leanserve:kv_cache_usage_perc") == 0
    assert delta("leanserve:http_requests_total", method="POST", path="/v1/chat/completions", status="400") == 1
    assert delta("leanserve:http_requests_total", method="POST", path="/v1/chat/completions", status="200") == 2
    names = {s.name for s in samples}
    assert {"leanserve:num_preemptions_total", "leanserve:prefix_cache_queries_total",
            "leanserve:prefix_cache_hits_total", "leanserve:num_requests_waiting"} <= names
    assert not any(n.endswith("_created") for n in names)


def test_vllm_named_gauges_track_the_leanserve_ones_busy_and_idle(llm):
    # The endpoint picker of the Gateway API Inference Extension reads vllm:* names (metrics.VLLM_NAMED).
    pairs = [("leanserve:num_requests_waiting", "vllm:num_requests_waiting"),
             ("leanserve:num_requests_running", "vllm:num_requests_running"),
             ("leanserve:kv_cache_usage_perc", "vllm:kv_cache_usage_perc")]

    def gauges(text: str) -> dict:
        return {s.name: s for family in text_string_to_metric_families(text) for s in family.samples
                if s.labels.get("model_name") == MODEL}

    async def go():
        async with make_client(llm) as client:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
            requests = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(3)]
            busy = None
            while busy is None and not all(r.done() for r in requests):
                scraped = gauges((await client.get("/metrics")).text)
                if scraped["leanserve:num_requests_running"].value > 0:
                    busy = scraped
                await asyncio.sleep(0.005)
            answers = await asyncio.gather(*requests)
            return busy, answers, gauges((await client.get("/metrics")).text)
    busy, answers, idle = run(go())
    assert all(a.status_code == 200 for a in answers)
    assert busy is not None, "never scraped the requests while they ran"
    assert busy["vllm:num_requests_running"].value >= 1 and busy["vllm:kv_cache_usage_perc"].value > 0
    for scraped in (busy, idle):
        for ours, vllm in pairs:
            assert scraped[vllm].value == scraped[ours].value, vllm
    assert [idle[vllm].value for _, vllm in pairs] == [0, 0, 0]
    # tests/test_deploy.py checks the endpoint picker's configured names against METRIC_NAMES: all are served.
    assert not [n for n in METRIC_NAMES if n not in idle and f"{n}_count" not in idle]
    blocks = llm.engine.block_manager
    for name in ("leanserve:cache_config_info", "vllm:cache_config_info"):
        labels = idle[name].labels
        assert (labels["block_size"], labels["num_gpu_blocks"]) == (str(blocks.block_size), str(blocks.num_blocks))


# --- the rest of the request surface --------------------------------------------------------------


def completion(llm, **body) -> dict:
    async def go():
        async with make_client(llm) as client:
            return (await client.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})).json()
    return run(go())


def test_bad_words_are_never_generated(llm):
    free = completion(llm, prompt=[5, 6, 7], max_tokens=12, ignore_eos=True, logprobs=0)
    text = free["choices"][0]["text"]
    word = next(w for w in text.split() if len(w) > 1)
    banned = completion(llm, prompt=[5, 6, 7], max_tokens=12, ignore_eos=True, bad_words=[word])
    assert word not in banned["choices"][0]["text"].split() and banned["choices"][0]["text"] != text


def test_stop_token_ids_and_include_stop_str(llm):
    forced = dict(prompt=[5, 6, 7], max_tokens=10, ignore_eos=True, logit_bias={"12": 100})    # always token 12
    assert completion(llm, **forced)["usage"]["completion_tokens"] == 10
    cut = completion(llm, **forced, stop_token_ids=[12])
    assert cut["usage"]["completion_tokens"] == 1 and cut["choices"][0]["finish_reason"] == "stop"
    free = completion(llm, prompt=[5, 6, 7], max_tokens=10, ignore_eos=True, logprobs=0)
    tokens = free["choices"][0]["logprobs"]["tokens"]
    stop = next(t.strip() for t in tokens[3:] if t.strip())
    kept = completion(llm, prompt=[5, 6, 7], max_tokens=10, ignore_eos=True, stop=[stop],
                      include_stop_str_in_output=True)
    dropped = completion(llm, prompt=[5, 6, 7], max_tokens=10, ignore_eos=True, stop=[stop])
    assert kept["choices"][0]["text"] == dropped["choices"][0]["text"] + stop
    assert kept["choices"][0]["finish_reason"] == dropped["choices"][0]["finish_reason"] == "stop"


def test_cached_tokens_and_continuous_usage(llm):
    prompt = list(range(20, 120))                         # 100 tokens: six full blocks of 16
    first = completion(llm, prompt=prompt, max_tokens=2)
    again = completion(llm, prompt=prompt, max_tokens=2)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 96

    async def go():
        async with make_client(llm) as client:
            return await client.post("/v1/completions", json={
                "model": MODEL, "prompt": [5, 6, 7], "max_tokens": 5, "ignore_eos": True, "stream": True,
                "stream_options": {"continuous_usage_stats": True}})
    events = sse_events(run(go()).text)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events)
    assert counts == sorted(counts) and counts[-1] == 5 and counts[0] >= 1
