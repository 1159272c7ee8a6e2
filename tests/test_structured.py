"""Structured outputs, logit bias and allowed tokens through the ASGI app on the tiny random model: whatever the
model's weights, a constrained output follows its constraint, and a bad constraint is a 400 before it is queued."""
import asyncio
import json
import os
import re

import pytest
import torch

from leanserve.engine.llm_engine import LLMEngine
from leanserve.engine.loader import load_checkpoint
from leanserve.engine.structured import GrammarCompiler, MaskFiller
from leanserve.params import SamplingParams, StructuredOutputs
from tests.test_server import chat_body, llm, make_client, run, sse_events  # noqa: F401 - llm is a fixture


def post(llm, path: str, body: dict):
    async def go():
        async with make_client(llm) as client:
            return await client.post(path, json=body)
    return run(go())


@pytest.mark.parametrize("constraint, check", [
    ({"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}, lambda t: t in ("alpha", "beta", "gamma")),
    ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ({"structured_outputs": {"regex": "[ab]{3}-[0-9]{2}"}}, lambda t: re.fullmatch("[ab]{3}-[0-9]{2}", t)),
    ({"guided_grammar": 'root ::= "x" ("y" | "z")'}, lambda t: t in ("xy", "xz")),       # GBNF
    ({"structured_outputs": {"grammar": 'start: "x" ("y" | "z")'}}, lambda t: t in ("xy", "xz")),   # Lark
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "flag", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}}}, "max_tokens": 200},
     lambda t: re.fullmatch(r'\{\s*"ok"\s*:\s*(true|false)\s*\}', t)),
])
def test_constrained_chat_follows_its_constraint_streamed_and_not(llm, constraint, check):
    body = {**chat_body(temperature=1.0, seed=1, n=2, max_tokens=16), **constraint}
    plain = post(llm, "/v1/chat/completions", body)
    assert plain.status_code == 200, plain.text
    for choice in plain.json()["choices"]:
        assert check(choice["message"]["content"]) and choice["finish_reason"] == "stop", choice
    events = sse_events(post(llm, "/v1/chat/completions", {**body, "stream": True}).text)
    streamed = ["", ""]
    for choice in (c for e in events for c in e["choices"]):
        streamed[choice["index"]] += choice["delta"].get("content", "")
    assert streamed == [c["message"]["content"] for c in plain.json()["choices"]]


