"""The native Qwen-VL-Chat model against fixtures recorded from the original remote code.

tests/fixtures/qwen_vl/model.json was written by tests/reference/record_qwen_vl_model.py from the
original code (transformers 4.32) on the seeded tiny weights of random_weights.py; here the same
weights go into our classes and every logit, greedy token and LoRA output must agree.
Importing clot (any clot module) registers the classes with transformers' Auto classes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clot.models.qwen_vl.configuration_qwen_vl import QwenVLConfig
from clot.models.qwen_vl.modeling_qwen_vl import QwenVLForCausalLM
from clot.models.qwen_vl.random_weights import TINY_CONFIG, fill_, random_tensor
from clot.tasks import ClotError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "qwen_vl"
RECORDED = json.loads((FIXTURES / "model.json").read_text(encoding="utf-8"))
CASES = RECORDED["cases"]
PAD_ID = 151643
CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)


def array(recorded: dict) -> torch.Tensor:
    data = np.frombuffer(base64.b64decode(recorded["float32_base64"]), dtype="<f4")
    return torch.from_numpy(data.copy()).reshape(recorded["shape"])


def pixel_values(prompt_name: str) -> torch.Tensor | None:
    """The prompt's images preprocessed as the original does: PIL bicubic 448x448, /255, CLIP mean/std."""
    names = [element["image"] for element in RECORDED["prompts"].get(prompt_name, [])
             if "image" in element]
    if not names:
        return None
    images = []
    for name in names:
        image = Image.open(FIXTURES / name).convert("RGB").resize((448, 448), Image.BICUBIC)
        pixels = (np.asarray(image, dtype=np.float32) / 255 - CLIP_MEAN) / CLIP_STD
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
    return torch.stack(images)


def max_difference(recorded: dict, logits: torch.Tensor, real: torch.Tensor | None = None) -> float:
    """Largest gap to the recorded logits, checked against 1e-4 x max(1, max|logit|); `real` selects
    the positions to compare (not left padding), logits and recorded arrays sharing one layout."""
    if real is None:
        real = torch.ones(logits.shape[:2], dtype=torch.bool)
    got = logits[real]
    expected_probe, expected_max = array(recorded["probe_logits"])[real], array(recorded["max"])[real]
    expected_argmax = torch.tensor(recorded["argmax"])[real]
    tolerance = 1e-4 * max(1.0, expected_max.abs().max().item(), got.abs().max().item())
    ours_max = got.max(-1).values
    worst = max((got[:, RECORDED["probe_ids"]] - expected_probe).abs().max().item(),
                (ours_max - expected_max).abs().max().item(),
                # the recorded argmax is (within tolerance) our maximum too: robust to near ties
                (ours_max - got.gather(-1, expected_argmax[:, None])[:, 0]).max().item())
    assert worst <= tolerance, f"logits differ from the original by {worst:.3g} (tolerance {tolerance:.3g})"
    return worst


@pytest.fixture(scope="module")
def model() -> QwenVLForCausalLM:
    return fill_(QwenVLForCausalLM(QwenVLConfig(**TINY_CONFIG)), RECORDED["seed"]).eval()


def forward(model, name: str) -> torch.Tensor:
    case = CASES[name]
    with torch.no_grad():
        return model(input_ids=torch.tensor(case["input_ids"]), attention_mask=torch.tensor(case["attention_mask"]),
                     pixel_values=pixel_values(name)).logits


def greedy(model, input_ids, attention_mask, pixels) -> list:
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels,
                                max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    return output[:, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["text", "one_image", "two_images", "short_text", "long_text"])
def test_logits_and_greedy_tokens_match_the_original(model, name):
    case = CASES[name]
    difference = max_difference(case, forward(model, name))
    print(f"{name}: max |logit difference| {difference:.3g}")
    # Generation also proves that pixel_values are dropped after prefill (decode steps have no <img>).
    assert greedy(model, torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"]),
                  pixel_values(name)) == case["greedy"]


def test_left_padded_batch_matches_the_original(model):
    case = CASES["batch"]
    mask = torch.tensor(case["attention_mask"])
    print(f"batch: max |logit difference| {max_difference(case, forward(model, 'batch'), mask.bool()):.3g}")
    assert greedy(model, torch.tensor(case["input_ids"]), mask, None) == case["greedy"]


def test_text_and_image_rows_batched_equal_their_single_rows(model):
    """One row past seq_length (dynamic NTK, logn), one under it: each row keeps its own scaling."""
    text, image = CASES["text"]["input_ids"][0], CASES["one_image"]["input_ids"][0]
    padding = len(image) - len(text)
    ids = torch.tensor([[PAD_ID] * padding + text, image])
    mask = torch.tensor([[0] * padding + [1] * len(text), [1] * len(image)])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values("one_image")).logits
    text_difference = max_difference(CASES["text"], logits[:1, padding:])
    image_difference = max_difference(CASES["one_image"], logits[1:])
    print(f"batched text + image rows: max |logit difference| {max(text_difference, image_difference):.3g}")


