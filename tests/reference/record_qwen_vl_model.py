"""Records the Qwen-VL-Chat parity fixture from the ORIGINAL remote code on seeded tiny weights.

Output: tests/fixtures/qwen_vl/model.json and the two synthetic images image1.png / image2.png next
to it. tests/test_qwen_vl_model.py rebuilds the same tiny model with our native classes and
compares. CI never runs this script; rerun it only to re-record.

How to run (from the repository root):
  1. bash tests/reference/setup_qwen_vl_env.sh /work/qwen-vl-refenv     # python 3.11 + transformers 4.32
  2. fetch the original remote-code files of Qwen-VL-Chat into one folder, e.g. from the GitHub
     mirror x1ngzai/Qwen-VL-Chat-Int4: configuration_qwen.py, modeling_qwen.py, visual.py,
     qwen_generation_utils.py, tokenization_qwen.py, tokenizer_config.json, qwen.tiktoken
     (only the code and tokenizer are used; the mirror's weights and quantization config are not)
  3. /work/qwen-vl-refenv/bin/python tests/reference/record_qwen_vl_model.py /path/to/original-files

Everything is seeded; two runs write byte-identical files (the script checks its own determinism
with --check, which records twice in memory and compares).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "qwen_vl"
ORIGINAL_FILES = ["configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py",
                  "tokenization_qwen.py", "tokenizer_config.json", "qwen.tiktoken"]
PROBE_IDS_SEED = 7  # which vocabulary ids have their logits recorded at every position
PROBE_COUNT = 64
TOP_K = 20
NEW_TOKENS = 12
PAD_ID = 151643
IMAGE_SEED = 11
LORA_SEED = 4321
LORA_CONFIG = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["c_attn", "attn.c_proj"]}

PROMPTS = {
    "text": [{"text": "讲一个关于程序员的冷笑话。"}],
    "one_image": [{"image": "image1.png"}, {"text": "给这张图配一句幽默的标题。"}],
    "two_images": [{"image": "image1.png"}, {"image": "image2.png"},
                   {"text": "Write a funny caption comparing these two pictures."}],
    "short_text": [{"text": "Hi!"}],
    # Just under seq_length, so greedy decoding crosses it: the original keeps the prefill's NTK factor.
    "long_text": [{"text": "Tell me a long joke about a cat who learns to program, and make the punchline land. " * 11
                           + "Please keep it short and funny, thank you."}],
}
BATCH = ["text", "short_text"]  # left-padded together; both stay under seq_length, see the note below
LORA_PROMPT = "one_image"


def load_random_weights():
    spec = importlib.util.spec_from_file_location(
        "random_weights", ROOT / "clot" / "models" / "qwen_vl" / "random_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB gradient with seeded noise, so that every channel and position carries signal."""
    ys, xs = np.mgrid[0:height, 0:width]
    gradient = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1), (xs + ys) / (width + height)], -1)
    noise = rng.uniform(-0.25, 0.25, size=(height, width, 3))
    return Image.fromarray((np.clip(gradient + noise, 0, 1) * 255).round().astype(np.uint8), "RGB")


def write_images(folder: Path) -> None:
    rng = np.random.default_rng(IMAGE_SEED)
    synthetic_image(64, 48, rng).save(folder / "image1.png")
    synthetic_image(40, 80, rng).save(folder / "image2.png")


def floats(array: torch.Tensor) -> dict:
    """fp32 values, exact and compact: little-endian float32 bytes in base64."""
    data = array.detach().float().contiguous().numpy().astype("<f4")
    return {"shape": list(data.shape), "float32_base64": base64.b64encode(data.tobytes()).decode()}


def summarize(logits: torch.Tensor, probe_ids: torch.Tensor) -> dict:
    """logits [batch, length, vocab] -> probe logits, per-position max/argmax, top-k at the last position."""
    top = logits[:, -1].topk(TOP_K, dim=-1)
    return {"probe_logits": floats(logits[..., probe_ids]), "max": floats(logits.max(-1).values),
            "argmax": logits.argmax(-1).tolist(),
            "last_top_ids": top.indices.tolist(), "last_top_values": floats(top.values)}


def build_original(original: Path, work: Path, random_weights):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for name in ORIGINAL_FILES:
        shutil.copy(original / name, work / name)
    config = dict(random_weights.TINY_CONFIG)
    config["auto_map"] = {"AutoConfig": "configuration_qwen.QWenConfig",
                          "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    (work / "config.json").write_text(json.dumps(config, indent=1))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work, trust_remote_code=True),
                                             trust_remote_code=True)
    random_weights.fill_(model)
    return model.float().eval(), AutoTokenizer.from_pretrained(work, trust_remote_code=True)


def prompt_ids(tokenizer, elements) -> list[int]:
    from qwen_generation_utils import make_context

    query = tokenizer.from_list_format(elements)
    return make_context(tokenizer, query, history=[], system="You are a helpful assistant.",
                        max_window_size=6144, chat_format="chatml")[1]


