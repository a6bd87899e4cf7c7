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
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    staging = lambda: entries(folder / adapters.VERSIONS)  # noqa: E731 (the first copy being written)
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
    published = (folder / "tiny-stage1").resolve().parent
    assert entries(folder / adapters.VERSIONS) == [published]  # the dead run's half copy was swept


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
    half = lambda: [v for v in entries(folder / adapters.VERSIONS)  # noqa: E731 (a copy without its card yet)
                    if (v / "joker" / adapters.WEIGHTS).exists() and not (v / "joker" / adapters.CARD).exists()]
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISH, str(big), str(folder)], cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
    caught = kill_when(publisher, half, timeout=60)
    assert caught, "the publish finished before it could be killed"
    assert (caught[0] / "joker" / adapters.WEIGHTS).stat().st_size < (big / adapters.WEIGHTS).stat().st_size

    assert [a.name for a in served.list_adapters()] == ["joker"]
    assert adapters.validate(folder / "joker", engine.fingerprint) == old_card  # untouched
    served.use_adapter("joker")
    assert served.active_adapter == "joker"

    make_adapter(engine, "joker", seed=2, folder=folder)  # the next publish
    assert not caught[0].exists()
    assert [p.name for p in entries(folder) if not p.name.startswith(".")] == ["joker"]


def test_sweep_removes_what_no_reader_can_reach_and_nothing_else(tmp_path):
    """Swept: a dead publisher's half copy and stray link, a copy replaced longer ago than the grace
    period. Kept: the published copy, a copy replaced moments ago, a live publisher's half copy."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    versions = tmp_path / adapters.VERSIONS

    def copy(stamp: str, pid, complete: bool, age_s: float = 0) -> Path:
        version = versions / f"{stamp}-{pid}-x"
        (version / "joker").mkdir(parents=True)
        if complete:
            (version / "joker" / adapters.CARD).write_text("{}")
        os.utime(version, (time.time() - age_s, time.time() - age_s))
        return version

    published = copy("1", dead, True, age_s=3600)
    (tmp_path / "joker").symlink_to(Path(adapters.VERSIONS) / published.name / "joker")
    old = copy("2", dead, True, age_s=adapters.RETIRED_GRACE_S + 5)
    recent = copy("3", dead, True, age_s=1)
    crashed = copy("4", dead, False)
    writing = copy("5", os.getpid(), False)
    (tmp_path / f".joker.link-6-{dead}-x").symlink_to(crashed / "joker")
    adapters.sweep(tmp_path)
    assert sorted(versions.iterdir()) == [published, recent, writing]
    assert sorted(p.name for p in tmp_path.iterdir()) == [adapters.VERSIONS, "joker"]


def test_republishing_never_hides_an_adapter_or_shows_half_of_one(engine, tiny_dir, tmp_path):
    """One thread republishes an adapter 40 times while one reader lists and reads it and another
    loads it into an engine: every look finds it, complete, with weights and card from one publish."""
    folder = tmp_path / "adapters"
    sources = []
    for version in range(2):  # two different adapters published in turn, told apart by their weights
        source = make_adapter(engine, f"v{version}", seed=version, folder=tmp_path / "made")
        sources.append((source, adapters.read_card(source)))
    adapters.publish(sources[0][0], folder, "joker", {**sources[0][1], "version": 0})
    fingerprints = [load_file(str(s / adapters.WEIGHTS)) for s, _ in sources]
    done, problems, looks = threading.Event(), [], [0]

    def republish():
        for i in range(1, 41):
            source, card = sources[i % 2]
            adapters.publish(source, folder, "joker", {**card, "version": i % 2})
        done.set()

    served = Engine.load(str(tiny_dir), adapters_dir=folder, device="cpu")  # its own model: loading changes it

    def read(load: bool):
        while not done.is_set():
            try:
                found = [a for a in adapters.discover(folder) if a.name == "joker"]
                assert found, "the adapter was missing"
                card = adapters.validate(found[0].path, engine.fingerprint)
                weights = load_file(str(found[0].path / adapters.WEIGHTS))
                assert all(torch.equal(weights[k], fingerprints[card["version"]][k]) for k in weights), "mixed copy"
                if load:
                    served.use_adapter("joker")
                looks[0] += 1
            except Exception as err:  # collected: an assertion in a thread would go unseen
                problems.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=read, args=(load,)) for load in (False, True)]
    threads.append(threading.Thread(target=republish))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == [] and looks[0] > 0


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
