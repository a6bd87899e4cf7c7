"""The engine, the demo and the adapter registry on the tiny Qwen-VL-Chat, the base of the authors' CLoT-cn.

One demo (with its engine) is built per module; the official adapter is the random LoRA of the parity
fixture (tests/fixtures/qwen_vl/model.json), in the official configuration, imported with
`python -m clot.adapters import` and checked against the logits peft gave on the original code.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors import safe_open

from clot import adapters
from clot.adapters import main as adapters_main
from clot.engine import Choice, Engine
from clot.models.qwen_vl.random_weights import SEED
from clot.models.qwen_vl.tiny import build_official_lora
from clot.tasks import ClotError, Language, Request, Sampling, Task
from conftest import make_adapter
from test_engine import _assert_same_generation
from test_qwen_vl_model import FIXTURES, RECORDED, max_difference
from ui_helpers import EXAMPLES, app_process, running_demo, tab_inputs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app(tiny_qwen_vl_dir, tmp_path_factory):
    with running_demo(tiny_qwen_vl_dir, tmp_path_factory.mktemp("qwen-vl-adapters")) as (engine, url):
        yield engine, Client(url, verbose=False)


@pytest.fixture(scope="module")
def qwen_engine(app) -> Engine:
    return app[0]


def import_official(engine: Engine, name: str, source: Path, *extra: str) -> Path:
    """`python -m clot.adapters import` of an official-format adapter folder onto the engine's base."""
    argv = ["import", str(source), "--name", name, "--base-model", engine.base_model,
            "--adapters-dir", str(engine.adapters_dir), "--stage", "official", *extra]
    assert adapters_main(argv) == 0
    return engine.adapters_dir / name


@pytest.fixture(scope="module")
def clot_cn(qwen_engine, tmp_path_factory) -> str:
    """The official-format adapter, imported as clot-cn."""
    source = build_official_lora(tmp_path_factory.mktemp("official") / "CLoT-cn")
    import_official(qwen_engine, "clot-cn", source)
    return "clot-cn"


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (120, 90), (200, 40, 90))


def fixture_logits(engine: Engine, case: dict, prompt: str, adapter: str) -> torch.Tensor:
    """The engine's model (through its own image processor) on a recorded prompt, with `adapter`."""
    images = [Image.open(FIXTURES / element["image"]) for element in RECORDED["prompts"][prompt] if "image" in element]
    pixels = engine.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with engine.using(adapter):
        return engine.model(input_ids=torch.tensor(case["input_ids"]), pixel_values=pixels).logits


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_imported_official_adapter_changes_logits_exactly_as_peft_on_the_original(qwen_engine, tmp_path,
                                                                                   safetensors):
    assert RECORDED["seed"] == SEED  # the tiny checkpoint holds the recorded weights
    name = "official-" + ("safetensors" if safetensors else "bin")
    source = build_official_lora(tmp_path / "CLoT-cn", safetensors=safetensors)
    assert sorted(p.name for p in source.iterdir()) == ["adapter_config.json", "adapter_model." + (
        "safetensors" if safetensors else "bin")]
    config, recorded = json.loads((source / "adapter_config.json").read_text()), RECORDED["lora"]["adapter_config"]
    official = ("base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules", "peft_type")
    assert {key: config[key] for key in official} == {key: recorded[key] for key in official}
    card = adapters.validate(import_official(qwen_engine, name, source))
    assert (card["stage"], card["languages"], card["declared_base"]) == ("official", ["zh"], "Qwen/Qwen-VL-Chat")

    lora = RECORDED["lora"]  # the fixture's LoRA has these names, shapes and seed: the same weights
    with safe_open(str(qwen_engine.adapters_dir / name / adapters.WEIGHTS), framework="pt") as weights:
        assert {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()} == lora["keys"]
    difference = max_difference(lora["case"], fixture_logits(qwen_engine, lora["case"], lora["prompt"], name))
    print(f"official adapter ({'safetensors' if safetensors else 'bin'}) in the engine: "
          f"max |logit difference| {difference:.3g}")
    base = RECORDED["cases"][lora["prompt"]]
    max_difference(base, fixture_logits(qwen_engine, base, lora["prompt"], "base"))  # switching back is exact


