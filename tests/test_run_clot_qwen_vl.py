"""The whole recipe on the paper's base family: the tiny Qwen-VL-Chat preset, evaluated side by side with
the official-format adapter it imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clot import adapters

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 4 CPU-minutes alone; room for a CPU shared with other jobs
def test_tiny_qwen_vl_preset_trains_evaluates_beside_the_official_adapter_and_publishes(tmp_path, artifacts):
    command = [sys.executable, "training/run_clot.py", "--config", "training/configs/tiny-qwen-vl.yaml",
               "--set", f"run_dir={tmp_path / 'run'}", "--set", f"clot.adapters_dir={tmp_path / 'adapters'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLOT_TINY_QWEN_VL_DIR=str(tmp_path / "tiny"))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout[result.stdout.rindex("\n{"):])
    assert summary["adapters"] == ["run-stage1", "run-stage2-r1"]
    assert summary["ran"] == ["data", "instructions", "stage1", "explore-r1", "stage2-r1", "import", "evaluate",
                              "publish"]
    shutil.copytree(tmp_path / "run" / "eval", artifacts / "tiny-qwen-vl-preset-eval", dirs_exist_ok=True)

    official = adapters.validate(tmp_path / "adapters" / "clot-cn")
    assert (official["stage"], official["declared_base"]) == ("official", "Qwen/Qwen-VL-Chat")
    stage1 = adapters.validate(tmp_path / "adapters" / "run-stage1")
    peft_config = json.loads((tmp_path / "adapters" / "run-stage1" / adapters.CONFIG).read_text())
    assert sorted(peft_config["target_modules"]) == ["attn.c_proj", "c_attn"]  # the family's (the official) placement
    assert stage1["base_fingerprint"] == official["base_fingerprint"]  # both fit the tiny base the run used

    models = ["base", "clot-cn", "run-stage1", "run-stage2-r1"]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert list(report["models"]) == models
    assert all(report["models"][m]["cells"] for m in models)
    table = (tmp_path / "run" / "eval" / "report.md").read_text().split("## All languages")[1].split("##")[0]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == \
        models + ["random", "questions"]
    assert "evaluation" in adapters.read_card(tmp_path / "adapters" / "run-stage2-r1")  # published with its numbers
