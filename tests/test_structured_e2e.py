"""Structured outputs, tool calls and logit bias end to end: a real `leanserve serve` on the default model, driven by the
official openai client. Outputs are checked by parsing and validating them, never by comparing to a fixed text."""
import asyncio
import json
from typing import Annotated, Literal

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.test_server_e2e import client, server  # noqa: F401 - the real server's fixtures

openai = pytest.importorskip("openai")


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")     # additionalProperties: false

    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=130)
    languages: list[Annotated[str, Field(max_length=16)]] = Field(max_length=3)


PERSON_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True}}
ASK = [{"role": "user", "content": "Describe a fictional programmer as JSON: name, age and languages."}]



def test_parse_returns_a_pydantic_object(client):
    completion = client.chat.completions.parse(model="smollm2", messages=ASK, response_format=Person, max_tokens=120,
                                               temperature=0)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"


def test_seeded_sampled_requests_follow_the_schema_streaming_and_not(server):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="test-key", max_retries=0, timeout=300)

    async def one(seed: int) -> list[str]:
        args = dict(model="smollm2", messages=ASK, response_format=PERSON_FORMAT, max_tokens=150, temperature=0.8,
                    seed=seed, n=2)
        if seed % 2:
            texts = ["", ""]
            async for chunk in await client.chat.completions.create(stream=True, **args):
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
                    assert choice.finish_reason in (None, "stop")
            return texts
        completion = await client.chat.completions.create(**args)
        assert [c.finish_reason for c in completion.choices] == ["stop", "stop"]
        return [c.message.content for c in completion.choices]

    async def all_of_them():
        return await asyncio.gather(*(one(seed) for seed in range(20)))

    texts = [t for pair in asyncio.run(all_of_them()) for t in pair]
    people = [Person.model_validate_json(t) for t in texts]
    assert len(people) == 40 and len({p.model_dump_json() for p in people}) > 1   # sampled, so not all alike


def test_every_spelling_of_a_constraint(client):
    completions = client.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=5,
                                            temperature=0, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert completions.choices[0].text in ("yes", "no")
    phone = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give me a phone number."}], max_tokens=20,
        temperature=0, extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
    assert phone.choices[0].message.content[0] == "(" and len(phone.choices[0].message.content) == 14
    obj = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=150, temperature=0,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:   # ran out of tokens inside the object: a prefix of one
        assert obj.choices[0].finish_reason == "length" and obj.choices[0].message.content.lstrip()[0] == "{"


def test_invalid_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="invalid structured output"):
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objekt"}}})
    with pytest.raises(openai.BadRequestError, match="only one structured output"):
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=5,
                                       response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"})


def test_logit_bias_bans_the_first_choice(server, client):
    args = dict(model="smollm2", prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=2)
    first = client.completions.create(**args).choices[0].logprobs
    favourite = first.tokens[0]
    favourite_id = httpx.post(f"{server}/tokenize", json={"prompt": favourite, "add_special_tokens": False},
                              headers={"Authorization": "Bearer test-key"}).json()["tokens"]
    assert len(favourite_id) == 1
    banned = client.completions.create(**args, logit_bias={str(favourite_id[0]): -100}).choices[0].logprobs
    assert banned.tokens[0] != favourite
    assert banned.tokens[0] == list(first.top_logprobs[0])[1]          # the runner-up takes its place


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"] = "celsius"


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                                 "parameters": Weather.model_json_schema()}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def test_named_tool_call_then_round_trip(client):
    forced = client.chat.completions.create(model="smollm2", messages=WEATHER_ASK, tools=[WEATHER_TOOL], max_tokens=80,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=0)
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    Weather.model_validate_json(call.function.arguments)              # JSON, and valid against the tool's schema
    answer = client.chat.completions.create(model="smollm2", tools=[WEATHER_TOOL], max_tokens=60, temperature=0,
                                            messages=WEATHER_ASK + [
                                                choice.message.model_dump(exclude_none=True),
                                                {"role": "tool", "tool_call_id": call.id,
                                                 "content": json.dumps({"temperature_c": 18, "sky": "cloudy"})}])
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content


def test_streamed_tool_call_reassembled_by_the_client(client):
    arguments, name, finish = "", None, None
    for chunk in client.chat.completions.create(model="smollm2", messages=WEATHER_ASK, tools=[WEATHER_TOOL],
                                                tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                                temperature=0, stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            assert delta_call.index == 0
            name = name or (delta_call.function.name if delta_call.function else None)
            arguments += delta_call.function.arguments or "" if delta_call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    Weather.model_validate_json(arguments)


def test_auto_tool_choice_gives_prose_or_well_formed_calls(client):
    """tool_choice "auto", 12 seeded sampled replies: each is prose, or calls whose arguments follow the tool's
    schema; a call the model began but did not finish well would come back as content holding the tag."""
    kinds = set()
    ask = [{"role": "user", "content": "Call the get_weather function for Paris."}]
    for seed in range(12):
        choice = client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER_TOOL],
                                                tool_choice="auto", max_tokens=80, temperature=0.7, seed=seed,
                                                parallel_tool_calls=False).choices[0]
        if choice.message.tool_calls:
            kinds.add("call")
            [call] = choice.message.tool_calls
            assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
            Weather.model_validate_json(call.function.arguments)
        elif choice.finish_reason == "stop":      # (a reply cut at max_tokens may stop inside a call)
            kinds.add("prose")
            assert "<tool_call>" not in (choice.message.content or ""), choice.message.content
    assert "call" in kinds, "the model never called the tool: the check above saw no call"


def test_tool_choice_none_answers_in_prose(client):
    reply = client.chat.completions.create(model="smollm2", messages=WEATHER_ASK, tools=[WEATHER_TOOL],
                                           tool_choice="none", max_tokens=20, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