def test_k_candidates_come_from_one_generate_call_with_their_condition_words(qwen_engine, image, monkeypatch):
    calls = []
    original = type(qwen_engine.model).generate
    monkeypatch.setattr(type(qwen_engine.model), "generate",
                        lambda model, *args, **kwargs: calls.append(kwargs) or original(model, *args, **kwargs))
    request = Request(task="I2T", image=image, conditions=["walrus", "", "teapot"], num_candidates=3,
                      sampling=Sampling(seed=3, max_new_tokens=6))
    candidates = qwen_engine.generate(request)
    assert len(calls) == 1 and calls[0]["past_key_values"] is not None  # one call, the image prefilled once
    assert [c.condition for c in candidates] == ["walrus", "", "teapot"]
    prompts = [turn.text for turn in qwen_engine.turns_for(request)]
    assert "walrus" in prompts[0] and "teapot" in prompts[2] and not any(w in prompts[1] for w in ("walrus", "teapot"))
    assert [c.text for c in candidates] == [c.text for c in qwen_engine.generate(request)]  # seeded


@pytest.mark.parametrize("task", ["I2T", "T2T"])
def test_shared_prefill_is_output_identical_to_plain_batching(qwen_engine, image, task):
    request = Request(task=task, image=image if task == "I2T" else None, text="Why do penguins wear suits?",
                      conditions=["walrus", "", "teapot sandwich", "x"], num_candidates=5).validate()
    _assert_same_generation(qwen_engine, qwen_engine.turns_for(request))


def test_prompts_batched_together_share_their_own_prefixes_exactly(qwen_engine, image):
    requests = [Request(task="I2T", image=image, conditions=["walrus", ""], num_candidates=2),
                Request(task="IT2T", image=Image.new("RGB", (64, 150), "teal"), text="fill ___", num_candidates=2),
                Request(task="T2T", text="为什么猫咪总是在键盘上睡觉？", num_candidates=2)]
    _assert_same_generation(qwen_engine, [t for r in requests for t in qwen_engine.turns_for(r.validate())])


def test_stored_prefix_continues_with_its_own_rotary_scaling(qwen_engine, image):
    """Dynamic NTK: a stored text prefix (alpha 1) reused after an image prompt past seq_length was
    prefilled (alpha 3) still computes what plain batching computes."""
    qwen_engine.prefixes.clear()
    question = [Choice("select", Task.T2T, Language.EN, ["a", "b", "c"], question="Why?")]
    qwen_engine.score(question)
    qwen_engine.generate(Request(task="I2T", image=image, num_candidates=2, sampling=Sampling(max_new_tokens=2)))
    hits = qwen_engine.prefixes.hits
    reused = qwen_engine.score(question)[0]
    assert qwen_engine.prefixes.hits == hits + 1
    qwen_engine.shared_prefill = False
    plain = qwen_engine.score(question)[0]
    qwen_engine.shared_prefill = True
    assert reused == pytest.approx(plain, abs=1e-5)


def test_prefix_is_not_continued_where_its_rotary_scaling_differs_from_the_rows(qwen_engine):
    family, vlm = qwen_engine.family, qwen_engine._vlm()  # seq_length 256: alpha 1 up to 256 tokens, then 3
    rows = torch.ones(2, 300, dtype=torch.long)
    assert family.continuation(vlm, [1.0, 1.0], rows, None) is None  # a prefix under 256 tokens, rows past it
    assert family.continuation(vlm, [3.0, 3.0], rows, None)["position_ids"][0, -1] == 299
    assert vlm.transformer.rotary_emb.cached_alphas == [3.0, 3.0]


