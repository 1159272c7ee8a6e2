"""Tool-call syntax: parsing whole replies, the same calls when the reply is streamed in any pieces, the grammar
that forces a call, and conversations with tool calls rendered through chat templates with and without tools."""
import json

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanserve.server.tool_calls import (PARSERS, HermesParser, Llama3JsonParser, ToolCallStream,
                                         messages_for_template, parser_for_template)

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"], "additionalProperties": False}}

REPLIES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
               '{"x": [1, 2]}}\n</tool_call>', None, [("a", {}), ("b", {"x": [1, 2]})]),
    ("hermes", "No tools needed: <tool_call> is just a word here.", "No tools needed: <tool_call> is just a word here.",
     []),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "argu',
     None, [("a", {})]),                                    # cut by max_tokens inside a second call
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>',        # not JSON: text
     '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>', []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": true}}', None,
     [("a", {}), ("b", {"y": True})]),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
]


@pytest.mark.parametrize("parser, reply, content, calls", REPLIES)
def test_parse_whole_replies(parser, reply, content, calls):
    got_content, got_calls = PARSERS[parser].parse(reply)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls) and all(c.id.startswith("call_") for c in got_calls)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(REPLIES), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_in_any_pieces_gives_the_same_calls(case, cuts):
    parser, reply, content, calls = case
    stream = ToolCallStream(PARSERS[parser])
    edges = sorted({0, len(reply), *(c for c in cuts if c < len(reply))})
    streamed_text, streamed_calls = "", []
    for a, b in zip(edges, edges[1:]):
        text, made = stream.feed(reply[a:b])
        streamed_text, streamed_calls = streamed_text + text, streamed_calls + made
    text, made = stream.finish()
    streamed_text, streamed_calls = streamed_text + text, streamed_calls + made
    assert [(c.name, json.loads(c.arguments)) for c in streamed_calls] == calls
    assert streamed_text.strip() == (content or "")
    assert stream.num_calls == len(calls)


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser()])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("lazy", [False, True], ids=["forced", "auto"])
def test_call_grammars(parser, parallel, lazy, tiny_tokenizer_json):
    """A forced call's grammar takes calls to the tools and refuses prose; tool_choice "auto"'s lazy grammar
    passes prose untouched, but a call, once begun, must be as well formed."""
    functions = [WEATHER, {"name": "noop"}]
    grammar = llguidance.grammar_from("lark", (parser.lazy_grammar if lazy else parser.call_grammar)(functions, parallel))
    tokenizer = llguidance.LLTokenizer(tiny_tokenizer_json)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return all(matcher.consume_token(t) for t in tokenizer.tokenize_str(text)) and matcher.is_accepting()

    one = parser.call_text("get_weather", {"city": "Rome"})
    assert accepts(one) and accepts(parser.call_text("noop", {}))
    assert accepts(one + parser.separator + one) == parallel
    assert not accepts(parser.call_text("get_weather", {"town": "Rome"}))      # not the tool's schema
    assert not accepts(parser.call_text("delete_everything", {}))              # not a tool
    assert not accepts(one + " and some prose after it")
    assert accepts("It is sunny in Rome.") == lazy and accepts("") == lazy
    if lazy and parser.start_tag:          # prose before a call; a tag begins a call even in the middle of prose
        assert accepts("Let me look.\n" + one)
        assert not accepts("Let me look. " + parser.start_tag.strip() + " not a call")


@pytest.fixture(scope="module")
def tiny_tokenizer_json(tiny_hf_dir):
    return (tiny_hf_dir / "tokenizer.json").read_text()


def test_template_choice_of_syntax():
    assert parser_for_template(None).name == "hermes"
    assert parser_for_template("{% for tool in tools %}<tool_call>{% endfor %}").name == "hermes"
    llama = '{% if tools %}Respond with {"name": function name, "parameters": dictionary}{% endif %}<|python_tag|>'
    assert parser_for_template(llama).name == "llama3_json"


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
]


def test_a_template_without_tools_gets_them_as_hermes_text():
    tools = [{"type": "function", "function": WEATHER}]
    messages, template_tools = messages_for_template(CONVERSATION, tools, "{{ messages }}", HermesParser())
    assert template_tools is None
    assert messages[0]["role"] == "system" and json.dumps(tools[0]) in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content":
                           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert messages[3] == {"role": "user", "content": '<tool_response>\n{"temp_c": 18}\n</tool_response>'}


def test_a_template_with_tools_gets_them_as_they_are():
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}"
    tools = [{"type": "function", "function": WEATHER}]
    messages, template_tools = messages_for_template(CONVERSATION, tools, template, HermesParser())
    assert template_tools == tools and len(messages) == 3
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}     # an object, as HF expects
    assert CONVERSATION[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'   # not changed
