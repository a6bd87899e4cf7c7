"""A tiny, offline model of the default base model's family (Qwen2.5-VL), for tests and smoke runs.

Random weights, a byte-level BPE tokenizer trained on the project's own en/zh/ja text, the
family's special tokens and chat-template format, saved to a folder and loaded back through the
same `from_pretrained` path as a real checkpoint. Building takes a few seconds on a CPU.

    python -m clot.tiny /tmp/clot-tiny        # build (or reuse) and print the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
DEFAULT_DIR = Path(os.environ.get("CLOT_TINY_DIR", Path(tempfile.gettempdir()) / "clot-tiny"))
TINY_NAME = "clot-tiny-qwen2.5-vl"
VOCAB_SIZE = 4000
SEED = 1234

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

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


def corpus() -> list[str]:
    """The bundled text the tokenizer learns from: every template and all sample data and nouns."""
    from clot import prompts

    lines: list[str] = []
    for name in dir(prompts):
        value = getattr(prompts, name)
        if isinstance(value, dict):
            stack = [value]
            while stack:
                item = stack.pop()
                for v in item.values():
                    if isinstance(v, dict):
                        stack.append(v)
                    elif isinstance(v, list):
                        lines += [x for x in v if isinstance(x, str)]
                    elif isinstance(v, str):
                        lines.append(v)
    for path in sorted(ASSETS.rglob("*")):
        if path.suffix in (".jsonl", ".txt") and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if path.suffix == ".jsonl":
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    lines += [str(row.get(k) or "") for k in ("question", "text")]
                else:
                    lines.append(line)
    lines += [f"{i}. {letter}." for i in range(1, 9) for letter in "ABCDEFGH"]
    return [line for line in lines if line.strip()]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers, Regex
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, errors="replace",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Model sizes of the same architecture. "tiny" is for tests; "small" (~100M parameters, images up to
# 256 visual tokens) is for CPU benchmarks where the relative cost of image tokens must be realistic.
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
               vocab_size=151936, rope_theta=1000000.0, max_image_tokens=1024),
}


def model_config(size: str, tokenizer):
    """The Qwen2.5-VL configuration of a size, with our tokenizer's special token ids."""
    from transformers import Qwen2_5_VLConfig

    spec = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = {"window_size": 56, "fullatt_block_indexes": [1], **spec.get("vision_extra", {})}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=spec.get("vocab_size", len(tokenizer)), max_position_embeddings=4096,
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


def build_processor(size: str = "tiny"):
    """Our tokenizer with a Qwen2.5-VL image processor sized for `size`."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * SIZES[size]["max_image_tokens"]})
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
    recipe = hashlib.sha256(("\n".join(corpus()) + CHAT_TEMPLATE + f"{VOCAB_SIZE}{SEED}v1{spec}").encode()).hexdigest()[:16]
    stamp = target / "clot_tiny.json"
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return target

    processor = build_processor(size)
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
