"""The tiny model's tokenizer: the genuine Qwen2 vocabulary, converted from tiktoken ranks and cached."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from clot import tiny

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def ranks_file(folder: Path, tokens: list[bytes]) -> Path:
    """A tiktoken ranks file: every single byte first (ranks 0-255), then `tokens` in rank order."""
    singles = [bytes([byte]) for byte in range(256)]
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(singles + tokens)]
    path = folder / "ranks.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_merges_are_replayed_from_lower_ranks_and_spelled_in_byte_level_characters():
    singles = "\n".join(f"{base64.b64encode(bytes([byte])).decode()} {byte}" for byte in range(256))
    extra = [b"bc", b"ab", b"abc", b" a", b"\xe4\xbd"]
    text = singles + "".join(f"\n{base64.b64encode(token).decode()} {256 + i}" for i, token in enumerate(extra))
    vocab, merges = tiny.genuine_vocabulary(text)
    assert len(vocab) == 261 and vocab["abc"] == 258 and vocab["Ġa"] == 259 and vocab["ä½"] == 260
    # "abc" is made by merging "bc" first (rank 256, below "ab"), so its last merge is a + bc
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("Ġ", "a"), ("ä", "½")]


def test_a_token_no_earlier_merges_can_make_is_refused(tmp_path):
    text = ranks_file(tmp_path, [b"abc"]).read_text()  # neither "ab" nor "bc" comes before it
    with pytest.raises(ValueError, match="token 256"):
        tiny.genuine_vocabulary(text)


def test_the_tokenizer_is_built_once_then_loaded_from_a_cache_keyed_by_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(tiny, "_qwen_ranks_file", lambda: ranks_file(tmp_path, [b"He", b"ll", b"llo"]))
    built = tiny.build_tokenizer()
    assert built.convert_tokens_to_ids(["llo", "<|endoftext|>", "<|im_start|>", "<|file_sep|>"]) == \
        [258, 259, 260, 280]

    def no_rebuild(ranks_text):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tiny, "_make_tokenizer", no_rebuild)
    cached = tiny.build_tokenizer()
    assert cached("Hello")["input_ids"] == built("Hello")["input_ids"] == [256, 258]
    assert [p.name.startswith("qwen2-tokenizer-") for p in (tmp_path / "cache").iterdir()] == [True]

    monkeypatch.setattr(tiny, "_qwen_ranks_file", lambda: ranks_file(tmp_path, [b"He"]))
    with pytest.raises(AssertionError, match="cached tokenizer"):  # other ranks: another cache entry
        tiny.build_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def test_the_genuine_vocabulary_gives_the_known_qwen2_ids(tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert ids("Hello world") == [9707, 1879]
    assert ids("你好") == [108386]
    assert ids("assistant") == [77091]
    assert ids(SYSTEM_TURN) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    assert (len(model["vocab"]), len(model["merges"])) == (151643 + 22, 151387)


def test_the_family_added_tokens_have_their_real_ids_and_roles(tokenizer):
    added = tiny.SPECIAL_TOKENS + tiny.PLAIN_ADDED_TOKENS
    assert tokenizer.convert_tokens_to_ids(added) == list(range(151643, 151665))
    assert tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]) == \
        [151652, 151655, 151656]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = "<|im_start|>user\n<tool_call>{}</tool_call><|im_end|>"
    # special tokens are dropped when decoding; the tool-call tags are plain text, as in Qwen2.5-VL
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == "user\n<tool_call>{}</tool_call>"


@pytest.mark.parametrize("text", ["Why was the calendar sad? Its days were numbered.", "为什么日历很难过？",
                                  "カレンダーはなぜ悲しいの？　🗓️", "tab\tand  spaces\n\n"])
def test_text_in_every_language_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_the_saved_tiny_model_has_the_real_vocabulary_size_and_preprocessing(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == tiny.PADDED_VOCAB_SIZE == 151936
    assert (config["image_token_id"], config["video_token_id"], config["vision_start_token_id"]) == \
        (151655, 151656, 151652)
    images = json.loads((tiny_dir / "processor_config.json").read_text())["image_processor"]
    assert images["size"] == {"shortest_edge": 3136, "longest_edge": 12845056}
    assert images["image_processor_type"] == "Qwen2VLImageProcessor"