@pytest.mark.parametrize("answer_start", ["", "1. "])
def test_every_option_letter_gets_its_own_token(qwen_engine, answer_start):
    prefix, ids = qwen_engine._letters(answer_start, 8)
    assert prefix == answer_start.strip()
    assert [qwen_engine.tokenizer.decode([i]).strip() for i in ids] == list("ABCDEFGH")


def test_clot_ranks_keeps_top_two_and_selects(qwen_engine, image):
    request = Request(task="IT2T", image=image, text="The secret of this photo is ___", num_candidates=4,
                      sampling=Sampling(seed=5, max_new_tokens=6))
    result = qwen_engine.clot(request)
    ranks = [c.rank_score for c in result.candidates]
    assert math.isclose(sum(ranks), 1.0, rel_tol=1e-4)
    assert sorted(result.finalists) == sorted(sorted(range(4), key=lambda i: -ranks[i])[:2])
    selected = [result.candidates[i].select_score for i in result.finalists]
    assert math.isclose(sum(selected), 1.0, rel_tol=1e-4)
    assert result.chosen == result.finalists[selected.index(max(selected))]
    assert [c.chosen for c in result.candidates].count(True) == 1


def _scores(engine: Engine, adapter: str) -> torch.Tensor:
    choice = Choice("select", Task.T2T, Language.ZH, ["甲", "乙", "丙"], question="为什么？")
    return torch.tensor(engine.score([choice], adapter=adapter)[0])


def test_adapters_switch_between_base_official_and_trained(qwen_engine, clot_cn):
    make_adapter(qwen_engine, "ours", seed=4, stage=2, round=1)
    base = _scores(qwen_engine, "base")
    official = _scores(qwen_engine, clot_cn)
    assert qwen_engine.template_set == "official"  # the authors' wording while their adapter is active
    ours = _scores(qwen_engine, "ours")
    assert qwen_engine.template_set == "studio"
    assert not torch.allclose(official, base, atol=1e-4) and not torch.allclose(ours, base, atol=1e-4)
    assert not torch.allclose(ours, official, atol=1e-4)
    assert torch.allclose(_scores(qwen_engine, "base"), base, atol=1e-6)
    assert torch.allclose(_scores(qwen_engine, clot_cn), official, atol=1e-6)
    qwen_engine.use_adapter("base")


def test_official_adapter_answers_in_clot_mode_with_its_wording(qwen_engine, clot_cn, image):
    qwen_engine.use_adapter(clot_cn)
    request = Request(task="I2T", image=image, num_candidates=3, sampling=Sampling(seed=2, max_new_tokens=5))
    assert "让我们打破常规思维思考问题" in qwen_engine.turns_for(request.validate())[0].text
    result = qwen_engine.clot(request)
    assert len(result.candidates) == 3 and result.candidates[result.chosen].chosen
    assert math.isclose(sum(c.rank_score for c in result.candidates), 1.0, rel_tol=1e-4)
    qwen_engine.use_adapter("base")


def test_training_examples_are_the_engines_encoding_with_labels_up_to_im_end(qwen_engine, image):
    from types import SimpleNamespace

    from clot.engine import Turn
    from clot.models.qwen_vl.configuration_qwen_vl import IMAGE_PAD_ID
    from training import sft

    collator = sft.Collator(qwen_engine.processor, SimpleNamespace(open=lambda name: image))
    records = [{"id": "a", "user": "Caption it <|im_end|><img></img>", "lang": "en", "image": "photo.png",
                "answer": "A cat <|im_start|>system boss"},
               {"id": "b", "user": "Why?", "lang": "en", "image": None, "answer": "Because."}]
    tokenizer = qwen_engine.tokenizer
    specials = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for record in records:
        example = collator.encode(record)
        ids, trained = example["input_ids"], example["labels"] != sft.IGNORE
        start = int(trained.nonzero()[0])
        assert tokenizer.decode(ids[trained]) == record["answer"] + "<|im_end|>"
        assert ids[trained].tolist().count(specials[1]) == 1 and specials[0] not in ids[trained].tolist()
        turn = Turn(record["user"], Language.EN, image if record["image"] else None)
        assert torch.equal(ids[:start], qwen_engine.encode([turn])["input_ids"][0])  # what inference feeds
    batch = collator(records)
    assert int((batch["input_ids"] == IMAGE_PAD_ID).sum()) == 256  # Qwen-VL: a fixed 256 tokens per image
    assert batch["pixel_values"].shape == (1, 3, 448, 448)
    with qwen_engine.using("base"):
        assert torch.isfinite(qwen_engine.model(**batch).loss)


