"""The memory plan (training/plan.py, run_clot --plan): tables for every preset, known arithmetic, verdicts."""

import json
from pathlib import Path

import pytest
import torch

from clot import tiny
from clot.tasks import ClotError
from training import plan
from training.explore import ExploreSettings

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "training" / "configs").glob("*.yaml"))
STAGES = ["stage-1 SFT", "stage-1 held-out loss", "stage-2 exploration", "stage-2 SFT", "stage-2 held-out loss",
          "evaluation"]
THREE_B = "Qwen/Qwen2.5-VL-3B-Instruct"


def _rows(text: str, stage: str) -> list[list[str]]:
    """The cells of the table rows of one stage (settings row first, then the memory row)."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {stage} |")]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_has_every_stage_and_part(preset):
    text = plan.plan(str(preset), gpu_gb=24)
    print(text)  # the plan of every preset, in the test log
    header = next(line for line in text.splitlines() if line.startswith("| stage | weights"))
    assert all(part in header for part in plan.PARTS)
    for stage in STAGES:
        settings, memory = _rows(text, stage)
        assert int(settings[1]) > 0 and int(settings[2]) > 0 and int(settings[3]) > 0  # tokens/image, positions, batch
        assert settings[6] in ("bf16", "fp16", "fp32")
        assert len(memory) == len(plan.PARTS) + 4 and memory[-2] in ("fits", "does not fit")
        assert float(memory[-3]) > 0


def test_the_3b_preset_fits_a_24_gb_gpu_at_its_batch_sizes():
    text = plan.plan(str(ROOT / "training/configs/qwen2.5-vl-3b.yaml"), gpu_gb=24)
    for stage in STAGES:
        settings, memory = _rows(text, stage)
        assert memory[-2] == "fits" and int(memory[-1]) >= int(settings[3]), stage
        assert settings[1] == "1024"  # the engine's cap, not the checkpoint's 16,384


def test_parameter_counts_match_the_models_transformers_builds():
    tokenizer = tiny.build_tokenizer()
    for size in ("tiny", "small", "3b"):
        config = tiny.model_config(size, tokenizer)
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        arch = plan.architecture_from_config(config.to_dict())
        assert arch.parameters() == sum(p.numel() for p in model.parameters()), size


def test_known_arithmetic_of_the_3b_and_qwen_vl_chat_configs():
    arch = plan.base_architecture(THREE_B)
    assert arch.parameters() == 3_754_622_976  # Qwen2.5-VL-3B-Instruct's published count
    assert plan.weight_bytes(arch, 2, base_4bit=False) == 2 * 3_754_622_976
    # LoRA r 64 on q, k, v, o of 36 layers: 64 × (2048+2048 + 2048+256 + 2048+256 + 2048+2048) per layer
    assert plan.lora_parameters(arch, r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)", 64) == 36 * 64 * 12800
    assert arch.kv_bytes_per_position(2) == 2 * 36 * 2 * 128 * 2
    linear_lm = 36 * (2048 * (2048 + 256 + 256) + 2048 * 2048 + 3 * 2048 * 11008)
    assert plan.weight_bytes(arch, 2, base_4bit=True) == int(linear_lm * 0.5625) + (3_754_622_976 - linear_lm) * 2

    qwen = plan.base_architecture("Qwen/Qwen-VL-Chat")
    assert 9.6e9 < qwen.parameters() < 9.7e9
    assert qwen.image_tokens(1024) == 256 and qwen.image_tokens(16) == 256
    assert qwen.kv_bytes_per_position(2) == 2 * 32 * 32 * 128 * 2
    # the official CLoT LoRA: r 64 on c_attn (4096 → 12288) and attn.c_proj (4096 → 4096), 32 layers
    assert plan.lora_parameters(qwen, ["c_attn", "attn.c_proj"], 64) == 32 * 64 * (4096 + 12288 + 4096 + 4096)


def test_lora_count_matches_peft_on_the_tiny_model():
    from peft import LoraConfig, get_peft_model

    from clot.families import Qwen25VL

    model, _ = tiny.random_model("tiny")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=Qwen25VL.lora_targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert plan.lora_parameters(plan.tiny_architecture("tiny"), Qwen25VL.lora_targets, 8) == trainable


def test_exploration_batch_and_kv_cache_agree_with_the_memory_budget():
    arch = plan.base_architecture(THREE_B)
    settings = ExploreSettings(memory_budget_gb=8)
    real_config = tiny.model_config("3b", tiny.build_tokenizer())
    prompts = settings.batch_size(real_config, 2)
    assert settings.batch_size(arch.explore_config(), 2) == prompts == 29
    stage = next(s for s in plan.stages_of(plan_pipeline("training/configs/qwen2.5-vl-3b.yaml"), arch)
                 if s.kind == "explore")
    assert stage.batch == prompts and stage.rows_per_batch == settings.num_conditions
    prefix = stage.positions - stage.new_tokens
    decoding = (prompts * settings.num_conditions * stage.positions + prompts * prefix) * arch.kv_bytes_per_position(2)
    assert decoding <= 8 * plan.GiB  # the budget holds every row and each prompt's stored prefix
    assert stage.memory(arch, plan.Assumptions())["kv cache"] >= decoding


def plan_pipeline(config: str):
    from training.run_clot import Pipeline

    return Pipeline(str(ROOT / config), [])


def test_verdict_flips_at_the_peak_and_largest_batch_is_the_last_that_fits():
    arch = plan.base_architecture(THREE_B)
    assume = plan.Assumptions()
    stage = plan.stages_of(plan_pipeline("training/configs/qwen2.5-vl-3b.yaml"), arch)[0]
    peak = stage.total(arch, assume)
    above = plan.render(THREE_B, arch, [stage], assume, gpu_gb=peak / plan.GiB + 0.01)
    below = plan.render(THREE_B, arch, [stage], assume, gpu_gb=peak / plan.GiB - 0.01)
    assert _rows(above, stage.name)[1][-2] == "fits" and _rows(below, stage.name)[1][-2] == "does not fit"
    limit = 24 * plan.GiB
    largest = stage.largest_batch(arch, assume, limit)
    assert stage.total(arch, assume, largest) <= limit < stage.total(arch, assume, largest + 1)
    assert stage.largest_batch(arch, assume, peak - 1) < stage.batch <= stage.largest_batch(arch, assume, peak)


def test_logits_follow_the_labelled_positions_assumption():
    arch = plan.base_architecture(THREE_B)
    stage = plan.Stage("SFT", "train", image_tokens=1024, positions=2048, batch=4, accumulation=1,
                       precision="bf16", on_gpu=True, lora=0, checkpointing=True)
    labelled = stage.memory(arch, plan.Assumptions(labelled_tokens=256))["logits"]
    everywhere = stage.memory(arch, plan.Assumptions(labelled_tokens=0))["logits"]
    # bf16 head output, its fp32 copy, fp32 log-softmax and gradient: 14 bytes per vocabulary entry
    assert labelled == 4 * 256 * 151936 * 14 and everywhere == 8 * labelled
    assert stage.total(arch, plan.Assumptions(labelled_tokens=0)) > stage.total(arch, plan.Assumptions())


def test_a_qwen_vl_preset_and_a_local_config_folder(tmp_path):
    preset = tmp_path / "qwen-vl-chat.yaml"
    for targets in ("[c_attn, attn.c_proj]", r"'.*\.h\.\d+\.attn\.(c_attn|c_proj)'"):
        preset.write_text(f"base_model: Qwen/Qwen-VL-Chat\ntraining: {{lora_r: 64, target_modules: {targets}, "
                          "precision: bf16, activation_checkpointing: true}\nexplore: {memory_budget_gb: 8}\n")
        text = plan.plan(str(preset), gpu_gb=24)
        settings, memory = _rows(text, "stage-1 SFT")
        assert settings[1] == "256"
        lora_gib = float(memory[plan.PARTS.index("lora+adam") + 1])
        assert lora_gib == pytest.approx(32 * 64 * 24576 * 16 / plan.GiB, abs=0.01)
    preset.write_text("base_model: Qwen/Qwen-VL-Chat\ntraining: {target_modules: q_proj}\n")
    with pytest.raises(ClotError, match="matches no linear layer"):
        plan.plan(str(preset))

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(plan.KNOWN_CONFIGS[THREE_B]))
    (folder / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 28 * 28 * 4096}))
    local = plan.base_architecture(str(folder))
    assert local.parameters() == 3_754_622_976 and local.image_tokens(8192) == 4096


def test_unknown_base_model_is_one_clear_error():
    with pytest.raises(ClotError, match="No config for base model"):
        plan.base_architecture("someone/unknown-model")


def test_run_clot_plan_runs_nothing(tmp_path, capsys):
    from training import run_clot

    run_dir = tmp_path / "run"
    argv = ["--config", str(ROOT / "training/configs/tiny.yaml"), "--set", f"run_dir={run_dir}",
            "--set", f"clot.adapters_dir={tmp_path / 'adapters'}"]
    assert run_clot.main(argv + ["--plan", "--gpu-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "| stage-2 exploration |" in out and "| fits |" in out
    assert not run_dir.exists() and not (tmp_path / "adapters").exists()
    with pytest.raises(SystemExit) as exit_:
        run_clot.main(argv + ["--gpu-gb", "24"])
    assert exit_.value.code == 2 and "--gpu-gb goes with --plan" in capsys.readouterr().err
