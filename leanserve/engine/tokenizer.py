"""Tokenizer (HuggingFace `tokenizers` backend), chat templates and incremental detokenization.

A tokenizer is built either from a HuggingFace directory (tokenizer.json) or from the
`tokenizer.ggml.*` metadata of a GGUF file, rebuilding what llama.cpp does with that metadata.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# llama.cpp token types (enum llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# Pre-tokenizer regexes llama.cpp uses for some `tokenizer.ggml.pre` values (llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX_BY_PRE = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                       "qwen2": _QWEN2_SPLIT}


class Tokenizer:
    """Text <-> token ids, special-token ids and the chat template of one model.

    BOS is added by `encode` itself (when the model wants it), never by the backend's
    post-processor, so both checkpoint formats behave the same.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None = None, extra_eos_token_ids: tuple[int, ...] = (),
                 add_bos_token: bool = False, chat_template: str | None = None) -> None:
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.eos_token_ids = frozenset(i for i in (eos_token_id, *extra_eos_token_ids) if i is not None)
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.bos_token = backend.id_to_token(bos_token_id) if bos_token_id is not None else None
        self.eos_token = backend.id_to_token(eos_token_id) if eos_token_id is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        """Render a conversation as HuggingFace does (the template gets `tools` and any further variables).
        The template writes any BOS itself, so encode the result with `add_special_tokens=False`."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and (isinstance(message.get("content"), str)
                         or (message.get("content") is None and message.get("tool_calls")))):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {message!r}")
        try:
            return self._compiled_chat_template.render({
                **template_kwargs, "messages": [dict(m) for m in messages], "tools": tools,
                "add_generation_prompt": add_generation_prompt, "bos_token": self.bos_token or "",
                "eos_token": self.eos_token or ""})
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e

    @cached_property
    def _compiled_chat_template(self) -> jinja2.Template:
        # The environment transformers uses, so templates from the Hub render identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template does not compile: {e}") from e

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, path: str | Path) -> Tokenizer:
        """Build from a `gguf.GGUFReader`'s `tokenizer.*` metadata; `path` names the file in errors."""

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        model = field("tokenizer.ggml.model")
        tokens = field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens is missing)")
        token_types = field("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if model == "gpt2":
            merges = field("tokenizer.ggml.merges")
            if merges is None:
                raise ValueError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
            backend = _byte_level_bpe(tokens, merges, field("tokenizer.ggml.pre", "default"))
        elif model == "llama":
            scores = field("tokenizer.ggml.scores")
            if scores is None:
                raise ValueError(f"{path}: SentencePiece tokenizer without tokenizer.ggml.scores")
            unk_id = field("tokenizer.ggml.unknown_token_id", 0)
            backend = _sentencepiece_bpe(tokens, scores, token_types, tokens[unk_id],
                                         field("tokenizer.ggml.add_space_prefix", True))
        else:
            raise ValueError(f"{path}: unsupported tokenizer model {model!r} (supported: 'gpt2', 'llama')")
        # Without these, "<|im_start|>" in a prompt would be cut into pieces instead of
        # becoming its own token, as llama.cpp does.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, token_types) if kind in (_UNKNOWN, _CONTROL)])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
        return cls(
            backend,
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_id=field("tokenizer.ggml.eos_token_id"),
            pad_token_id=field("tokenizer.ggml.padding_token_id"),
            # End-of-turn / end-of-message ids are end tokens too where the file declares them.
            extra_eos_token_ids=tuple(i for i in (field("tokenizer.ggml.eot_token_id"),
                                                  field("tokenizer.ggml.eom_token_id")) if i is not None),
            # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise.
            add_bos_token=bool(field("tokenizer.ggml.add_bos_token", model == "llama")),
            chat_template=field("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from tokenizer.json, tokenizer_config.json and generation_config.json in `path`."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{tokenizer_file}: missing (only fast tokenizers in tokenizer.json are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{tokenizer_file}: cannot be parsed: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")

        def token_id(key: str) -> int | None:
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token  # older AddedToken dicts
            return backend.token_to_id(token) if token is not None else None

        generation_eos = generation.get("eos_token_id")
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        if eos_id is None and generation_eos:
            eos_id = generation_eos[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # Llama 3 style: BOS comes from the post-processor, with no flag in tokenizer_config.
            add_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(backend, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=token_id("pad_token"),
                   extra_eos_token_ids=tuple(generation_eos), add_bos_token=bool(add_bos),
                   chat_template=_hf_chat_template(path, config))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges]))
    if pre == "smollm":
        # llama.cpp splits on \p{N} (every digit alone) before the GPT-2 regex; this is the
        # same pre-tokenizer as SmolLM2's own tokenizer.json.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _SPLIT_REGEX_BY_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEX_BY_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in ("gpt2", "default"):
            logger.warning("unknown tokenizer.ggml.pre %r: using the GPT-2 pre-tokenizer", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int], unk_token: str,
                       add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece BPE as a `tokenizers` BPE with byte fallback, like transformers' LlamaTokenizer."""
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, token_types),
                                              unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece stores scores, not merges: every split of a normal piece into two normal
    pieces is a merge ranked by the merged piece's score (transformers' `generate_merges`)."""
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, token_types)) if kind == _NORMAL}
    merges = []
    for piece, score in zip(tokens, scores):
        if piece not in normal:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(l, r) for l, r in splits if l in normal and r in normal]
        merges.extend((l, r, score) for l, r in sorted(splits, key=lambda m: (normal[m[0]], normal[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(l, r) for l, r, _ in merges]


def _hf_chat_template(path: Path, config: dict) -> str | None:
    template_file = path / "chat_template.jinja"  # where transformers >= 4.50 saves it
    if template_file.is_file():
        return template_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON: {e}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas, one request at a time.

    Decoding works on a short window of ids (vLLM/TGI style): the text of
    `window[:read]` was emitted already, `window[read:]` is new. Decoding the window
    and diffing keeps context-dependent spacing right (SentencePiece), and a delta
    ending in U+FFFD is held back because it is a UTF-8 character cut between tokens.

    Stop strings are searched in the undelivered text only (the held-back tail plus the
    new delta). The longest tail that could still start a stop string is held back, so a
    partial stop string never reaches the client; `flush()` releases it at the end.
    """

    # Prompt tokens kept as decoding context for the first generated token.
    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop_strings: tuple[str, ...] | list[str] = (), include_stop_str_in_output: bool = False) -> None:
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty strings")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = tuple(stop_strings)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched_stop: str | None = None
        self._window = list(prompt_token_ids[-self._PROMPT_CONTEXT:])
        self._read = len(self._window)
        self._pending = ""  # decoded, not yet emitted (a possible stop-string prefix)
        self._emitted: list[str] = []

    @property
    def output_text(self) -> str:
        return "".join(self._emitted)

    def add_tokens(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Returns (text now safe to emit, the stop string matched or None). Once a stop
        string matched, further tokens are ignored."""
        if self.matched_stop is not None:
            return "", None
        self._window.extend(new_token_ids)
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """Text still held back, for a request that ends without a stop string."""
        if self.matched_stop is not None:
            return ""
        return self._release(self._decode_new(final=True), final=True)[0]

    def _decode_new(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self._window[:self._read], skip_special_tokens=self.skip_special_tokens)
        text = decode(self._window, skip_special_tokens=self.skip_special_tokens)
        if len(text) <= len(prefix_text) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or a character still incomplete
        self._window = self._window[self._read:]
        self._read = len(self._window)
        return text[len(prefix_text):]

    def _release(self, delta: str, final: bool) -> tuple[str, str | None]:
        text = self._pending + delta
        match = min(((text.find(s), s) for s in self.stop_strings if s in text), default=None)
        if match is not None:
            start, stop = match
            self.matched_stop = stop
            self._pending = ""
            return self._emit(text[:start + len(stop) if self.include_stop_str_in_output else start]), stop
        hold = 0 if final else self._partial_stop_length(text)
        self._pending = text[len(text) - hold:]
        return self._emit(text[:len(text) - hold]), None

    def _partial_stop_length(self, text: str) -> int:
        longest = max((len(s) for s in self.stop_strings), default=1)
        for k in range(min(len(text), longest - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop_strings):
                return k
        return 0

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text