def test_shared_prefix_then_rows_continued_with_positions_equals_plain_forward(model):
    """Prefill a prefix (with its image) once, copy its cache to two rows, continue each row."""
    from transformers import DynamicCache

    ids = torch.tensor(CASES["one_image"]["input_ids"])
    prefix_length = ids.shape[1] - 8
    tails = torch.stack([ids[0, prefix_length:], torch.arange(1000, 1008)])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :prefix_length], pixel_values=pixel_values("one_image"), past_key_values=cache)
        cache.batch_repeat_interleave(2)
        positions = torch.arange(prefix_length, ids.shape[1]).expand(2, -1)
        continued = model(input_ids=tails, position_ids=positions, past_key_values=cache).logits
        for row in range(2):
            full = torch.cat([ids[0, :prefix_length], tails[row]])[None]
            plain = model(input_ids=full, pixel_values=pixel_values("one_image")).logits[0, prefix_length:]
            torch.testing.assert_close(continued[row], plain, atol=1e-4, rtol=1e-4)


def test_dynamic_ntk_factor_is_per_row_and_kept_while_decoding():
    from clot.models.qwen_vl.modeling_qwen_vl import QwenVLRotaryEmbedding

    rotary = QwenVLRotaryEmbedding(QwenVLConfig(**TINY_CONFIG))  # seq_length 256
    assert [rotary.alpha_for(n) for n in (1, 256, 257, 512, 513)] == [1, 1, 3, 3, 7]
    assert rotary.choose_alphas([100, 300], prefill=True) == [1, 3]
    assert rotary.choose_alphas([101, 600], prefill=False) == [1, 3]  # the cached keys used these
    rotary.choose_alphas([300], prefill=True)
    assert rotary.choose_alphas([301, 290], prefill=False) == [3, 3]  # one prefix continued by two rows
    rotary.choose_alphas([300, 10], prefill=True)
    assert rotary.choose_alphas([600, 10, 10], prefill=False) == [7, 1, 1]  # a cache assembled elsewhere


def test_image_count_must_match_the_image_runs(model):
    one_image = torch.tensor(CASES["one_image"]["input_ids"])
    with pytest.raises(ClotError, match="1 <img>...</img> runs but 2 images"):
        model(input_ids=one_image, pixel_values=pixel_values("two_images"))
    with pytest.raises(ClotError, match="2 <img>...</img> runs but 1 images"):
        model(input_ids=torch.tensor(CASES["two_images"]["input_ids"]), pixel_values=pixel_values("one_image"))
    with pytest.raises(ClotError, match="exactly 256 tokens"):
        model(input_ids=one_image[:, :100], pixel_values=pixel_values("one_image"))


def write_recorded_adapter(folder: Path, safetensors: bool) -> Path:
    """The adapter exactly as peft 0.6.2 saved it (the recorder checked the files equal names + seed)."""
    from safetensors.torch import save_file

    lora = RECORDED["lora"]
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(lora["adapter_config"]))
    weights = {key: random_tensor(key, tuple(shape), lora["seed"]) for key, shape in lora["keys"].items()}
    if safetensors:
        save_file(weights, folder / "adapter_model.safetensors")
    else:
        torch.save(weights, folder / "adapter_model.bin")
    return folder


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_official_style_lora_matches_the_original(model, tmp_path, safetensors):
    from peft import PeftModel

    lora = RECORDED["lora"]
    assert lora["prompt"] == "one_image"  # the recorded adapter visibly changes that prompt's logits:
    assert not torch.allclose(array(lora["case"]["max"]), array(CASES["one_image"]["max"]), atol=1e-2)
    adapter = write_recorded_adapter(tmp_path / "adapter", safetensors)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapped = PeftModel.from_pretrained(model, adapter)
    try:
        case = lora["case"]
        with torch.no_grad():
            logits = wrapped(input_ids=torch.tensor(case["input_ids"]),
                             pixel_values=pixel_values(lora["prompt"])).logits
        print(f"lora ({'safetensors' if safetensors else 'bin'}): max |logit difference| "
              f"{max_difference(case, logits):.3g}")
    finally:
        wrapped.unload()  # puts the plain modules back into the shared model, and unfreezes it:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])


def test_forward_options_agree(model):
    ids = torch.tensor(CASES["text"]["input_ids"])
    with torch.no_grad():
        full = model(input_ids=ids)
        from_embeddings = model(inputs_embeds=model.get_input_embeddings()(ids))
        last = model(input_ids=ids, logits_to_keep=1)
        with_loss = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(from_embeddings.logits, full.logits)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    expected = torch.nn.functional.cross_entropy(full.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(with_loss.loss, expected)
    assert model.get_output_embeddings() is model.lm_head


def test_gradient_checkpointing_gives_the_same_gradients(model):
    ids = torch.tensor(CASES["text"]["input_ids"])
    parameter = model.transformer.h[0].attn.c_attn.weight
    gradients = []
    model.train()
    try:
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable()
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            gradients.append(parameter.grad.clone())
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from clot.models.qwen_vl.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("qwen_vl") / "tiny")


def test_tiny_checkpoint_is_hub_style(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert config["model_type"] == "qwen"
    assert generation["chat_format"] == "chatml" and generation["max_window_size"] == 6144
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors"]


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModelForImageTextToText"])
def test_auto_classes_load_our_model_without_remote_code(model, tiny_checkpoint, auto_class):
    import transformers

    loaded, info = getattr(transformers, auto_class).from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert type(loaded) is QwenVLForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_original_layout_bin_shards_load(model, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    state = model.state_dict()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        torch.save({name: state[name] for name in names}, folder / shard)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {name: shard for shard, names in shards.items() for name in names}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())
