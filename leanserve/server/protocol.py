"""OpenAI API request bodies (pydantic).

No field is silently ignored: a field this server does not implement is a 400 that names it. The fields that
carry no meaning for generation (`user`, `metadata`, `store`, `service_tier`) are accepted and ignored."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leanserve.params import SamplingParams, StructuredOutputs


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False      # usage (so far) in every chunk


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type 'json_schema', and only with it")
        return self


class StructuredOutputsField(_Body):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, or vLLM's older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted and ignored: they change nothing in what is generated.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        if isinstance(value, list) and (len(value) > 4 or not all(value)):
            raise ValueError("stop takes up to 4 non-empty strings")
        if value == "":
            raise ValueError("stop must not be empty")
        return value

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """ValueError for values that are valid JSON but not a valid request."""
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty, seed=self.seed,
            stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs, logit_bias=self._logit_bias(),
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            structured_outputs=self._structured_outputs())

    def _logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        try:
            return {int(token_id): bias for token_id, bias in self.logit_bias.items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids") from None

    def _structured_outputs(self) -> StructuredOutputs | None:
        """The one constraint the request asks for, by whichever of the three spellings."""
        asked: dict[str, StructuredOutputs] = {}
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            asked["response_format"] = (StructuredOutputs(json_object=True) if fmt.type == "json_object"
                                        else StructuredOutputs(json=fmt.json_schema.schema_ or {}))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            asked["structured_outputs"] = StructuredOutputs(json=so.json_, json_object=bool(so.json_object),
                                                            regex=so.regex, choice=so.choice, grammar=so.grammar)
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        for name, value in guided.items():
            if value is not None:
                asked[f"guided_{name}"] = StructuredOutputs(**{name: value})
        if len(asked) > 1:
            raise ValueError(f"only one structured output may be asked for, got {', '.join(asked)}")
        return next(iter(asked.values()), None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and (self.stream_options.include_usage
                                                             or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)


class ToolCallFunction(_Body):
    name: str
    arguments: str


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction

    @field_validator("function")
    @classmethod
    def _arguments_are_json(cls, value: ToolCallFunction):
        try:
            json.loads(value.arguments or "{}")
        except json.JSONDecodeError:
            raise ValueError("tool call arguments must be JSON text") from None
        return value


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None      # an assistant's earlier calls
    tool_call_id: str | None = None                      # the call a tool message answers

    def as_dict(self) -> dict:
        """The message as a chat template takes it."""
        message = {"role": self.role, "content": self.text() if self.content is not None or not self.tool_calls
                   else None}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        message.update({k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id)) if v})
        return message

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(part.get("text", "") for part in self.content)


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class _ChatPromptFields(_Body):
    """How a conversation becomes the prompt: the chat template's options and the tools offered."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) or choice == "required":
            names = [t.function.name for t in self.tools or []]
            if not names:
                raise ValueError("tool_choice needs tools")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"tool_choice names the function '{choice.function.name}', which is not in tools")
        if self.continue_final_message and (
                (self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set)
                or not self.messages or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message continues a final assistant message, "
                             "without add_generation_prompt")
        return self

    def offered_tools(self) -> list[dict] | None:
        """The tools the model may call: none with tool_choice "none"; only the named one if one is named."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
        return tools

    @property
    def forces_tool_call(self) -> bool:
        return self.tools is not None and (self.tool_choice == "required" or isinstance(self.tool_choice,
                                                                                         NamedToolChoice))


class ChatCompletionRequest(_SamplingFields, _ChatPromptFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if not value or (isinstance(value, list) and any(isinstance(p, (str, list)) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value


class TokenizeRequest(_ChatPromptFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
