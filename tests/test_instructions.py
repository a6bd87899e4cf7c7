"""Stage-1 instructions: every kind well formed, targets exact, no test prompt in training."""

from __future__ import annotations

import json
import random
import re

import pytest

from clot import data, prompts
from clot.tasks import ClotError, Language, Task
from training import instructions as ins


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    settings = ins.InstructionSettings(run_dir=str(run), test_ratio=0.2, literal_model="none",
                                       mixture={"generation": 1, "conditioned": 2, "masked": 1,
                                                "selection": 1, "ranking": 2})
    manifest = ins.build(settings)
    dataset = data.load(data.SAMPLE_DIR)
    by_id = {p.id: p for p in dataset.prompts()}
    return settings, manifest, by_id


def options_of(user: str) -> list[str]:
    block = user.split(prompts.OPTIONS_HEADER[Language.EN])[-1]
    for header in prompts.OPTIONS_HEADER.values():
        block = block.split(header)[-1]
    return [m.group(2) for m in re.finditer(r"^([A-H])\. (.*)$", block, re.M)]


def test_every_kind_task_and_language_is_present(built):
    settings, manifest, by_id = built
    records = ins.read_records(settings.out_dir, "train")
    assert {r["kind"] for r in records} == set(ins.KINDS)
    assert {(r["task"], r["lang"]) for r in records} == {(t.value, l.value) for t in Task for l in Language}
    assert sum(manifest["counts"]["train"].values()) == len(records) == manifest["files"]["train"]["records"]
    for r in records:
        assert set(r) == {"id", "kind", "task", "lang", "prompt_id", "image", "user", "answer"}
        assert r["answer"].strip()
        lang, task = Language(r["lang"]), Task(r["task"])
        assert any(r["user"].startswith(opener) for opener in prompts.OPENER[lang])
        assert any(brief in r["user"] for brief in prompts.TASK_BRIEF[task][lang])
        assert r["image"] == by_id[r["prompt_id"]].image and (r["image"] or not task.needs_image)
    assert len({r["id"] for r in records}) == len(records)


def test_generation_conditioned_and_masked_targets(built):
    settings, _, by_id = built
    for r in ins.read_records(settings.out_dir, "train"):
        human = [a.text for a in by_id[r["prompt_id"]].answers]
        lang = Language(r["lang"])
        if r["kind"] == "generation":
            assert r["answer"] in human and "[MASK]" not in r["user"]
            assert not any(c.split("{")[0] in r["user"] for c in [prompts.CONDITION[lang]])
        elif r["kind"] == "conditioned":
            word = re.search(r"[“「]([^”」]+)[”」]|“([^”]+)”", r["user"])
            assert r["answer"] in human
            assert word and (word.group(1) or word.group(2)).lower() in r["answer"].lower()
        elif r["kind"] == "masked":
            masked = r["user"].split("\n")[-2].split("：" if lang is not Language.EN else ": ", 1)[1]
            head, tail = masked.split(ins.MASK)
            assert r["answer"] in human
            assert r["answer"].startswith(head) and r["answer"].endswith(tail)
            assert len(r["answer"]) > len(head) + len(tail)


def test_selection_target_letter_points_at_the_human_answer(built):
    settings, _, by_id = built
    selections = [r for r in ins.read_records(settings.out_dir, "train") if r["kind"] == "selection"]
    assert selections
    for r in selections:
        options = options_of(r["user"])
        assert len(options) == settings.num_options
        picked = prompts.parse_selection(r["answer"], len(options))
        own = {a.text for a in by_id[r["prompt_id"]].answers}
        assert picked is not None and options[picked[0]] in own
        assert r["answer"] == f"{prompts.LETTERS[picked[0]]}. {options[picked[0]]}"
        assert sum(o in own for o in options) == 1  # the distractors are not this prompt's answers
    letters = {prompts.parse_selection(r["answer"], settings.num_options)[0] for r in selections}
    assert len(letters) == settings.num_options  # options are shuffled: the answer is not always A


def test_ranking_order_follows_stars(built):
    settings, _, by_id = built
    rankings = [r for r in ins.read_records(settings.out_dir, "train") if r["kind"] == "ranking"]
    assert rankings
    for r in rankings:
        stars = {a.text: a.star for a in by_id[r["prompt_id"]].answers}
        options = options_of(r["user"])
        order = prompts.parse_ranking(r["answer"], len(options))
        assert len(options) == 5 and order is not None
        ranked = [stars[options[i]] for i in order]
        assert ranked == sorted(ranked, reverse=True) and len(set(ranked)) == 5
        assert r["answer"] == prompts.ranking_target(options, order)