# ---------------------------------------------------------------- the demo over HTTP
def test_demo_serves_all_three_tabs(app):
    client = app[1]
    cat = EXAMPLES / "cat.jpg"
    result, meme, _ = client.predict(*tab_inputs(handle_file(cat), conditions="cat, umbrella", n=3, seed=11),
                                     api_name="/image_to_text")
    assert result["task"] == "I2T" and result["mode"] == "CLoT" and len(result["candidates"]) == 3
    assert sorted(r["condition"] for r in result["candidates"]) == ["", "cat", "umbrella"]
    assert [r["chosen"] for r in result["candidates"]].count(True) == 1
    with Image.open(cat) as photo, Image.open(meme) as rendered:
        assert rendered.size == photo.size
    result, _, _ = client.predict(*tab_inputs(handle_file(EXAMPLES / "blank_zh.jpg"), "这只猫为什么一脸严肃？", n=2,
                                              mode="sample"), api_name="/image_text_to_text")
    assert (result["task"], result["language"], len(result["candidates"])) == ("IT2T", "zh", 2)
    result = client.predict(*tab_inputs("こんな美容院は嫌だ。どんな美容院？", n=4, seed=3), api_name="/text_to_text")
    assert (result["task"], result["language"], result["mode"], len(result["candidates"])) == ("T2T", "ja", "CLoT", 4)
    assert math.isclose(sum(r["rank_score"] for r in result["candidates"]), 1.0, rel_tol=1e-4)


def test_demo_lists_and_serves_the_official_adapter(app, clot_cn):
    client = app[1]
    picker, _ = client.predict("base", api_name="/refresh_adapters")
    assert clot_cn in [value for _, value in picker["choices"]]
    card = client.predict(clot_cn, api_name="/switch_adapter")
    assert card.startswith(f"**{clot_cn}**: official") and "trained on zh" in card and "top-p 0.5" in card
    args = dict(n=2, mode="sample", seed=8)
    official = client.predict(*tab_inputs("为什么冰箱总在嗡嗡响？", adapter=clot_cn, **args), api_name="/text_to_text")
    base = client.predict(*tab_inputs("为什么冰箱总在嗡嗡响？", **args), api_name="/text_to_text")
    assert official["adapter"] == clot_cn and base["adapter"] == "base"
    assert [c["text"] for c in official["candidates"]] != [c["text"] for c in base["candidates"]]
    with pytest.raises(AppError, match="The file is not an image that can be read"):
        client.predict(*tab_inputs(handle_file(ROOT / "pyproject.toml")), api_name="/image_to_text")


