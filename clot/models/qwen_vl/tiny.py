"""A tiny Qwen-VL-Chat checkpoint folder laid out like the hub's, for tests and offline demos.

    python -m clot.models.qwen_vl.tiny /tmp/clot-tiny-qwen-vl    # build (or reuse) and print the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from clot.models.qwen_vl.random_weights import SEED, TINY_CONFIG, fill_, random_state_dict

# The hub checkpoint's own generation_config.json.
GENERATION_CONFIG = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                     "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0,
                     "top_p": 0.5}

DEFAULT_DIR = Path(os.environ.get("CLOT_TINY_QWEN_VL_DIR", Path(tempfile.gettempdir()) / "clot-tiny-qwen-vl"))
STAMP = "clot_tiny.json"

# As on the hub: the remote code it names is never run (clot registers the native classes).
AUTO_MAP = {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}


def build_tiny_checkpoint(folder, seed: int = SEED) -> Path:
    """Write config.json (with the hub's auto_map), generation_config.json and model.safetensors of
    the seeded tiny model into `folder`; tokenizer files are not written. Returns the folder."""
    from clot.models.qwen_vl.configuration_qwen_vl import QwenVLConfig
    from clot.models.qwen_vl.modeling_qwen_vl import QwenVLForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = fill_(QwenVLForCausalLM(QwenVLConfig(**TINY_CONFIG)), seed)
    # Everything is written in a scratch folder first and moved in file by file, so a reader never
    # sees a half-written file.
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scratch = Path(scratch)
        model.save_pretrained(scratch)
        (scratch / "config.json").write_text(json.dumps({**TINY_CONFIG, "auto_map": AUTO_MAP}, indent=2) + "\n")
        (scratch / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        for name in ("model.safetensors", "config.json", "generation_config.json"):
            os.replace(scratch / name, folder / name)
    return folder


def build(target: str | os.PathLike = DEFAULT_DIR, force: bool = False, seed: int = SEED) -> Path:
    """The complete tiny checkpoint (weights, config, generation config, tokenizer and processor files)
    in `target`, written atomically unless an identical build is already there. Returns the folder."""
    from clot.models.qwen_vl.processing_qwen_vl import save_processor_files
    from clot.models.qwen_vl.tokenization_qwen_vl import bundled_vocab_file

    target = Path(target)
    recipe = hashlib.sha256(json.dumps([TINY_CONFIG, GENERATION_CONFIG, AUTO_MAP, seed, "v1"], sort_keys=True)
                            .encode()).hexdigest()[:16]
    stamp = target / STAMP
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-qwen-vl-", dir=target.parent))
    try:
        build_tiny_checkpoint(staging, seed)
        save_processor_files(staging, bundled_vocab_file())
        (staging / STAMP).write_text(json.dumps({"name": "clot-tiny-qwen-vl", "recipe": recipe}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


OFFICIAL_LORA_SEED = 4321  # the seed of the LoRA in the parity fixture (tests/fixtures/qwen_vl/model.json)
# The configuration of the authors' zhongshsh/CLoT-cn, as peft writes it.
OFFICIAL_LORA_CONFIG = {"peft_type": "LORA", "base_model_name_or_path": "Qwen/Qwen-VL-Chat", "r": 64, "lora_alpha": 16,
                        "lora_dropout": 0.05, "target_modules": ["c_attn", "attn.c_proj"], "bias": "none",
                        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                        "modules_to_save": None, "task_type": None}


def build_official_lora(folder: str | os.PathLike, seed: int = OFFICIAL_LORA_SEED, safetensors: bool = True) -> Path:
    """A seeded random LoRA for the tiny model in the official CLoT-cn format (its configuration and peft's
    key names), as adapter_model.safetensors or adapter_model.bin: the stand-in for zhongshsh/CLoT-cn in
    offline runs. Its weights are those of the parity fixture's LoRA. Written atomically; returns the folder."""
    import torch
    from safetensors.torch import save_file

    hidden, rank = TINY_CONFIG["hidden_size"], OFFICIAL_LORA_CONFIG["r"]
    shapes = {}
    for layer in range(TINY_CONFIG["num_hidden_layers"]):
        for module, width in (("c_attn", 3 * hidden), ("c_proj", hidden)):
            key = f"base_model.model.transformer.h.{layer}.attn.{module}"
            shapes[f"{key}.lora_A.weight"] = (rank, hidden)
            shapes[f"{key}.lora_B.weight"] = (width, rank)
    weights = random_state_dict(shapes, seed)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".official-lora-", dir=folder.parent))
    try:
        (staging / "adapter_config.json").write_text(json.dumps(OFFICIAL_LORA_CONFIG, indent=2) + "\n")
        if safetensors:
            save_file(weights, staging / "adapter_model.safetensors")
        else:
            torch.save(weights, staging / "adapter_model.bin")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default=str(DEFAULT_DIR), help="folder to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = parser.parse_args()
    print(build(args.target, force=args.force))


if __name__ == "__main__":
    main()
