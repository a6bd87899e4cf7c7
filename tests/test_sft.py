"""Stage-1 training on the tiny model: loss mask, loss going down, multi-process, kill and resume, publishing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from clot import adapters, data
from clot.engine import Engine, Turn
from clot.tasks import Language, Request
from training import instructions as ins
from training import sft

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def instruction_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("instr-run")
    settings = ins.InstructionSettings(run_dir=str(run), test_ratio=0.2, literal_model="none")
    ins.build(settings)
    return settings.out_dir


def settings_for(tiny_dir, instruction_dir, run: Path, **changes) -> sft.TrainSettings:
    values = dict(base_model=str(tiny_dir), run_dir=str(run), instructions=str(instruction_dir),
                  adapters_dir=str(run / "adapters"), adapter_name="tiny-test", lora_r=16, lora_alpha=32,
                  learning_rate=1e-2, per_device_train_batch_size=4, max_steps=12, warmup_steps=1,
                  logging_steps=4, save_steps=6, eval_samples=16, device="cpu")
    values.update(changes)
    return sft.TrainSettings(**values)


def test_loss_mask_covers_only_the_answer_and_matches_the_engine_encoding(engine, instruction_dir):
    records = ins.read_records(instruction_dir, "train")
    picked = [next(r for r in records if r["image"] and r["kind"] == "selection"),
              next(r for r in records if not r["image"] and r["kind"] == "masked")]
    collator = sft.Collator(engine.processor, data.image_store(data.SAMPLE_DIR))
    tokenizer = engine.tokenizer
    for record in picked:
        example = collator.encode(record)
        ids, labels = example["input_ids"], example["labels"]
        trained = labels != sft.IGNORE
        start = int(trained.nonzero()[0])
        assert tokenizer.decode(ids[trained]) == record["answer"] + "<|im_end|>"
        assert trained[start:].sum() == trained.sum() and not trained[:start].any()
        image = data.image_store(data.SAMPLE_DIR).open(record["image"]) if record["image"] else None
        at_inference = engine.encode([Turn(record["user"], Language(record["lang"]), image)])["input_ids"][0]
        assert torch.equal(ids[:start], at_inference)  # trained on exactly what the engine will feed
    batch = collator(picked)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = min(range(2), key=lambda i: int(batch["attention_mask"][i].sum()))
    padding = batch["attention_mask"][short] == 0
    assert padding.any() and (batch["labels"][short][padding] == sft.IGNORE).all()
    grid = batch["image_grid_thw"]
    assert grid.shape[0] == 1 and batch["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())


def test_short_training_lowers_heldout_loss_and_publishes_a_loadable_adapter(tiny_dir, instruction_dir, tmp_path):
    settings = settings_for(tiny_dir, instruction_dir, tmp_path)
    card = sft.train(settings)
    metrics = card["metrics"]
    assert metrics["steps"] == 12
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.02
    manifest = ins.read_manifest(instruction_dir)
    published = Path(settings.adapters_dir) / "tiny-test"
    saved = adapters.validate(published)
    assert saved["data_hash"] == manifest["data_hash"] and saved["split_hash"] == manifest["split_hash"]
    assert saved["stage"] == 1 and saved["settings"]["lora_r"] == 16
    assert sorted(p.name for p in Path(settings.adapters_dir).iterdir()) == [adapters.VERSIONS, "tiny-test"]
    assert len(list((Path(settings.adapters_dir) / adapters.VERSIONS).iterdir())) == 1  # one copy, no staging left
    rows = sft.read_csv(tmp_path / "loss.csv")
    assert [int(r["step"]) for r in rows if r["loss"]] == [1, 4, 8, 12]
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents*"))
    peft_config = json.loads((published / "adapter_config.json").read_text())
    assert peft_config["r"] == 16 and sorted(peft_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    served = Engine.load(str(tiny_dir), adapters_dir=settings.adapters_dir, device="cpu")
    assert [a.name for a in served.list_adapters()] == ["tiny-test"]
    served.use_adapter("tiny-test")
    request = Request(task="T2T", text="Why was the calendar sad?", num_candidates=2)
    request.sampling.max_new_tokens = 4
    assert len(served.generate(request)) == 2


def run_cli(args: list[str], tiny_dir, instruction_dir, run: Path, processes: int = 1, **popen):
    command = [sys.executable, "training/sft.py"]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "training/sft.py"]
    command += ["--config", "training/configs/tiny.yaml", "--set", f"base_model={tiny_dir}",
                "--set", f"run_dir={run}", "--set", f"instructions={instruction_dir}",
                "--set", f"adapters_dir={run / 'adapters'}", "--set", "eval_samples=8"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=popen.pop("stdout", subprocess.PIPE),
                            stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_two_cpu_processes_train_together_and_save_one_adapter(tiny_dir, instruction_dir, tmp_path):
    process = run_cli(["--set", "max_steps=3", "--set", "save_steps=3"], tiny_dir, instruction_dir, tmp_path,
                      processes=2)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert output.count("published ") == 1  # only the main process publishes
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    train_records = len(ins.read_records(instruction_dir, "train"))
    assert state["epoch"] == pytest.approx(3 * 4 * 2 / train_records, rel=0.05)  # two ranks, distinct batches
    assert adapters.validate(tmp_path / "adapters" / "tiny-stage1")["metrics"]["steps"] == 3


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_step_count(tiny_dir, instruction_dir, tmp_path):
    args = ["--set", "max_steps=30", "--set", "save_steps=3", "--set", "logging_steps=1"]
    with open(tmp_path / "first.log", "w") as log:
        first = run_cli(args, tiny_dir, instruction_dir, tmp_path, stdout=log)
        deadline = time.time() + 240
        while sft.last_checkpoint(tmp_path / "checkpoints") is None and first.poll() is None:
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    reached = int(sft.last_checkpoint(tmp_path / "checkpoints").name.split("-")[1])
    assert reached < 30 and not (tmp_path / "adapters" / "tiny-stage1").exists()

    second = run_cli(args, tiny_dir, instruction_dir, tmp_path)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    assert "resuming from" in output
    card = adapters.validate(tmp_path / "adapters" / "tiny-stage1")
    assert card["metrics"]["steps"] == 30
    steps = [int(r["step"]) for r in sft.read_csv(tmp_path / "loss.csv") if r["loss"]]
    assert steps[-1] == 30 and set(range(reached + 1, 31)) <= set(steps)
    served = Engine.load(str(tiny_dir), adapters_dir=tmp_path / "adapters", device="cpu")
    served.use_adapter("tiny-stage1")
    assert served.active_adapter == "tiny-stage1"


def test_resume_never_clears_earlier_checkpoints_and_uses_current_argument_names(tiny_dir, instruction_dir, tmp_path):
    stale = tmp_path / "checkpoints" / "checkpoint-30"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 30}))
    (tmp_path / "loss.csv").write_text("step,epoch,loss\n30,9.0,1.0\n")
    settings = settings_for(tiny_dir, instruction_dir, tmp_path, resume="never", max_steps=2, save_steps=2,
                            logging_steps=1, eval_samples=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sft.train(settings)["metrics"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2", "recipe.json"]
    assert [int(r["step"]) for r in sft.read_csv(tmp_path / "loss.csv") if r["loss"]] == [1, 2]
    # TrainingArguments' warning about our arguments (peft's own `is_gradient_checkpointing` one is not ours)
    assert not [str(w.message) for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]