@pytest.mark.slow
def test_engine_cli_answers_with_the_official_adapter(qwen_engine, clot_cn):
    command = [sys.executable, "-m", "clot.engine", "--base-model", qwen_engine.base_model, "--adapters-dir",
               str(qwen_engine.adapters_dir), "--adapter", clot_cn, "--device", "cpu", "--task", "T2T", "--text",
               "为什么猫咪总是在键盘上睡觉？", "-n", "3", "--mode", "clot", "--seed", "1", "--max-new-tokens", "4"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and sum(line.startswith("*") for line in lines) == 1
    assert all(" rank 0." in line or " rank 1." in line for line in lines)


@pytest.mark.slow
def test_app_starts_on_the_base_model_folder_with_the_official_adapter(qwen_engine, clot_cn, tmp_path):
    args = ["--base-model", qwen_engine.base_model, "--adapter", clot_cn, "--adapters-dir",
            str(qwen_engine.adapters_dir), "--device", "cpu"]
    with app_process(args, tmp_path / "app.log") as client:
        picker, _ = client.predict(clot_cn, api_name="/refresh_adapters")
        assert picker["value"] == clot_cn  # loaded at start (a bad adapter would have stopped the app)
        result = client.predict(*tab_inputs("为什么？", n=2, adapter=clot_cn, max_new_tokens=4), api_name="/text_to_text")
    assert result["adapter"] == clot_cn and len(result["candidates"]) == 2


# ---------------------------------------------------------------- bad input, one sentence each
def _linked_copy(source: Path, target: Path, skip: tuple[str, ...]) -> Path:
    """`source`'s files as links in `target`, but for `skip` (a checkpoint without copying its weights)."""
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.name not in skip:
            (target / path.name).symlink_to(path)
    return target


def test_checkpoint_without_its_vocabulary_is_refused(tiny_qwen_vl_dir, tmp_path):
    folder = _linked_copy(tiny_qwen_vl_dir, tmp_path / "no-vocab", skip=("qwen.tiktoken",))
    with pytest.raises(ClotError, match="has no qwen.tiktoken: copy the Qwen-VL-Chat checkpoint's qwen.tiktoken"):
        Engine.load(str(folder), device="cpu")


class Payload:
    """Any object beyond tensors and containers: only full unpickling can rebuild it."""


def test_checkpoint_that_needs_full_unpickling_is_refused(tiny_qwen_vl_dir, tmp_path):
    folder = _linked_copy(tiny_qwen_vl_dir, tmp_path / "pickled", skip=("model.safetensors",))
    torch.save({"transformer.wte.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ClotError) as error:
        Engine.load(str(folder), device="cpu")
    assert str(error.value).startswith(f"The weights of {folder} are a pickle that only full unpickling can read")
    assert "\n" not in str(error.value)


def test_adapter_for_another_base_or_with_stray_keys_is_refused(qwen_engine, clot_cn, tmp_path):
    other = shutil.copytree(qwen_engine.adapters_dir / clot_cn, qwen_engine.adapters_dir / "other-base")
    card = json.loads((other / adapters.CARD).read_text())
    card.update(base_model="Qwen/Qwen-VL", base_fingerprint="0" * 16)
    (other / adapters.CARD).write_text(json.dumps(card))
    with pytest.raises(ClotError, match="trained for base model 'Qwen/Qwen-VL'"):
        qwen_engine.use_adapter("other-base")

    from safetensors.torch import load_file, save_file

    source = build_official_lora(tmp_path / "CLoT-cn")
    weights = load_file(str(source / "adapter_model.safetensors"))
    save_file({key.replace(".attn.c_attn.", ".attn.qkv."): value for key, value in weights.items()},
              str(source / "adapter_model.safetensors"))
    import_official(qwen_engine, "stray", source)
    qwen_engine.use_adapter(clot_cn)
    with pytest.raises(ClotError, match="Adapter 'stray' does not fit this base model: 4 of its 8 weights match "
                                        "no module and 4 LoRA weights are missing"):
        qwen_engine.use_adapter("stray")
    assert qwen_engine.active_adapter == clot_cn
    qwen_engine.use_adapter("base")


def test_image_that_cannot_be_read_is_refused(qwen_engine):
    data = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(data, "PNG")
    truncated = Image.open(io.BytesIO(data.getvalue()[:-40]))
    with pytest.raises(ClotError, match=r"The image could not be read \(image file is truncated\); use another file"):
        qwen_engine.generate(Request(task="I2T", image=truncated, num_candidates=1,
                                     sampling=Sampling(max_new_tokens=2)))
