"""The model-family seam (clot/families) and the official CLoT-cn template set (clot/prompts.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import BatchFeature, GenerationConfig

from clot import prompts
from clot.engine import Choice, Engine, main
from clot.families import Qwen25VL, QwenVL, family_for, positions_from_mask
from clot.models.qwen_vl.configuration_qwen_vl import QwenVLConfig
from clot.tasks import ClotError, Language, Request, Sampling, Task


class StubTokenizer:
    """Just the token lookups a family asks of a tokenizer."""

    def __init__(self, ids: dict[str, int], eos: int | None):
        self.ids, self.eos_token_id = ids, eos

    def convert_tokens_to_ids(self, token: str):
        return self.ids.get(token)


QWEN_VL_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def test_family_is_picked_by_model_type():
    assert isinstance(family_for(QwenVLConfig()), QwenVL)
    assert isinstance(family_for(SimpleNamespace(model_type="qwen2_5_vl")), Qwen25VL)


def test_unsupported_model_type_is_refused_in_one_sentence_naming_the_supported_ones():
    with pytest.raises(ClotError) as err:
        family_for(SimpleNamespace(model_type="llava"))
    assert str(err.value) == ("Model type 'llava' is not supported; supported model types: "
                              "qwen2_5_vl (Qwen2.5-VL), qwen (Qwen-VL-Chat).")


def test_unsupported_checkpoint_fails_before_weights_load(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # no weights at all: never reached
    with pytest.raises(ClotError, match="Model type 'bert' is not supported"):
        Engine.load(str(tmp_path), device="cpu")
    assert main(["--base-model", str(tmp_path), "--device", "cpu", "--text", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: Model type 'bert' is not supported; supported model types:")


def test_qwen_vl_stops_where_the_original_chat_stops():
    family = family_for(QwenVLConfig())
    tokenizer = StubTokenizer(QWEN_VL_SPECIALS, eos=None)  # eos comes from the checkpoint's generation_config
    assert family.stop_ids(tokenizer, GenerationConfig(eos_token_id=151643)) == [151643, 151644, 151645]


def test_qwen2_5_vl_stops_on_im_end_and_every_configured_eos():
    family = family_for(SimpleNamespace(model_type="qwen2_5_vl"))
    tokenizer = StubTokenizer({"<|im_end|>": 151645}, eos=151645)
    assert family.stop_ids(tokenizer, GenerationConfig(eos_token_id=[151645, 151643])) == [151643, 151645]


def test_qwen_vl_lora_lands_on_language_attention_only():
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=QwenVL.lora_targets)
    targeted = {name: bool(check_target_module_exists(config, name)) for name in (
        "transformer.h.3.attn.c_attn", "transformer.h.3.attn.c_proj", "transformer.h.3.mlp.c_proj",
        "transformer.visual.transformer.resblocks.0.mlp.c_proj", "transformer.visual.attn_pool.attn")}
    assert targeted == {"transformer.h.3.attn.c_attn": True, "transformer.h.3.attn.c_proj": True,
                        "transformer.h.3.mlp.c_proj": False,
                        "transformer.visual.transformer.resblocks.0.mlp.c_proj": False,
                        "transformer.visual.attn_pool.attn": False}


def test_positions_of_a_left_padded_batch_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_positions_continue_after_a_shared_prefix_as_for_the_row_alone():
    # Shared-prefix layout (clot/prefix.py): [left-padded prefix | padding | row's own suffix].
    # Row 0: prefix of 3 tokens, suffix of 2; row 1: prefix of 4, suffix of 1.
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1],
                         [1, 1, 1, 1, 0, 0, 1]])
    positions = positions_from_mask(mask)
    for row in range(2):
        real = positions[row][mask[row].bool()]
        assert real.tolist() == list(range(int(mask[row].sum())))  # what the unpadded row gets alone
    without_ntk = SimpleNamespace(config=SimpleNamespace(use_dynamic_ntk=False))  # rotary scaling: tested elsewhere
    continuing = QwenVL(QwenVLConfig()).continuation(without_ntk, [1.0, 1.0], mask, torch.zeros_like(mask))
    assert torch.equal(continuing["position_ids"], positions)


def test_qwen_vl_encoding_adds_the_positions_of_its_mask():
    class StubProcessor:
        def apply_chat_template(self, conversations, **kwargs):
            assert kwargs["sanitize_control_tokens"] and kwargs["processor_kwargs"]["padding_side"] == "left"
            return BatchFeature({"input_ids": torch.ones(2, 4, dtype=torch.long),
                                 "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])})

    batch = QwenVL(QwenVLConfig()).encode(StubProcessor(), [[], []], continuing=False)
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]


def test_qwen_vl_image_tokens_and_vision_rows():
    family = QwenVL(QwenVLConfig())
    ids = torch.tensor([[151644, 151857, 151859, 151859, 151858, 42]])
    assert family.image_token_mask({"input_ids": ids}).tolist() == [[0, 1, 1, 1, 1, 0]]
    pixels = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 3, 448, 448)
    picked = family.vision_inputs({"pixel_values": pixels}, [2, 0])["pixel_values"]
    assert picked[:, 0, 0, 0].tolist() == [2.0, 0.0]


# ---------------------------------------------------------------- the official wording
# The authors' gradio_demo.py, verbatim: its strings and how it joins them (the image path becomes
# the image; our processor takes the picture separately and keeps <img></img> empty).
AUTHORS_BASE = """
你是一个搞笑专家，非常了解网络和现实生活当中的各种梗和流行语，热衷于用幽默感给大家带来欢乐。让我们打破常规思维思考问题。

