"""What a request asks for and what it gets back per token: plain data that the scheduler, the engine
and the server all read, so it lives beside none of them (and imports nothing but the standard library).

SamplingParams: per-request sampling parameters, validated once at construction.
StructuredOutputs: the grammar a request's output must follow (vLLM's names).
Logprob: the log-probability of a sampled token and the top alternatives at one step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StructuredOutputs:
    """Exactly one of: a JSON schema (`json`, a dict or its JSON text), any JSON object (`json_object`), a
    regular expression, a choice among strings, or a grammar (Lark, or llama.cpp's GBNF). The engine
    compiles it with llguidance and refuses one that does not compile."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, json_object, regex, choice and grammar, "
                             f"got {', '.join(given) or 'none'}")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


@dataclass
class SamplingParams:
    """What to generate and how to pick each token.

    temperature 0 means greedy. top_k 0 or -1 disables top-k. Penalties follow
    vLLM/OpenAI: presence and frequency penalties look at generated tokens only,
    the repetition penalty at prompt and generated tokens. logit_bias adds to a
    token's logit (-100 bans it in effect); allowed_token_ids keeps only those
    tokens; bad_words are never generated (the last token of each, with and
    without a leading space, is banned where the output ends with the rest);
    structured_outputs keeps only the tokens its grammar allows next.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputs | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.seed is None or -2**63 <= self.seed < 2**64, f"seed must fit in 64 bits, got {self.seed}"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop strings must be non-empty strings"),
            (all(-100.0 <= b <= 100.0 for b in (self.logit_bias or {}).values()),
             "logit_bias values must be in [-100, 100]"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "allowed_token_ids must not be empty"),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words or []), "bad_words must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Logprob:
    """Log-probability of the sampled token and the top alternatives at one step."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]
