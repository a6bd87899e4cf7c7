"""Crashes: training killed mid-checkpoint and mid-publish, a publish killed while copying; where
adapters may come from. (Killed mid-step: test_sft.py; exploration killed twice: test_explore.py.)
Whatever the kill, the demo never lists half an adapter and the rerun finishes the job."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clot import adapters
from clot.engine import Engine
from clot.tasks import ClotError
from training import sft

from conftest import make_adapter
from test_sft import instruction_dir, run_cli  # noqa: F401 (instruction_dir is a fixture)

ROOT = Path(__file__).resolve().parent.parent


def entries(folder: Path) -> list[Path]:
    """The folder's entries, tolerating ones that vanish while we look (Trainer rotates checkpoints)."""
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def kill_when(process: subprocess.Popen, moment, timeout: float = 240):
    """Poll (every half millisecond) until `moment()` returns something, then SIGKILL the process.
    Returns what `moment` returned, or None if the process ended first."""
    deadline = time.time() + timeout
    while process.poll() is None:
        seen = moment()
        if seen:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return seen
        assert time.time() < deadline, "the moment to kill never came"
        time.sleep(0.0005)
    return None


def finish(args, tiny_dir, instruction_dir, run: Path) -> str:
    process = run_cli(args, tiny_dir, instruction_dir, run)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def served_adapters(tiny_dir, folder: Path) -> list[str]:
    return [a.name for a in Engine.load(str(tiny_dir), adapters_dir=folder, device="cpu").list_adapters()]


TRAIN = ["--set", "max_steps=12", "--set", "save_steps=1", "--set", "logging_steps=1", "--set", "save_total_limit=2"]


@pytest.mark.slow
def test_training_killed_mid_checkpoint_resumes_from_the_last_complete_one(tiny_dir, instruction_dir, tmp_path):
    """Killed while Trainer writes a checkpoint (its folder has files but no trainer_state.json yet)."""

    def partial():
        folder = tmp_path / "checkpoints"
        complete = sft.last_checkpoint(folder)
        for path in entries(folder):
            if complete and path.name.startswith("checkpoint-") and path.name != complete.name \
                    and entries(path) and not (path / "trainer_state.json").exists():
                return path
        return None

    with open(tmp_path / "first.log", "w") as log:
        caught = kill_when(run_cli(TRAIN, tiny_dir, instruction_dir, tmp_path, stdout=log), partial)
    assert caught is not None, "the run finished before a checkpoint could be caught half-written"
    if caught.exists():  # Trainer may still have rotated it away; usually it is there, half-written
        assert not (caught / "trainer_state.json").exists()
    resumed_from = sft.last_checkpoint(tmp_path / "checkpoints")
    assert resumed_from is not None and resumed_from != caught
    assert served_adapters(tiny_dir, tmp_path / "adapters") == []

    output = finish(TRAIN, tiny_dir, instruction_dir, tmp_path)
    assert f"resuming from {resumed_from}" in output
    card = adapters.validate(tmp_path / "adapters" / "tiny-stage1")
    assert card["metrics"]["steps"] == 12
    steps = [int(r["step"]) for r in sft.read_csv(tmp_path / "loss.csv") if r["loss"]]
    assert steps[-1] == 12 and set(range(1, 13)) <= set(steps)  # no step missing from the log


@pytest.mark.slow
def test_training_killed_mid_publish_resumes_and_publishes_a_valid_adapter(tiny_dir, instruction_dir, tmp_path):
    """Killed while the finished run copies its adapter into the adapters folder."""
    folder = tmp_path / "adapters"
    staging = lambda: [p for p in entries(folder) if ".staging-" in p.name]  # noqa: E731
    args = TRAIN[:2] + ["--set", "save_steps=6"]
    with open(tmp_path / "first.log", "w") as log:
        caught = kill_when(run_cli(args, tiny_dir, instruction_dir, tmp_path, stdout=log), staging)
    assert caught, "the run finished before its publish could be caught"
    assert served_adapters(tiny_dir, folder) == []  # the half-copied adapter is invisible
    assert adapters.discover(folder) == []

    output = finish(args, tiny_dir, instruction_dir, tmp_path)
    assert "resuming from" in output
    assert served_adapters(tiny_dir, folder) == ["tiny-stage1"]
    assert adapters.validate(folder / "tiny-stage1")["metrics"]["steps"] == 12
    assert not [p for p in entries(folder) if p.name.startswith(".")]  # the dead run's staging was swept


