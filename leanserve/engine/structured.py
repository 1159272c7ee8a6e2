"""Structured outputs: a grammar per sequence (llguidance) and the masks of the tokens it allows next.

llguidance takes the tokenizer's own JSON, compiles a JSON schema, regex, choice or grammar in about a
millisecond, and fills a bitmask of the allowed next tokens per matcher (bit i of word i // 32 allows
token i). `GrammarCompiler` turns a request's `StructuredOutputs` into one matcher per sequence, refusing
what does not compile; `MaskFiller` computes a step's masks on a worker thread while the model runs (the
matchers' work drops the GIL), and the sampler applies them to the constrained rows only.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import llguidance
import torch

from leanserve.engine.tokenizer import Tokenizer
from leanserve.params import StructuredOutputs

# Between JSON tokens: one optional line break and indentation, as pretty-printed JSON has, and no more, so
# that a model cannot fill max_tokens with whitespace inside a value that never ends (a schema's x-guidance
# options may say otherwise).
JSON_WHITESPACE = r"(\r?\n)?[\x20\x09]{0,40}"


@dataclass
class TokenMasks:
    """The allowed next tokens of some rows of a step: `bitmask[j]` is row `rows[j]`'s, in llguidance's
    layout ([len(rows), ceil(vocab / 32)] int32)."""

    rows: list[int]
    bitmask: torch.Tensor

    def penalty(self, vocab_size: int) -> torch.Tensor:
        """[len(rows), vocab_size] float32: 0 where the token may come next, -inf where not, to add to the
        logits (a byte's 8 bits at a time, from a table: 20 times faster than shifting each word 32 ways; and
        adding it 6 times faster than torch.where on a boolean mask)."""
        table = _BYTE_PENALTY.index_select(0, self.bitmask.view(torch.uint8).flatten().int())
        return table.view(len(self.rows), -1)[:, :vocab_size]


# little-endian: bit i of byte b is lane i of row b
_BYTE_PENALTY = torch.where(((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))


class GrammarCompiler:
    """A model's grammar compiler: `StructuredOutputs` -> llguidance matchers over its vocabulary."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size          # the logits' width, which may exceed the tokenizer's

    @cached_property
    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built at the first constrained request (a quarter of a second for a 49k vocabulary)."""
        return llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                      eos_token=sorted(self.tokenizer.eos_token_ids))

    def matchers(self, spec: StructuredOutputs, n: int) -> list[llguidance.LLMatcher]:
        """n fresh matchers of the grammar; ValueError naming the problem if it does not compile."""
        grammar = self._grammar(spec)
        matchers = [llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0) for _ in range(n)]
        if matchers[0].is_error():
            raise ValueError(f"invalid structured output ({spec.kind}): {matchers[0].get_error()}")
        return matchers

    @staticmethod
    def _grammar(spec: StructuredOutputs) -> str:
        if spec.json_object:
            return _json_grammar({"type": "object"})
        if spec.json is not None:
            schema = spec.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid structured output (json): the schema is not JSON: {e}") from e
            if not isinstance(schema, (dict, bool)):
                raise ValueError("invalid structured output (json): the schema must be a JSON object")
            return _json_grammar(schema)
        if spec.regex is not None:
            return llguidance.grammar_from("regex", spec.regex)
        if spec.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(spec.choice))
        try:
            return llguidance.grammar_from("grammar", spec.grammar)   # Lark, or GBNF converted to Lark
        except ValueError as e:
            raise ValueError(f"invalid structured output (grammar): {e}") from e


def _json_grammar(schema: dict | bool) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})


class MaskFiller:
    """Computes the next-token masks of a step's constrained rows on a worker thread."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="leanserve-masks")
        self._executor = llguidance.LLExecutor(num_threads=2)

    def start(self, matchers: list[llguidance.LLMatcher | None]) -> Future[TokenMasks] | None:
        """The masks of the rows that have a matcher (None if no row has one), being computed."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        # Allocated here, on the engine's thread: a torch op large enough to run in parallel on the worker thread
        # would give that thread an OpenMP team of its own, and with more OpenMP threads than cores libgomp stops
        # spinning at barriers (every later step's parallel regions then sleep and wake: 20-30% slower).
        bitmask = torch.full((len(rows), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        return self._pool.submit(self._fill, rows, [matchers[i] for i in rows], bitmask)

    def _fill(self, rows: list[int], matchers: list[llguidance.LLMatcher], bitmask: torch.Tensor) -> TokenMasks:
        # What llguidance.torch's fill_next_token_bitmask_par does; that module is not imported, since it runs
        # torch.compile at import, which imports Triton before TRITON_INTERPRET can be set.
        self._executor.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                               bitmask.shape[1] * 4, len(rows))
        return TokenMasks(rows, bitmask)
