"""Structured outputs, logit bias and allowed tokens through the ASGI app on the tiny random model: whatever the
model's weights, a constrained output follows its constraint, and a bad constraint is a 400 before it is queued."""
import asyncio
import re

import pytest

from leanserve.engine.llm_engine import LLMEngine
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
