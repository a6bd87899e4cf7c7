"""A tiny Qwen-VL-Chat checkpoint folder laid out like the hub's, for tests and offline demos."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from clot.models.qwen_vl.random_weights import SEED, TINY_CONFIG, fill_

# The hub checkpoint's own generation_config.json.
GENERATION_CONFIG = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                     "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0,
                     "top_p": 0.5}

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