def test_constrained_and_free_requests_share_steps(llm):
    async def go():
        async with make_client(llm) as client:
            free = chat_body(max_tokens=12, ignore_eos=True)
            bound = chat_body(max_tokens=12, structured_outputs={"regex": "[0-9]{6}"})
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=b)
                                          for b in [free, bound, free, bound]))
    free_a, bound_a, free_b, bound_b = (r.json()["choices"][0]["message"]["content"] for r in run(go()))
    assert re.fullmatch("[0-9]{6}", bound_a) and bound_a == bound_b
    assert free_a == free_b and not re.fullmatch("[0-9]{6}", free_a)


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "invalid structured output"),
    ({"guided_json": "{not json"}, "not JSON"),
    ({"structured_outputs": {"regex": "a(b"}}, "unclosed group"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "invalid structured output"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "only one structured output"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is required"),
    ({"structured_outputs": {"structural_tag": "x"}}, "does not support the field 'structured_outputs.structural_tag'"),
    ({"logit_bias": {"hello": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"7": 101}}, "logit_bias values must be in [-100, 100]"),
    ({"logit_bias": {"99999999": -100}}, "logit_bias token ids must be in"),
    ({"allowed_token_ids": [5, -1]}, "allowed_token_ids token ids must be in"),
])
def test_bad_constraints_are_400s(llm, extra, message):
    response = post(llm, "/v1/chat/completions", chat_body(**extra))
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_allowed_token_ids_on_completions(llm):
    allowed = [11, 12, 13]
    pieces = {post(llm, "/detokenize", {"tokens": [t]}).json()["prompt"] for t in allowed}
    response = post(llm, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 3,
                                             "logprobs": 0, "allowed_token_ids": allowed, "ignore_eos": True})
    tokens = response.json()["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 6 and set(tokens) <= pieces, (tokens, pieces)


def test_engine_refuses_a_bad_grammar_before_queueing(tiny_hf_dir):
    from leanserve.engine.engine_config import EngineConfig
    engine = LLMEngine(EngineConfig(model=str(tiny_hf_dir), kv_cache_tokens=1024, max_model_len=256))
    with pytest.raises(ValueError, match="invalid structured output"):
        engine.add_request("r", [5, 6], SamplingParams(structured_outputs=StructuredOutputs(regex="(")))
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting


def test_masks_of_a_large_batch_start_no_openmp_team(tiny_hf_dir):
    """The mask worker runs no parallel torch op: one would give that thread an OpenMP team of its own, and with
    more OpenMP threads than cores libgomp stops spinning at barriers, which slowed every later step by 20-30%."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: no OpenMP team to start")
    checkpoint = load_checkpoint(str(tiny_hf_dir))
    vocab = checkpoint.config.vocab_size
    compiler, filler = GrammarCompiler(checkpoint.tokenizer, vocab), MaskFiller(vocab)
    spec = StructuredOutputs(json_object=True)
    filler.start(compiler.matchers(spec, 1)).result()          # the worker and llguidance's threads start
    torch.ones(256, 1024).sum()                                 # and this thread's OpenMP team
    rows = max(64, 2 * 32768 // -(-vocab // 32) + 1)            # a bitmask past torch's grain for parallel work
    threads = len(os.listdir("/proc/self/task"))
    masks = filler.start(compiler.matchers(spec, rows)).result()
    assert masks.bitmask.shape[0] == rows
    assert len(os.listdir("/proc/self/task")) == threads


# --- tool calling ------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
NOOP_TOOL = {"type": "function", "function": {"name": "noop"}}


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "noop"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
])
def test_forced_tool_calls_streamed_and_not(llm, tool_choice, names):
    body = {**chat_body(temperature=1.0, seed=2, max_tokens=120), "tools": [WEATHER_TOOL, NOOP_TOOL],
            "tool_choice": tool_choice, "parallel_tool_calls": False}
    plain = post(llm, "/v1/chat/completions", body).json()["choices"][0]
    assert plain["finish_reason"] == "tool_calls", plain
    [call] = plain["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] in names
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 12
    events = sse_events(post(llm, "/v1/chat/completions", {**body, "stream": True}).text)
    deltas = [c["delta"] for e in events for c in e["choices"]]
    header, fragment = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert header["index"] == 0 and header["function"] == {"name": call["function"]["name"], "arguments": ""}
    assert json.loads(fragment["function"]["arguments"]) == arguments and "id" not in fragment
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_and_auto_answer_in_the_same_shape(llm):
    for tool_choice in ("none", "auto"):
        body = {**chat_body(max_tokens=8), "tools": [WEATHER_TOOL], "tool_choice": tool_choice}
        choice = post(llm, "/v1/chat/completions", body).json()["choices"][0]
        if choice["message"].get("tool_calls"):            # a random model may write a call under "auto"
            assert tool_choice == "auto" and choice["finish_reason"] == "tool_calls"
        else:
            assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")


def test_tools_reach_the_prompt_and_a_tool_round_trip_renders(llm):
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'}]
    with_tools = post(llm, "/tokenize", {"messages": conversation, "tools": [WEATHER_TOOL]}).json()["tokens"]
    without = post(llm, "/tokenize", {"messages": conversation, "tools": [WEATHER_TOOL], "tool_choice": "none"}).json()
    text = post(llm, "/detokenize", {"tokens": with_tools}).json()["prompt"]
    assert "get_weather" in text.split("Weather in Paris?")[0] and '<tool_response>\n{"temp_c": 18}' in text
    assert len(without["tokens"]) < len(with_tools)
    answer = post(llm, "/v1/chat/completions", {**chat_body(max_tokens=4), "messages": conversation,
                                                "tools": [WEATHER_TOOL]})
    assert answer.status_code == 200


def test_continue_final_message_goes_on_from_the_assistant_text(llm):
    messages = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "One, two,"}]
    prompt = post(llm, "/tokenize", {"messages": messages, "continue_final_message": True,
                                     "add_generation_prompt": False}).json()["tokens"]
    assert post(llm, "/detokenize", {"tokens": prompt}).json()["prompt"].endswith("One, two,")
    bad = post(llm, "/v1/chat/completions", {**chat_body(), "continue_final_message": True})
    assert bad.status_code == 400 and "final assistant message" in bad.json()["error"]["message"]


@pytest.mark.parametrize("extra, message", [
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'nope', which is not in tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with a structured output"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "string should match pattern"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{"}}]}]},
     "arguments must be json"),
])
def test_bad_tool_requests_are_400s(llm, extra, message):
    response = post(llm, "/v1/chat/completions", {**chat_body(), **extra})
    assert response.status_code == 400 and message in response.json()["error"]["message"].lower(), response.text
