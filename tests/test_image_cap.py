"""The image cap: a real checkpoint's pixel limits (up to 16,384 visual tokens) lowered to max_image_tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers import AutoProcessor
from transformers.image_utils import SizeDict
from transformers.models.auto import image_processing_auto

from clot import tiny
from clot.engine import DEFAULT_MAX_IMAGE_TOKENS, Turn, cap_image_tokens, load_processor
from clot.tasks import Language

IMAGE_PAD_ID = 151655
PIXELS_PER_TOKEN = 28 * 28  # (patch 14 × merge 2)²


def real_preprocessor_config(max_pixels: int = tiny.MAX_PIXELS) -> dict:
    """preprocessor_config.json as the Qwen2.5-VL checkpoints ship it (pixel limits, no `size`)."""
    return {"min_pixels": 3136, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny.build_tokenizer().save_pretrained(folder)
    return folder


def checkpoint(tokenizer_only: Path, folder: Path, **limits) -> Path:
    """A processor folder laid out like a real checkpoint: its tokenizer and preprocessor_config.json."""
    shutil.copytree(tokenizer_only, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(real_preprocessor_config(**limits)))
    return folder


@pytest.fixture(params=["torchvision", "pil"])
def backend(request, monkeypatch) -> str:
    """Which image-processor backend AutoProcessor picks (PIL is what it falls back to without torchvision)."""
    if request.param == "pil":
        monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: False)
    return request.param


def photo(width: int = 2000, height: int = 1500) -> Image.Image:
    return Image.new("RGB", (width, height), (90, 140, 200))


def image_tokens(processor, image: Image.Image) -> int:
    """The image pad tokens the processor puts in the prompt, checked against the patch grid it made."""
    encoded = processor(text=["<|vision_start|><|image_pad|><|vision_end|>What is funny here?"], images=[image],
                        return_tensors="pt")
    count = int((encoded["input_ids"] == IMAGE_PAD_ID).sum())
    (grid,) = encoded["image_grid_thw"].tolist()
    assert count == grid[0] * grid[1] * grid[2] // 4  # one token per 2×2 merged patches
    return count


def test_a_large_photo_is_capped_with_either_backend_and_stays_capped_after_saving(
        backend, tokenizer_only, tmp_path):
    folder = checkpoint(tokenizer_only, tmp_path / "model")
    assert image_tokens(load_processor(str(folder), max_image_tokens=None), photo()) == 3834  # the real limit

    processor = load_processor(str(folder), max_image_tokens=1024)
    assert type(processor.image_processor).__name__ == {"torchvision": "Qwen2VLImageProcessor",
                                                        "pil": "Qwen2VLImageProcessorPil"}[backend]
    assert dict(processor.image_processor.size) == {"longest_edge": 1024 * PIXELS_PER_TOKEN, "shortest_edge": 3136}
    assert 900 < image_tokens(processor, photo()) <= 1024

    processor.save_pretrained(tmp_path / "saved")  # as a training run saves it beside its adapter
    reloaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert type(reloaded.image_processor) is type(processor.image_processor)
    assert image_tokens(reloaded, photo()) == image_tokens(processor, photo())


def test_the_cap_never_raises_a_processors_own_limits(tokenizer_only, tmp_path):
    folder = checkpoint(tokenizer_only, tmp_path / "model", max_pixels=64 * PIXELS_PER_TOKEN)
    processor = load_processor(str(folder), max_image_tokens=1024)
    assert dict(processor.image_processor.size) == {"longest_edge": 64 * PIXELS_PER_TOKEN, "shortest_edge": 3136}
    assert image_tokens(processor, photo()) <= 64
    # a cap under the processor's minimum lowers the minimum too, so the two limits stay consistent
    tight = load_processor(str(folder), max_image_tokens=2)
    assert dict(tight.image_processor.size) == {"longest_edge": 2 * PIXELS_PER_TOKEN,
                                                "shortest_edge": 2 * PIXELS_PER_TOKEN}
    assert image_tokens(tight, photo()) <= 2


@pytest.mark.parametrize("size", [SizeDict(height=448, width=448), {"height": 448, "width": 448}, 448, None])
def test_processors_without_a_pixel_limit_are_left_alone(size):
    fixed = SimpleNamespace(size=size)  # e.g. Qwen-VL-Chat's fixed 448×448 images
    cap_image_tokens(fixed, 1024)
    assert fixed.size == size
    cap_image_tokens(None, 1024)  # a text-only model has no image processor


def test_the_engine_caps_the_tiny_models_real_limits(engine):
    """The tiny model keeps the real checkpoint's limits, so only the engine's cap bounds its images."""
    encoded = engine.encode([Turn("What is funny here?", Language.EN, photo())])
    assert 900 < int((encoded["input_ids"] == IMAGE_PAD_ID).sum()) <= DEFAULT_MAX_IMAGE_TOKENS
