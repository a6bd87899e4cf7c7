"""Shared fixtures: the tiny offline model, an engine on it, and LoRA adapters made for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARTIFACTS = Path(os.environ.get("CLOT_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))


@pytest.fixture(scope="session", autouse=True)
def votes_db(tmp_path_factory) -> Path:
    """Demos built by tests keep their votes in a temporary store, never in the working tree."""
    path = tmp_path_factory.mktemp("votes") / "votes.sqlite"
    os.environ["CLOT_VOTES_DB"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from clot import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_qwen_vl_dir(tmp_path_factory) -> Path:
    """A complete tiny Qwen-VL-Chat checkpoint folder (the paper's base family), hub-style; named like the
    hub repo, so adapters declaring Qwen/Qwen-VL-Chat as their base import onto it."""
    from clot.models.qwen_vl import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-qwen-vl") / "Qwen-VL-Chat")


@pytest.fixture(scope="session")
def engine(tiny_dir, tmp_path_factory):
    from clot.engine import Engine

    return Engine.load(str(tiny_dir), adapters_dir=tmp_path_factory.mktemp("adapters"), device="cpu")


def make_adapter(engine, name: str, seed: int = 0, stage: int = 1, round: int = 0, scale: float = 0.5,
                 folder: Path | None = None) -> Path:
    """Publish a random LoRA adapter for the engine's base model (B != 0 so it changes the output)."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from clot import adapters

    base = AutoModelForImageTextToText.from_pretrained(engine.base_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=engine.family.lora_targets)
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        card = adapters.make_card(base_model=engine.base_model, fingerprint=engine.fingerprint, stage=stage,
                                  round=round)
        return adapters.publish(tmp, folder or engine.adapters_dir, name, card)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