def run_case(model, input_ids, attention_mask, probe_ids) -> dict:
    from transformers import GenerationConfig

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        generation = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                      pad_token_id=PAD_ID)
        output = model.generate(input_ids, attention_mask=attention_mask, generation_config=generation)
    return {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
            **summarize(logits, probe_ids), "greedy": output[:, input_ids.shape[1]:].tolist()}, logits


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def seed_lora(model, random_weights) -> dict:
    """Give every LoRA matrix seeded values keyed by its name as peft 0.6.2 saves it (B non-zero)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = get_peft_model_state_dict(model)
    values = {key: random_weights.random_tensor(key, tuple(t.shape), LORA_SEED) for key, t in saved.items()}
    set_peft_model_state_dict(model, values)
    return values


def check_saved_adapter(path: Path, values: dict) -> None:
    """The test rebuilds the adapter files from names + seed: make sure that is what peft 0.6.2 wrote."""
    from safetensors.torch import load_file

    loaded = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert sorted(loaded) == sorted(values), "saved adapter keys differ from the seeded ones"
    assert all(torch.equal(loaded[k], values[k]) for k in values), "saved adapter values differ"


def record(original: Path) -> dict:
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    random_weights = load_random_weights()
    probe_ids = torch.randperm(random_weights.TINY_CONFIG["vocab_size"],
                               generator=torch.Generator().manual_seed(PROBE_IDS_SEED))[:PROBE_COUNT].sort().values
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_images(work)
        sys.path.insert(0, str(work))
        model, tokenizer = build_original(original, work, random_weights)
        os.chdir(work)  # the original re-reads images by the (relative) path written in the prompt
        ids = {name: prompt_ids(tokenizer, elements) for name, elements in PROMPTS.items()}
        cases, full_logits = {}, {}
        seq_length = random_weights.TINY_CONFIG["seq_length"]
        assert seq_length - NEW_TOKENS < len(ids["long_text"]) < seq_length, "long_text must cross seq_length"
        for name in PROMPTS:
            row = torch.tensor([ids[name]])
            cases[name], full_logits[name] = run_case(model, row, torch.ones_like(row), probe_ids)

        batch_ids, batch_mask = left_pad([ids[name] for name in BATCH])
        cases["batch"], batch_logits = run_case(model, batch_ids, batch_mask, probe_ids)
        deviation = max((batch_logits[i, batch_mask[i].bool()] - full_logits[name][0]).abs().max().item()
                        for i, name in enumerate(BATCH))

        peft_model = get_peft_model(model, LoraConfig(**LORA_CONFIG)).eval()
        values = seed_lora(peft_model, random_weights)
        peft_model.save_pretrained(work / "adapter_safetensors", safe_serialization=True)
        peft_model.save_pretrained(work / "adapter_bin", safe_serialization=False)
        check_saved_adapter(work / "adapter_safetensors" / "adapter_model.safetensors", values)
        check_saved_adapter(work / "adapter_bin" / "adapter_model.bin", values)
        adapter_config = json.loads((work / "adapter_bin" / "adapter_config.json").read_text())
        # Both name the temporary folder; write what a hub-loaded base would give.
        adapter_config["base_model_name_or_path"] = "Qwen/Qwen-VL-Chat"
        adapter_config["auto_mapping"]["parent_library"] = "transformers_modules.Qwen-VL-Chat.modeling_qwen"
        row = torch.tensor([ids[LORA_PROMPT]])
        lora_case, _ = run_case(peft_model, row, torch.ones_like(row), probe_ids)
        sys.path.remove(str(work))

    return {
        "about": "Recorded by tests/reference/record_qwen_vl_model.py from the original Qwen-VL-Chat remote code "
                 f"(transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}) "
                 "on clot/models/qwen_vl/random_weights.py TINY_CONFIG filled with fill_(seed). Prompts are "
                 "make_context chat prompts; between <img> and </img> the ids hold the image file name's bytes "
                 "and <imgpad> up to 256 positions, all replaced by the image features. Arrays are float32 "
                 "base64. probe_logits: logits of probe_ids at every position.",
        "batch_note": "The original ignores position_ids: positions count the left padding and the dynamic-NTK "
                      "factor comes from the padded length. Rotary attention is translation invariant, so a "
                      "left-padded batch is exact only while every row stays under seq_length (no NTK, no "
                      "logn), which is why the batch holds two text prompts. Max |batch - single| over real "
                      f"positions in the original: {deviation:.3g}.",
        "seed": random_weights.SEED,
        "probe_ids": probe_ids.tolist(),
        "prompts": PROMPTS,
        "batch_rows": BATCH,
        "images": ["image1.png", "image2.png"],
        "cases": cases,
        "lora": {"prompt": LORA_PROMPT, "seed": LORA_SEED, "adapter_config": adapter_config,
                 "keys": {key: list(t.shape) for key, t in sorted(values.items())}, "case": lora_case},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path, help="folder with the original remote-code files")
    parser.add_argument("--check", action="store_true", help="record twice and fail unless identical")
    args = parser.parse_args()
    original = args.original.resolve()
    text = json.dumps(record(original), ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    if args.check and json.dumps(record(original), ensure_ascii=False, indent=1, sort_keys=True) + "\n" != text:
        sys.exit("two recordings differ: the fixture is not deterministic")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    write_images(FIXTURES)
    temporary = FIXTURES / "model.json.tmp"
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(FIXTURES / "model.json")
    print(f"wrote {FIXTURES / 'model.json'} ({len(text) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