PUBLISH = """
import sys
from clot import adapters
adapters.publish(sys.argv[1], sys.argv[2], "joker", {"version": 2})
"""


def test_publish_killed_while_copying_keeps_the_old_adapter(engine, tmp_path):
    """A large adapter replaces a published one; the copy is killed halfway: the old one stays in
    use, the half copy is never listed, and the next publish sweeps it away."""
    folder = tmp_path / "adapters"
    old = make_adapter(engine, "joker", seed=1, folder=folder)
    old_card = adapters.validate(old, engine.fingerprint)
    big = tmp_path / "big"
    big.mkdir()
    save_file({"weight": torch.zeros(64 * 2**20 // 4)}, str(big / adapters.WEIGHTS))  # 64 MB: a slow copy
    (big / adapters.CONFIG).write_text("{}")

    served = Engine(engine.model, engine.processor, base_model=engine.base_model, adapters_dir=folder)
    served.use_adapter("joker")
    half = lambda: [p for p in entries(folder) if ".staging-" in p.name and (p / adapters.WEIGHTS).exists()]  # noqa: E731
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISH, str(big), str(folder)], cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
    caught = kill_when(publisher, half, timeout=60)
    assert caught, "the publish finished before it could be killed"
    assert (caught[0] / adapters.WEIGHTS).stat().st_size < (big / adapters.WEIGHTS).stat().st_size

    assert [a.name for a in served.list_adapters()] == ["joker"]
    assert adapters.validate(folder / "joker", engine.fingerprint) == old_card  # untouched
    served.use_adapter("joker")
    assert served.active_adapter == "joker"

    make_adapter(engine, "joker", seed=2, folder=folder)  # the next publish
    assert not caught[0].exists()
    assert [p.name for p in entries(folder)] == ["joker"]


def test_sweep_puts_back_an_adapter_retired_by_a_killed_publish(tmp_path):
    """Killed between moving the old adapter aside and renaming the new one in: the old one returns."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".joker.retired-{dead}-1").mkdir()
    (tmp_path / f".joker.retired-{dead}-1" / "clot.json").write_text("{}")
    (tmp_path / f".joker.staging-{dead}-abc").mkdir()
    (tmp_path / f".other.staging-{os.getpid()}-abc").mkdir()  # a live publisher's: left alone
    adapters.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.staging-{os.getpid()}-abc", "joker"]
    assert (tmp_path / "joker" / "clot.json").exists()


def test_adapters_load_only_from_the_folder_and_only_safetensors(engine, tmp_path):
    outside = make_adapter(engine, "outside", seed=3, folder=tmp_path / "elsewhere")
    for name in (str(outside), "../elsewhere/outside", "outside"):
        with pytest.raises(ClotError, match="Invalid adapter name|Unknown adapter"):
            engine.use_adapter(name)
    torch.save({}, outside / "adapter_model.bin")
    copied = adapters.publish(outside, tmp_path / "adapters", "copied", {"stage": 1})
    assert not list(copied.glob("*.bin"))  # publish never copies a pickle
    (outside / adapters.WEIGHTS).unlink()
    with pytest.raises(ClotError, match="ships only pickle weights"):  # and a pickle alone is refused
        adapters.validate(outside)


def test_training_resumes_only_checkpoints_of_its_own_recipe(tmp_path):
    settings = sft.TrainSettings(run_dir=str(tmp_path), max_steps=10)
    assert sft.resume_point(settings) is None  # a first run records its recipe

    def checkpoint(step: int) -> Path:
        folder = settings.checkpoints_dir / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return folder

    four = checkpoint(4)
    assert sft.resume_point(settings) == four
    assert sft.resume_point(dataclasses.replace(settings, max_steps=20, logging_steps=1)) == four  # extended
    other = dataclasses.replace(settings, learning_rate=0.5)
    assert sft.resume_point(other) is None and not four.exists()  # another recipe: starts over
    five = checkpoint(5)
    assert sft.resume_point(other) == five
    assert sft.resume_point(dataclasses.replace(other, max_steps=3)) is None and not five.exists()  # past its end