用户： """.strip()
AUTHORS_LAST = "回复: 符合要求的回复是"
AUTHORS_QUERIES = {
    Task.I2T: ["请仔细阅读图片，写出一个令人感到意外且搞笑的句子。",
               "根据图片，想出一个让人感到出乎意料和滑稽句子。",
               "请对这张图片仔细审视，创造一个出乎意料又滑稽可笑的句子。"],
    Task.T2T: ["请仔细理解所给的问题，想出一个令人感到意外且搞笑的回答。",
               "请对所提供的问题进行仔细解读，给出一个出人意料且滑稽的答案。",
               "请细心品味所给问题，以构思一个意外而滑稽的答复。"],
    Task.IT2T: ["请仔细阅读图片和图片里的文字，写出一个令人感到意外且搞笑的句子。",
                "请仔细阅读图片和图片里的文字，为图中指定部分补充令人感到意外且搞笑的句子。",
                "请细心品味图片的内容，为图中指定部分给出有趣且搞笑的说法。"],
}


def authors_message(task: Task, query: str, textbox: str = "", imagebox: str = "") -> str:
    if task is Task.I2T:
        return f"{AUTHORS_BASE}{query}\nPicture 1: <img>{imagebox}</img>\n{AUTHORS_LAST}\n"
    if task is Task.T2T:
        return f"{AUTHORS_BASE}{query}\n问题: {textbox}\n{AUTHORS_LAST}\n"
    return f"{AUTHORS_BASE}{query}\nPicture 1: <img>{imagebox}</img>\n问题: {textbox}\n{AUTHORS_LAST}\n"


@pytest.mark.parametrize("task", list(Task))
@pytest.mark.parametrize("wording", [0, 1, 2])
def test_official_templates_render_the_authors_strings(task, wording):
    question = "" if task is Task.I2T else "最开心的事情是什么？"
    expected = authors_message(task, AUTHORS_QUERIES[task][wording], question)
    for lang in Language:  # the official wording is Chinese whatever the request's language
        assert prompts.generation_prompt(task, lang, question, wording=wording, template_set="official") == expected


def test_official_conversation_keeps_chats_default_system_and_the_image_in_place():
    text = prompts.generation_prompt(Task.IT2T, Language.ZH, "他说：____", template_set="official")
    system, user = prompts.messages(text, Language.ZH, has_image=True, template_set="official")
    assert system["content"][0]["text"] == "You are a helpful assistant."
    kinds = [item["type"] for item in user["content"]]
    assert kinds == ["text", "image", "text"]
    before, _, after = user["content"]
    assert before["text"] + prompts.OFFICIAL_IMAGE + after["text"] == text
    assert after["text"] == "问题: 他说：____\n回复: 符合要求的回复是\n"


def test_official_condition_uses_our_chinese_wording_before_the_lead_in():
    text = prompts.generation_prompt(Task.T2T, Language.EN, "为什么猫迟到了", "香蕉", template_set="official")
    assert text.endswith("\n问题: 为什么猫迟到了\n条件：回答中必须包含“香蕉”。\n回复: 符合要求的回复是\n")


def test_unknown_template_set_is_refused():
    with pytest.raises(ClotError, match="Unknown template set 'authors'"):
        prompts.generation_prompt(Task.T2T, Language.ZH, "q", template_set="authors")


def test_official_sampling_comes_from_the_checkpoints_generation_config():
    # Qwen-VL-Chat's generation_config.json; transformers 4 filled the unset temperature and penalty with 1.0.
    config = GenerationConfig(max_new_tokens=512, do_sample=True, top_k=0, top_p=0.3)
    assert Sampling.from_generation_config(config, seed=7) == Sampling(
        temperature=1.0, top_p=0.3, top_k=0, max_new_tokens=512, repetition_penalty=1.0, seed=7)


# ---------------------------------------------------------------- the engine on the tiny Qwen2.5-VL
def test_engine_speaks_the_official_wording_while_the_official_adapter_is_active(engine, monkeypatch, tmp_path):
    from conftest import make_adapter

    monkeypatch.setattr(engine, "adapters_dir", tmp_path)  # other tests' adapter listings stay as they were
    from clot import adapters
    from clot.ui import Studio

    folder = make_adapter(engine, "official-like", seed=3, stage="official")
    card = adapters.read_card(folder)
    adapters.write_json_atomic(folder / adapters.CARD, {**card, "languages": ["zh"]})  # as an imported card
    request = Request(task="T2T", text="最开心的事情是什么？", num_candidates=2).validate()
    try:
        engine.use_adapter("official-like")
        monkeypatch.setattr(engine._vlm().generation_config, "top_p", 0.3)
        monkeypatch.setattr(engine._vlm().generation_config, "top_k", 0)
        assert engine.template_set == "official"
        shown = Studio(engine).switch_adapter("official-like")  # the demo's adapter card
        assert "· trained on zh" in shown and "top-p 0.3, top-k off" in shown
        assert (engine.default_sampling().top_p, engine.default_sampling().top_k) == (0.3, 0)
        turns = engine.turns_for(request)
        assert [t.text for t in turns] == [authors_message(Task.T2T, AUTHORS_QUERIES[Task.T2T][0], request.text)] * 2
        prompt = engine.tokenizer.decode(engine.encode(turns[:1])["input_ids"][0], skip_special_tokens=False)
        assert "system\nYou are a helpful assistant.<|im_end|>" in prompt and AUTHORS_LAST in prompt
        # Ranking questions keep ours, in Chinese: the authors never published theirs.
        choice = engine._worded(Choice("rank", Task.T2T, Language.EN, ["a", "b"], question="q"))
        assert choice.lang is Language.ZH
    finally:
        engine.use_adapter(None)
    assert engine.template_set == "studio" and engine.default_sampling() == Sampling()
    assert engine.turns_for(request)[0].text == prompts.generation_prompt(Task.T2T, Language.ZH, request.text)


def test_shared_prefix_decoding_with_1d_positions_equals_plain_batching():
    """The Qwen-VL family's position handling in clot/prefix.py, on a small random causal LM with the
    same kind of positions (plain 1-D rotary, read from position_ids): every step's logits of shared-prefix
    decoding equal those of plain left-padded batching."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from clot.prefix import PrefixStore, share_prefixes

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    family = QwenVL(SimpleNamespace(model_type="qwen", visual={"image_start_id": 93}))
    shared = torch.randint(3, 90, (20,)).tolist()
    rows = [shared + [5, 6, 7], shared + [8], shared[:18] + [9, 10, 11, 12]]  # the last one diverges earlier
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    turns = [SimpleNamespace(image=None)] * len(rows)
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                   pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), **options)
        inputs = share_prefixes(model, model, family, turns, {"input_ids": ids, "attention_mask": mask},
                                PrefixStore(), "base", 8, 0)
        assert inputs is not None and inputs["past_key_values"].get_seq_length() == 18  # the common 18 tokens
        cached = model.generate(**inputs, **options)
    for step_plain, step_cached in zip(plain.logits, cached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_plain, atol=1e-5, rtol=1e-5)
