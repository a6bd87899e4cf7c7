"""Stage 2 exploration: the selection logic, provenance, resuming after a kill, retraining records."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clot import data, tiny
from clot.engine import Choice
from clot.prefix import PrefixStore
from clot.tasks import Candidate, ClotError, Language, Request, Task
from training import explore as ex
from training import instructions as ins

from conftest import make_adapter

ROOT = Path(__file__).resolve().parent.parent


def prompt(pid: str, answers: list[tuple[str, int]]) -> data.Prompt:
    p = data.Prompt(pid, Language.EN, Task.T2T, f"question {pid}?", None)
    p.answers = [data.Sample(Language.EN, Task.T2T, p.question, None, text, star) for text, star in answers]
    return p


class ScriptedModel:
    """Stands in for the engine: fixed candidates per prompt and a preference score per text."""

    def __init__(self, candidates: dict[str, list[str]], taste: dict[str, float]):
        self.candidates, self.taste = candidates, taste
        self.calls = {"generate": 0, "score": 0}

    def generate_many(self, requests, adapter=None):
        self.calls["generate"] += 1
        out = []
        for r in requests:
            texts = self.candidates[r.text]
            out.append([Candidate(texts[i], r.conditions[i]) for i in range(len(texts))])
        return out

    def score(self, choices: list[Choice], adapter=None):
        self.calls["score"] += 1
        result = []
        for c in choices:
            raw = [self.taste.get(o, 0.0) for o in c.options]
            total = sum(raw) or 1.0
            result.append([v / total for v in raw])
        return result


def test_keeps_exactly_the_candidates_the_model_picked_over_the_human_answer():
    prompts = [prompt("a", [("human a", 9)]), prompt("b", [("human b", 9)]), prompt("c", [("human c", 5)])]
    model = ScriptedModel(
        candidates={"question a?": ["a1", "a2", "a3", "a4", "a5"],
                    "question b?": ["b1", "b2", "b3", "b4", "b5"],
                    "question c?": ["c1", "c1 ", "human c", "", "c2"]},  # duplicates, a copy of the human, empty
        taste={"a1": 1, "a2": 5, "a3": 4, "a4": 2, "a5": 3, "human a": 4.5,   # a2 beats the human
               "b1": 1, "b2": 2, "b3": 3, "b4": 4, "b5": 5, "human b": 9,     # the human wins
               "c1": 3, "c2": 6, "human c": 1})                                  # c2 wins
    settings = ex.ExploreSettings(num_conditions=5, rho=0.0, dedup=0.9)
    nouns = {Language.EN: ["walrus", "teapot"]}
    records = ex.explore_batch(model, prompts, images=None, nouns=nouns, settings=settings, adapter="s1")
    assert model.calls == {"generate": 1, "score": 2}  # one generate call, one ranking pass, one selection pass
    a, b, c = records
    assert a["finalists"] == [1, 2]  # a2 and a3 ranked highest
    assert a["accepted"] and a["answer"] == "a2"
    assert a["condition"] == a["candidates"][1]["condition"] and a["condition"] in ("walrus", "teapot")
    assert not b["accepted"] and b["answer"] is None
    assert b["selection"]["sources"][b["selection"]["picked"]] == "human"
    assert [row["dropped"] for row in c["candidates"]] == [False, True, True, True, False]
    assert c["accepted"] and c["answer"] == "c2"
    for record in records:
        assert set(record["selection"]["sources"]) == {f"candidate:{i}" for i in record["finalists"]} | {"human"}
        assert record["human_answer"] == prompts[records.index(record)].answers[0].text  # the top-starred one

    new = ex.retraining_records(records, ["conditioned", "plain"], random.Random(0))
    assert [r["answer"] for r in new] == ["a2", "a2", "c2", "c2"]
    assert "walrus" in new[0]["user"] or "teapot" in new[0]["user"]
    assert "Condition" not in new[1]["user"]
    assert {r["prompt_id"] for r in new} == {"a", "c"}


def test_a_torn_last_line_is_dropped_and_explored_again(tmp_path):
    shard = tmp_path / "samples.rank0.jsonl"
    shard.write_text('{"prompt_id": "a"}\n{"prompt_id": "b"}\n{"prompt_id": "c", "acc')
    assert [r["prompt_id"] for r in ex.read_done(shard)] == ["a", "b"]
    assert shard.read_text() == '{"prompt_id": "a"}\n{"prompt_id": "b"}\n'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir, engine) -> Path:
    """Stage-1 instructions on the bundled sample and a published stage-1 adapter."""
    run = tmp_path_factory.mktemp("explore-run")
    ins.build(ins.InstructionSettings(base_model=str(tiny_dir), run_dir=str(run), test_ratio=0.2,
                                      literal_model="none"))
    make_adapter(engine, "explorer-stage1", seed=4, folder=run / "adapters")
    return run


def settings_for(tiny_dir, run: Path, **changes) -> ex.ExploreSettings:
    values = dict(base_model=str(tiny_dir), run_dir=str(run), adapter="explorer-stage1",
                  adapters_dir=str(run / "adapters"), max_new_tokens=12, prompts_per_batch=4, device="cpu")
    values.update(changes)
    return ex.ExploreSettings(**values)


def test_exploration_on_the_tiny_model_writes_provenance_complete_samples(tiny_dir, run_dir, engine):
    engine.adapters_dir = run_dir / "adapters"
    summary = ex.explore(settings_for(tiny_dir, run_dir, max_prompts=6), engine=engine)
    samples = [json.loads(line) for line in (run_dir / "explore-r1" / "samples.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(samples) == 6
    assert summary["accepted"] == sum(s["accepted"] for s in samples)
    for s in samples:
        assert {"prompt_id", "candidates", "kept", "finalists", "selection", "human_answer", "adapter",
                "adapter_created", "sampling", "seed", "accepted", "answer", "condition", "round"} <= set(s)
        assert s["adapter"] == "explorer-stage1" and s["adapter_created"]
        assert len(s["candidates"]) == 5 and s["sampling"]["max_new_tokens"] == 12
        if s["selection"]:
            assert len(s["selection"]["scores"]) == len(s["selection"]["options"]) == len(s["finalists"]) + 1
    records = [json.loads(line) for line in (run_dir / "explore-r1" / "records.jsonl").read_text().splitlines()]
    assert {r["prompt_id"] for r in records} == {s["prompt_id"] for s in samples if s["accepted"]}
    # nothing changed: a second call explores nothing new and gives the same file
    before = (run_dir / "explore-r1" / "samples.jsonl").read_bytes()
    ex.explore(settings_for(tiny_dir, run_dir, max_prompts=6), engine=engine)
    assert (run_dir / "explore-r1" / "samples.jsonl").read_bytes() == before


@pytest.mark.slow
def test_killed_exploration_resumes_without_duplicates_or_losses(tiny_dir, run_dir, tmp_path):
    """Killed twice, the second time while resuming: the finished files are byte-identical to those of
    an uninterrupted run (same seeds, one prompt per batch), with every prompt once, in order."""

    def command(out: Path) -> list[str]:
        return [sys.executable, "training/explore.py", "--set", f"base_model={tiny_dir}", "--set",
                f"run_dir={run_dir}", "--set", "adapter=explorer-stage1", "--set",
                f"adapters_dir={run_dir / 'adapters'}", "--set", f"out={out}", "--set", "prompts_per_batch=1",
                "--set", "max_prompts=10", "--set", "max_new_tokens=8", "--set", "device=cpu"]

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    whole = subprocess.run(command(tmp_path / "whole"), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    shard = out / "samples.rank0.jsonl"
    partial = None
    for at_least in (3, 6):
        first = subprocess.Popen(command(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while (not shard.exists() or shard.read_text().count("\n") < at_least) and first.poll() is None:
            assert time.time() < deadline, "exploration wrote nothing"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        partial = partial or ex.read_done(shard)
    assert not (out / "samples.jsonl").exists()

    second = subprocess.run(command(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    manifest = ins.read_manifest(run_dir / "instructions")
    train_ids = [p.id for p in data.Split.load(manifest["split"]).part(data.load(manifest["data"]).prompts(), "train")
                 if p.answers]
    assert [s["prompt_id"] for s in samples] == train_ids[:10]  # every prompt once, in order
    kept = {s["prompt_id"]: s for s in samples}
    assert all(kept[r["prompt_id"]] == r for r in partial)  # the work done before the kill was kept as it was
    for name in ("samples.jsonl", "records.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (out, tmp_path / "whole")]
    for key in ("prompts", "accepted", "records", "samples_hash", "records_hash"):
        assert summaries[0][key] == summaries[1][key], key


@pytest.mark.slow
def test_two_processes_share_the_prompts_and_merge_them_in_order(tiny_dir, run_dir, tmp_path):
    """Under torchrun each process explores its own share; the merged files list every prompt once,
    in training order, and a second two-process run gives the same bytes."""

    def explore_with_two(out: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "training/explore.py", "--set", f"base_model={tiny_dir}", "--set", f"run_dir={run_dir}",
                   "--set", "adapter=explorer-stage1", "--set", f"adapters_dir={run_dir / 'adapters'}",
                   "--set", f"out={out}", "--set", "max_prompts=8", "--set", "prompts_per_batch=2",
                   "--set", "max_new_tokens=8", "--set", "device=cpu"]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    first = explore_with_two(tmp_path / "a")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    shards = [ex.read_done(tmp_path / "a" / f"samples.rank{r}.jsonl") for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 4  # each process explored half
    assert not {s["prompt_id"] for s in shards[0]} & {s["prompt_id"] for s in shards[1]}
    samples = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    manifest = ins.read_manifest(run_dir / "instructions")
    train_ids = [p.id for p in data.Split.load(manifest["split"]).part(data.load(manifest["data"]).prompts(), "train")
                 if p.answers]
    assert [s["prompt_id"] for s in samples] == train_ids[:8]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["processes"] == 2
    second = explore_with_two(tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    for name in ("samples.jsonl", "records.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_memory_budget_decides_prompts_per_call_from_the_kv_cache_size(tiny_dir, run_dir, engine, tmp_path,
                                                                       monkeypatch):
    settings = settings_for(tiny_dir, run_dir, memory_budget_gb=0.01, out=str(tmp_path / "budget"), max_prompts=7)
    # tiny: 2 layers × 2 KV heads × 16 dims × (keys + values) × 4 bytes = 512 bytes per position;
    # a prompt: 5 rows × (1024 image + 256 text + 12 new) positions, and its stored prefix (1024 + 256)
    per_prompt = 512 * (5 * (1024 + 256 + 12) + 1024 + 256)
    assert settings.batch_size(engine.model.config, 4) == int(0.01 * 2**30 // per_prompt) == 2
    assert settings_for(tiny_dir, run_dir).batch_size(engine.model.config, 4) == 4  # no budget: prompts_per_batch

    # the estimate bounds what a real batch of 2 image prompts puts in the cache, their prefixes included
    dataset = data.load(data.SAMPLE_DIR)
    prompts = [p for p in dataset.prompts() if p.image][:2]
    turns = [t for p in prompts for t in engine.turns_for(Request(task=p.task, image=dataset.images.open(p.image),
                                                                  text=p.question or "", num_candidates=5).validate())]
    width = engine.encode(turns)["input_ids"].shape[1]
    assert (len(turns) * (width + 12) + len(prompts) * width) * 512 <= 0.01 * 2**30

    sizes = []
    original = ex.explore_batch
    monkeypatch.setattr(ex, "explore_batch", lambda engine, batch, *a, **k: sizes.append(len(batch)) or
                        original(engine, batch, *a, **k))
    engine.adapters_dir = run_dir / "adapters"
    ex.explore(settings, engine=engine)
    assert sizes == [2, 2, 2, 1]
    with pytest.raises(ClotError, match="memory_budget_gb"):
        settings_for(tiny_dir, run_dir, memory_budget_gb=-1).validate()


def test_full_size_budget_counts_the_stored_prefixes(engine):
    """The 3B preset: 36 layers × 2 KV heads × 128 dims × (keys + values) × 2 bytes (bf16) = 36 KiB
    per position; a prompt takes 5 × (1024 + 256 + 64) + 1280 positions, so 8 GiB holds 29 prompts
    (34 if the prefixes kept for ranking and selection were not counted)."""
    config = tiny.model_config("3b", engine.tokenizer)
    settings = ex.ExploreSettings(memory_budget_gb=8, max_new_tokens=64)
    assert settings.batch_size(config, 2) == int(8 * 2**30 // (36 * 1024 * (5 * (1024 + 256 + 64) + 1280))) == 29


def test_a_call_keeps_every_prompts_prefix_for_its_questions(tiny_dir, run_dir, engine, tmp_path, monkeypatch):
    """With more prompts per call than the store held, each image prompt's prefix is prefilled once
    (by its generation) and found again by its ranking and selection questions."""
    monkeypatch.setattr(engine, "prefixes", PrefixStore(size=2))
    outcomes: dict[str, list[bool]] = {}
    find = engine.prefixes.find

    def spy(key, ids, minimum):
        found = find(key, ids, minimum)
        outcomes.setdefault(key[1], []).append(found is not None)
        return found

    monkeypatch.setattr(engine.prefixes, "find", spy)
    engine.adapters_dir = run_dir / "adapters"
    ex.explore(settings_for(tiny_dir, run_dir, prompts_per_batch=5, max_prompts=5, out=str(tmp_path / "store")),
               engine=engine)
    assert engine.prefixes.size == 5
    images = [found for key, found in outcomes.items() if key != "text"]
    assert len(images) == 3  # the first five training prompts: three with an image
    for found in images:
        assert len(found) >= 2 and found[0] is False and all(found[1:])