def test_test_prompts_never_reach_training(built):
    settings, manifest, by_id = built
    split = data.Split.load(settings.split_path)
    assert manifest["split_hash"] == split.hash
    train = ins.read_records(settings.out_dir, "train")
    test = ins.read_records(settings.out_dir, "test")
    assert {r["prompt_id"] for r in train} <= set(split.train)
    assert {r["prompt_id"] for r in test} <= set(split.test) and test
    test_answers = {a.text for pid in split.test for a in by_id[pid].answers}
    for r in train:
        assert not any(option in test_answers for option in options_of(r["user"]))
    saved = json.loads((settings.out_dir / "nouns.json").read_text(encoding="utf-8"))
    assert saved["provenance"]["split_hash"] == split.hash


def test_settings_are_checked():
    with pytest.raises(ClotError, match="mixture"):
        ins.InstructionSettings(mixture={"jokes": 1}).validate()
    with pytest.raises(ClotError, match="num_options"):
        ins.InstructionSettings(num_options=9).validate()


def test_command_prints_counts_per_kind_task_language(tmp_path, capsys):
    code = ins.main(["--config", "training/configs/tiny.yaml", "--set", f"run_dir={tmp_path}",
                     "--set", "literal_model=none", "--set", "mixture={generation: 1}"])
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"generation\s+IT2T\s+ja\s+\d+", out) and "total" in out
    assert (tmp_path / "instructions" / "train.jsonl").is_file()


def test_literal_writer_asks_the_model_once_and_caches_on_disk(engine, tmp_path):
    dataset = data.load(data.SAMPLE_DIR, languages=["en"])
    chosen = [p for p in dataset.prompts() if p.task is Task.I2T][:1] + \
             [p for p in dataset.prompts() if p.task is Task.T2T][:1]
    cache = tmp_path / "cache.json"
    writer = ins.LiteralWriter(engine, "tiny", dataset.images, cache, batch_size=4, max_new_tokens=6)
    writer.prepare(chosen)
    assert writer.description(chosen[0]) and writer.rewrite(chosen[1].answers[0])
    assert writer.description(chosen[1]) == ""  # T2T prompts have no picture to describe
    expected = 1 + sum(len(p.answers) for p in chosen)
    assert len(json.loads(cache.read_text(encoding="utf-8"))) == expected

    class NoModel:
        def sample(self, *args, **kwargs):
            raise AssertionError("cached texts must not be generated again")

    again = ins.LiteralWriter(NoModel(), "tiny", dataset.images, cache)
    again.prepare(chosen)
    assert again.description(chosen[0]) == writer.description(chosen[0])
    other_model = ins.LiteralWriter(engine, "another-model", dataset.images, cache)
    assert other_model.description(chosen[0]) == ""  # the cache is keyed by model too

    builder = ins.Builder(ins.InstructionSettings(num_options=4), dataset.prompts(), writer, random.Random(0))
    builder.add_selection(chosen[0], chosen[0].answers[0])
    options = options_of(builder.records[0]["user"])
    assert prompts.one_line(writer.description(chosen[0])) in options
    assert prompts.one_line(writer.rewrite(chosen[0].answers[0])) in options


def test_literal_writer_fills_each_generate_call_up_to_the_memory_budget(engine, tmp_path):
    """Rows with a picture and text-only rows go in separate calls, each as many as the KV-cache budget holds:
    tiny: 512 bytes per position; an image row 1024 + 256 + 4 positions, a text row 256 + 4."""
    dataset = data.load(data.SAMPLE_DIR, languages=["en"])
    chosen = [p for p in dataset.prompts() if p.task is Task.I2T][:3] + \
             [p for p in dataset.prompts() if p.task is Task.T2T][:4]
    budget_gb = 2.5 * 512 * (1024 + 256 + 4) / 2**30  # two and a half image rows

    class Recording:
        model = engine.model
        calls: list[list[bool]] = []  # per generate call: whether each row has a picture

        def sample(self, turns, sampling):
            self.calls.append([turn.image is not None for turn in turns])
            return engine.sample(turns, sampling)

    spy = Recording()
    writer = ins.LiteralWriter(spy, "tiny", dataset.images, tmp_path / "cache.json", max_new_tokens=4,
                               memory_budget_gb=budget_gb)
    assert (writer.rows_per_call(True), writer.rows_per_call(False)) == (2, int(2.5 * 1284 / 260))
    writer.prepare(chosen)
    rewrites = sum(len(p.answers) for p in chosen)
    assert spy.calls == [[True, True], [True]] + [[False] * 12] * (rewrites // 12) + [[False] * (rewrites % 12)]
    assert all(writer.description(p) for p in chosen[:3]) and all(writer.rewrite(a) for p in chosen for a in p.answers)
    assert len(json.loads((tmp_path / "cache.json").read_text(encoding="utf-8"))) == 3 + rewrites


def test_building_again_gives_the_same_records(built, tmp_path):
    settings, manifest, _ = built
    again = ins.InstructionSettings(run_dir=str(tmp_path), split=str(settings.split_path), literal_model="none",
                                    mixture=settings.mixture)
    assert ins.build(again)["files"] == manifest["files"]
