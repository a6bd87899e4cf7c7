"""The whole recipe on the tiny preset: every stage, adapters the engine and demo load, skipping, restarting."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clot import adapters
from clot.engine import Engine
from training import run_clot, sft

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "training/run_clot.py", "--config", "training/configs/tiny.yaml",
               "--set", f"run_dir={tmp / 'run'}", "--set", f"clot.adapters_dir={tmp / 'adapters'}"] + args
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLOT_TINY_DIR=str(tmp / "tiny"))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout[result.stdout.rindex("\n{"):])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, artifacts):
    tmp = tmp_path_factory.mktemp("clot-run")
    first = summary_of(run([], tmp))
    report = tmp / "run" / "eval"
    if report.is_dir():  # the tiny preset's evaluation report is a test artifact
        shutil.copytree(report, artifacts / "tiny-preset-eval", dirs_exist_ok=True)
    return tmp, first


@pytest.mark.slow
def test_tiny_preset_runs_every_stage_and_publishes_loadable_adapters(finished, artifacts):
    tmp, summary = finished
    assert summary["adapters"] == ["run-stage1", "run-stage2-r1", "run-stage3-r1"]
    assert summary["ran"][:6] == ["data", "instructions", "stage1", "explore-r1", "stage2-r1", "dpo"]
    assert summary["ran"][-1] == "publish" and summary["skipped"] == []
    stage1 = adapters.validate(tmp / "adapters" / "run-stage1")
    stage2 = adapters.validate(tmp / "adapters" / "run-stage2-r1")
    assert (stage1["stage"], stage1["round"], stage2["stage"], stage2["round"]) == (1, 0, 2, 1)
    assert stage2["settings"]["init_adapter"].endswith("run-stage1")  # stage 2 continued stage 1
    assert stage2["extra_records_hash"] and stage2["metrics"]["train_instructions"] > stage1["metrics"]["train_instructions"]
    explored = json.loads((tmp / "run" / "explore-r1" / "summary.json").read_text())
    assert explored["prompts"] > 0 and explored["adapter"] == "run-stage1"
    # the engine and the demo load both adapters
    from clot.ui import Studio

    engine = Engine.load(str(tmp / "tiny"), adapters_dir=tmp / "adapters", device="cpu")
    studio = Studio(engine)
    picker, _ = studio.refresh_adapters()
    listed = [value for _, value in picker["choices"]] if isinstance(picker, dict) else \
        [value for _, value in picker.choices]
    assert {"run-stage1", "run-stage2-r1"} <= set(listed)
    sampling = [0.9, 0.9, 50, 8, 1.05, 1]
    for name in ("run-stage1", "run-stage2-r1"):
        result = studio.text_to_text("Why is the fridge humming?", "en", "", 2, "sample", name, *sampling)
        assert result["adapter"] == name and len(result["candidates"]) == 2


@pytest.mark.slow
def test_tiny_preset_stage3_learns_from_the_sample_votes_and_joins_the_evaluation(finished):
    tmp, _ = finished
    card = adapters.validate(tmp / "adapters" / "run-stage3-r1")
    assert (card["stage"], card["method"], card["parent"]) == (3, "dpo", "run-stage2-r1")
    manifest = json.loads((tmp / "run" / "stage3-pairs" / "manifest.json").read_text())
    assert card["pairs_sha256"] == manifest["pairs_sha256"] and card["metrics"]["steps"] == 6
    assert "eval_reward_accuracy" in card["metrics"] and "evaluation" in card  # the report's numbers, copied in
    report = json.loads((tmp / "run" / "eval" / "report.json").read_text())
    assert {"base", "run-stage2-r1", "run-stage3-r1"} <= set(report["models"])
    first = sft.read_csv(tmp / "run" / "stage3" / "loss.csv")[0]
    assert float(first["dpo_loss"]) == pytest.approx(math.log(2), abs=1e-5)
    engine = Engine.load(str(tmp / "tiny"), adapters_dir=tmp / "adapters", device="cpu")
    engine.use_adapter("run-stage3-r1")
    assert engine.active_adapter == "run-stage3-r1"


@pytest.mark.slow
def test_second_run_skips_every_stage_and_from_stage_restarts(finished):
    tmp, _ = finished
    again = summary_of(run([], tmp))
    assert again["ran"] == [] and "stage1" in again["skipped"] and "publish" in again["skipped"]
    before = adapters.read_card(tmp / "adapters" / "run-stage2-r1")["created"]
    redo = summary_of(run(["--from-stage", "stage2", "--set", "stage2.max_steps=2"], tmp))
    assert redo["ran"][0] == "stage2-r1" and "stage1" in redo["skipped"] and "explore-r1" in redo["skipped"]
    assert "dpo" in redo["ran"]  # stage 3 follows its new parent
    card = adapters.read_card(tmp / "adapters" / "run-stage2-r1")
    assert card["metrics"]["steps"] == 2 and card["created"] >= before


def test_unknown_stage_and_bad_settings_are_refused(tmp_path):
    with pytest.raises(run_clot.ClotError, match="Unknown stage 'stage9'"):
        run_clot.Pipeline("training/configs/tiny.yaml", [f"run_dir={tmp_path}"], "stage9")
    with pytest.raises(run_clot.ClotError, match="Unknown setting"):
        run_clot.Pipeline("training/configs/tiny.yaml", [f"run_dir={tmp_path}", "clot.roundz=2"])
    assert run_clot.Pipeline("training/configs/tiny.yaml", [f"run_dir={tmp_path}"], "stage3").from_stage == "dpo"


def test_push_to_hub_uploads_the_adapter_with_a_model_card(engine, tmp_path, monkeypatch):
    from conftest import make_adapter

    folder = make_adapter(engine, "pushed", seed=9, folder=tmp_path)
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, repo_type, exist_ok):
            uploads.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, repo_type, commit_message):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()),
                            (Path(folder_path) / "README.md").read_text()))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = run_clot.push_to_hub(folder, "someone/clot-test")
    assert url.endswith("someone/clot-test")
    assert uploads[0] == ("create", "someone/clot-test")
    _, _, files, card = uploads[1]
    assert {"README.md", "clot.json", "adapter_model.safetensors", "adapter_config.json"} <= set(files)
    assert "library_name: peft" in card and "base_model:" in card

    class OfflineApi(FakeApi):
        def create_repo(self, *args, **kwargs):
            raise OSError("network unreachable")

    monkeypatch.setattr("huggingface_hub.HfApi", OfflineApi)
    with pytest.raises(run_clot.ClotError, match="Could not push pushed to someone/clot-test"):
        run_clot.push_to_hub(folder, "someone/clot-test")


@pytest.mark.slow
def test_tiny_preset_runs_under_two_processes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "training/run_clot.py", "--config", "training/configs/tiny.yaml", "--set", f"run_dir={tmp_path / 'run'}",
               "--set", f"clot.adapters_dir={tmp_path / 'adapters'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CLOT_TINY_DIR=str(tmp_path / "tiny"))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count('"adapters"') == 1  # only the main process reports
    for name in ("run-stage1", "run-stage2-r1"):
        assert adapters.validate(tmp_path / "adapters" / name)["metrics"]["steps"] > 0
    assert json.loads((tmp_path / "run" / "explore-r1" / "summary.json").read_text())["processes"] == 2
    assert (tmp_path / "run" / "eval" / "report.json").is_file()


@pytest.mark.parametrize("preset", sorted((ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_fills_every_stage_with_known_valid_settings(preset):
    from training import dpo, evaluate, explore, instructions, sft
    from training.config import load_config

    load_config(run_clot.RunSettings, preset, "clot")
    load_config(instructions.InstructionSettings, preset, "instructions")
    load_config(sft.TrainSettings, preset, "training")
    load_config(sft.TrainSettings, preset, "training", also="stage2")
    load_config(explore.ExploreSettings, preset, "explore").validate()
    load_config(evaluate.EvalSettings, preset, "evaluation")
    load_config(dpo.DpoSettings, preset, "dpo")
