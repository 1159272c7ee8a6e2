"""Tool calling: from OpenAI's `tools` to the prompt, the grammar that enforces `tool_choice`, and from the
model's tool-call syntax back to OpenAI's `tool_calls`, whole or streamed.

Two syntaxes, as vLLM names their parsers:
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Hermes, Qwen2.5,
  SmolLM2's tool-use prompt);
- llama3_json: the whole reply is `{"name": ..., "parameters": {...}}`, several joined by `;` (Llama 3.x).

A chat template that has no tools section (it never mentions `tools`) gets the tools as a Hermes system
prompt, as Qwen2.5's template writes it, and the conversation's tool calls and tool results rendered as
Hermes text, so that any chat model can be offered tools.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from leanserve.engine.structured import JSON_WHITESPACE


@dataclass
class ToolCall:
    name: str
    arguments: str                       # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


class ToolCallParser:
    """One tool-call syntax: how a call is written, the grammar of calls, and how to read them back."""

    name: str
    arguments_key: str
    start_tag: str          # where a call begins; "" for a syntax that is the whole reply
    end_tag: str
    separator = "\n"        # between parallel calls

    def call_text(self, name: str, arguments: dict | str) -> str:
        if isinstance(arguments, str):
            arguments = json.loads(arguments or "{}")
        return self.start_tag + json.dumps({"name": name, self.arguments_key: arguments}) + self.end_tag

    def call_grammar(self, functions: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance) of one call, or one or more if parallel, to one of these functions:
        what tool_choice "required" or a named function enforces."""
        return f"start: call {self._more_calls(parallel)}\n" + self._call_rules(functions, self.start_tag)

    def lazy_grammar(self, functions: list[dict], parallel: bool) -> str:
        """tool_choice "auto": any reply, but once it begins a call (the start tag; for a syntax without one, a
        reply that opens with "{"), a well-formed call to one of these functions, then only more calls if
        parallel, else the end. With a start tag, its lexeme is lazy (llguidance): it ends at the tag's first
        occurrence, and the call is enforced from there on."""
        if not self.start_tag:
            return (f"start: PROSE | call {self._more_calls(parallel)}\n" + r'PROSE: /\s*([^{\s](.|\n)*)?/' + "\n"
                    + self._call_rules(functions, ""))
        tag = self.start_tag.strip()
        return (f"start: TEXT | head call {'(NEXT call)* ' if parallel else ''}END\n"
                f"head[lazy]: TEXT {json.dumps(tag)}\n"
                + r"TEXT: /(.|\n)*/" + "\n"
                + r"NEXT: /\s*/ " + json.dumps(tag) + "\n"
                + r"END: /\s*/" + "\n"
                + self._call_rules(functions, self.start_tag[self.start_tag.index(tag) + len(tag):]))

    def _more_calls(self, parallel: bool) -> str:
        return f'({json.dumps(self.separator)} call)*' if parallel else ""

    def _call_rules(self, functions: list[dict], opening: str) -> str:
        """The rule `call`: opening, a JSON object naming one of the functions with arguments that follow its
        parameters' schema, the end tag."""
        schema = {"x-guidance": {"whitespace_pattern": JSON_WHITESPACE}, "anyOf": [{
            "type": "object", "additionalProperties": False, "required": ["name", self.arguments_key],
            "properties": {"name": {"const": f["name"]},
                           self.arguments_key: f.get("parameters") or {"type": "object"}}} for f in functions]}
        return (f"call: {json.dumps(opening) + ' ' if opening else ''}body"
                f"{' ' + json.dumps(self.end_tag) if self.end_tag else ''}\n"
                f"body: %json {json.dumps(schema)}\n")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The reply's content (None if it is only calls) and its calls; no calls if it holds none that parse."""
        raise NotImplementedError

    def _call(self, obj) -> ToolCall | None:
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return None
        arguments = obj.get(self.arguments_key, obj.get("arguments", {}))
        return ToolCall(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


class HermesParser(ToolCallParser):
    name = "hermes"
    arguments_key = "arguments"
    start_tag = "<tool_call>\n"
    end_tag = "\n</tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = []
        for body in self._block.findall(text):
            try:
                call = self._call(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        content = text[:text.index("<tool_call>")].strip()
        return content or None, calls


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    arguments_key = "parameters"
    start_tag = ""
    end_tag = ""
    separator = "; "

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, at = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, []
            call = self._call(obj)
            if call is None:
                return text, []
            calls.append(call)
            at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        return None, calls


PARSERS: dict[str, ToolCallParser] = {p.name: p for p in (HermesParser(), Llama3JsonParser())}


def parser_for_template(template: str | None) -> ToolCallParser:
    """The syntax a chat template teaches: Llama 3.x's JSON if it asks for "parameters" or uses its python
    tag, otherwise Hermes (also what templates without a tools section get)."""
    if template and "tools" in template and ("<|python_tag|>" in template or '"parameters"' in template):
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]


def template_has_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def hermes_system_prompt(tools: list[dict]) -> str:
    """The tools section Qwen2.5's template writes into the system message."""
    listed = "\n".join(json.dumps(t) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def messages_for_template(messages: list[dict], tools: list[dict] | None, template: str | None,
                          parser: ToolCallParser) -> tuple[list[dict], list[dict] | None]:
    """The conversation and tools as the chat template takes them. A template with a tools section gets them
    as they are (tool-call arguments as objects, as HuggingFace templates expect); one without gets the tools
    in the system message and tool calls and results as text."""
    if template_has_tools(template):
        rendered = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(
                    c["function"]["arguments"] or "{}")}} for c in m["tool_calls"]]
            rendered.append(m)
        return rendered, tools
    rendered = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(parser.call_text(c["function"]["name"], c["function"]["arguments"])
                              for c in m["tool_calls"])
            rendered.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content"), calls]))})
        elif m["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            rendered.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        prompt = hermes_system_prompt(tools)
        if rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + prompt}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered, None


class ToolCallStream:
    """Splits one streamed choice's text into content deltas and tool calls, each call given out once its
    text is complete. Text that could begin a call is held back until it is known not to."""

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self._held = ""
        self._in_call = False
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._held += text
        if not self.parser.end_tag:                 # the reply is the call: decided at the end
            stripped = self._held.lstrip()
            if self.num_calls == 0 and (not stripped or stripped[0] in "{<"):
                return "", []
            content, self._held = self._held, ""
            return content, []
        content, calls = "", []
        start = self.parser.start_tag.strip()
        while True:
            if not self._in_call:
                at = self._held.find(start)
                if at < 0:
                    keep = _partial_suffix(self._held, start)
                    content += self._held[:len(self._held) - keep]
                    self._held = self._held[len(self._held) - keep:]
                    break
                content += self._held[:at]
                self._held = self._held[at:]
                self._in_call = True
            end = self._held.find(self.parser.end_tag.strip())
            if end < 0:
                break
            end += len(self.parser.end_tag.strip())
            block, self._held, self._in_call = self._held[:end], self._held[end:], False
            _, parsed = self.parser.parse(block)
            if parsed:
                calls += parsed
            else:
                content += block
        if self.num_calls or calls:
            content = content if content.strip() else ""     # no whitespace between calls
        self.num_calls += len(calls)
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left once the choice ends, read as `parse` reads a whole reply: an unfinished call is
        dropped after complete ones, and given back as content if there are none."""
        rest, self._held = self._held, ""
        content, calls = self.parser.parse(rest) if rest else ("", [])
        if self.num_calls and not calls:
            content = ""
        self.num_calls += len(calls)
        return content or "", calls


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of text that begins tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
