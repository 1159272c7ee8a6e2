"""Tokenizer, chat template and incremental detokenizer, checked against transformers."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from leanserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tiny_models import default_gguf_reader

TEXTS = [
    "Hello world! How are you today?",
    "The year 2024 had 366 days; 12345 + 678 = 13023.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "héllo 世界 🙂 naïve café — “quotes” ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces,\ttabs\n\n\nand newlines  ",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another, with emoji 🙂?"},
]


@pytest.fixture(scope="module")
def tokenizer(default_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_reader(), default_gguf_path)


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)


def test_special_ids_of_default_model(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eos_token_ids == frozenset({2})
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.add_bos_token is False


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_and_round_trips(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_in_text_become_single_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nhi"  # special tokens skipped by default


def test_digits_split_one_by_one_like_llama_cpp(tokenizer: Tokenizer, hf_tokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) splits off every digit
    # before the GPT-2 regex, so "a  1" is "a", "  ", "1" and the two spaces merge into one
    # token. transformers' GGUF converter skips that step and cuts " 1" instead, so this case
    # is checked against llama.cpp's documented behaviour, not transformers.
    assert tokenizer.backend.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode("a  1")) == ["a", "Ġ", "Ġ", "1"]
    assert tokenizer.backend.encode("x 12345").tokens == ["x", "Ġ", "1", "2", "3", "4", "5"]


def test_bos_added_only_when_the_model_wants_it(tokenizer: Tokenizer) -> None:
    with_bos = Tokenizer(tokenizer.backend, bos_token_id=1, eos_token_id=2, add_bos_token=True)
    assert with_bos.encode("hi") == [1] + tokenizer.encode("hi")
    assert with_bos.encode("hi", add_special_tokens=False) == tokenizer.encode("hi")


def test_hf_dir_tokenizer_matches_gguf_tokenizer(tokenizer: Tokenizer, tiny_hf_dir: Path) -> None:
    from_dir = Tokenizer.from_hf_dir(tiny_hf_dir)
    for text in TEXTS:
        assert from_dir.encode(text) == tokenizer.encode(text)
    assert (from_dir.bos_token_id, from_dir.eos_token_id, from_dir.pad_token_id) == (1, 2, 2)
    assert from_dir.eos_token_ids == frozenset({2})
    assert from_dir.add_bos_token is False
    assert from_dir.apply_chat_template(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2]], ids=["with_system", "default_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer: Tokenizer, hf_tokenizer, messages: list[dict],
                                            add_generation_prompt: bool) -> None:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
    assert tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"role": "user"}],
    [{"role": "user", "content": 5}],
    [{"content": "hi"}],
    ["hi"],
])
def test_malformed_messages_are_rejected(tokenizer: Tokenizer, messages) -> None:
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template(messages)


def test_chat_template_errors_become_value_errors(tokenizer: Tokenizer) -> None:
    no_template = Tokenizer(tokenizer.backend, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template(CONVERSATION)
    strict = Tokenizer(tokenizer.backend, bos_token_id=1, eos_token_id=2, chat_template=(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}"
        "{% endif %}{{ messages[0]['content'] }}"))
    assert strict.apply_chat_template([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(ValueError, match="first message must be from the user"):
        strict.apply_chat_template(CONVERSATION)
    broken = Tokenizer(tokenizer.backend, bos_token_id=1, eos_token_id=2, chat_template="{% for %}")
    with pytest.raises(ValueError, match="chat template"):
        broken.apply_chat_template(CONVERSATION)


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path: Path) -> None:
    """tokenizer.ggml.model "llama": scores instead of merges, byte fallback, BOS by default."""
    transformers = pytest.importorskip("transformers")
    pieces = ["▁", "t", "h", "e", "a", "n", "d", "i", "s", "o", "r", "w", "l", "H", "▁t", "he", "▁the",
              "▁a", "in", "▁in", "an", "▁an", "nd", "▁and", "is", "▁is", "er", "or", "▁w", "ld", "▁wor",
              "▁world", "ll", "He", "el", "ell", "Hell", "Hello", "▁Hello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "spm.gguf"), tmp_path / "spm.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert ours.add_bos_token is True
    for text in ["Hello world", "the and is", "Hello\nworld 🙂 é", "xyz", "<s>the</s>", ""]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_unsupported_gguf_tokenizer_model_is_named(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "wp.gguf", "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[UNK]", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"wp\.gguf: unsupported tokenizer model 'bert'"):
        Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "wp.gguf"), tmp_path / "wp.gguf")


# ------------------------------------------------------------------------- detokenizer


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[tuple[str, str | None]]:
    return [detok.add_tokens([token]) for token in ids]


@pytest.mark.parametrize("text", TEXTS[:4])
def test_streaming_one_token_at_a_time_reproduces_decode(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]),
                              add_special_tokens=False)
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [delta for delta, stop in stream(detok, ids)]
    tail = detok.flush()
    assert "".join(deltas) + tail == detok.output_text == tokenizer.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)


def test_multibyte_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🙂世")
    assert len(ids) > 2  # the characters really are split across tokens
    deltas = [delta for delta, _ in stream(IncrementalDetokenizer(tokenizer, []), ids)]
    assert "" in deltas and "".join(deltas) == "🙂世"
    assert all(delta in ("", "🙂", "世", "🙂世") for delta in deltas)


def test_several_tokens_per_call_and_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hi there<|im_end|>")
    skipping = IncrementalDetokenizer(tokenizer, [])
    assert skipping.add_tokens(ids) == ("Hi there", None)
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert keeping.add_tokens(ids[:2])[0] + keeping.add_tokens(ids[2:])[0] == "Hi there<|im_end|>"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_output(tokenizer: Tokenizer, include: bool) -> None:
    ids = tokenizer.encode("The answer is 42. END of story, more text")
    detok = IncrementalDetokenizer(tokenizer, [], stop_strings=["END"], include_stop_str_in_output=include)
    results = stream(detok, ids)
    stops = [stop for _, stop in results if stop is not None]
    assert stops == ["END"]
    expected = "The answer is 42. END" if include else "The answer is 42. "
    assert "".join(delta for delta, _ in results) == detok.output_text == expected
    assert detok.flush() == "" and detok.add_tokens(tokenizer.encode(" more")) == ("", None)


def test_stop_string_spanning_tokens_is_found_and_never_leaks(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world, again")
    assert tokenizer.backend.encode("Hello world").tokens == ["Hello", "Ġworld"]
    detok = IncrementalDetokenizer(tokenizer, [], stop_strings=["lo wo"])
    results = stream(detok, ids)
    assert results[0] == ("Hel", None)  # "lo" could start the stop string: held back
    assert results[1] == ("", "lo wo")
    assert detok.output_text == "Hel"


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop_strings=["world", "o w"])
    assert detok.add_tokens(tokenizer.encode("Hello world")) == ("Hell", "o w")


def test_partial_stop_string_is_released_by_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world")
    detok = IncrementalDetokenizer(tokenizer, [], stop_strings=["world peace"])
    results = stream(detok, ids)
    assert results == [("Hello", None), (" ", None)]  # "world" might begin "world peace"
    assert detok.flush() == "world"
    assert detok.output_text == "Hello world"


def test_decoding_work_per_call_does_not_grow_with_output(tokenizer: Tokenizer) -> None:
    class CountingTokenizer:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    ids = tokenizer.encode("word " * 300 + "🙂 世界")
    detok = IncrementalDetokenizer(counting, list(range(100)), stop_strings=["never appears"])
    stream(detok, ids)
    assert detok.output_text + detok.flush() == tokenizer.decode(ids)
    assert counting.longest <= 8
