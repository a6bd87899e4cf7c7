"""Stage 3, DPO from votes: pair rules, the frozen snapshot, refusals, and a short run on the tiny model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from clot import adapters
from clot.tasks import ClotError
from training import dpo

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_VOTES = ROOT / "assets" / "sample-votes"


def vote(kind: str, texts: list[str], choice, *, question: str = "Why was the calendar sad?", base: str = "tiny",
         excluded: bool = False, time: str = "2026-11-02T10:00:00Z", number: int = 0) -> dict:
    return {"vote_id": f"v{number}", "kind": kind, "blind": kind == "battle", "time": time, "session": "s",
            "excluded": excluded, "base_model": base,
            "prompt": {"task": "T2T", "language": "en", "text": question, "image": None},
            "candidates": [{"generation_id": f"g{i}", "adapter": "a", "adapter_created": None, "mode": "CLoT",
                            "condition": "", "text": text, "scores": None, "seed": 1, "sampling": None}
                           for i, text in enumerate(texts)],
            "choice": choice}


def pairs_of(votes: list[dict], **options) -> list[tuple[str, str]]:
    pairs, _ = dpo.build_pairs(votes, "tiny", **options)
    return sorted((p["chosen"], p["rejected"]) for p in pairs)


def test_a_battle_gives_one_pair_and_tie_or_bad_give_none():
    assert pairs_of([vote("battle", ["x", "y"], "A")]) == [("x", "y")]
    assert pairs_of([vote("battle", ["x", "y"], "B")]) == [("y", "x")]
    assert pairs_of([vote("battle", ["x", "y"], "tie"), vote("battle", ["x", "y"], "bad")]) == []


def test_a_pick_gives_the_winner_over_up_to_three_shown_candidates_and_none_gives_none():
    shown = ["a", "b", "c", "d", "e"]
    assert pairs_of([vote("pick", shown, 2)]) == [("c", "a"), ("c", "b"), ("c", "d")]  # the first three others
    assert pairs_of([vote("pick", shown, 0)], losers_per_pick=1) == [("a", "b")]
    assert pairs_of([vote("pick", shown, "none")]) == []


def test_excluded_votes_and_other_base_models_are_dropped():
    votes = [vote("battle", ["x", "y"], "A", excluded=True), vote("battle", ["p", "q"], "A", base="other/model"),
             vote("battle", ["m", "n"], "A")]
    pairs, counts = dpo.build_pairs(votes, "tiny")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("m", "n")]
    assert counts["dropped"] == {"excluded": 1, "other_base_model": 1}


def test_repeated_pairs_are_settled_by_majority_and_exact_ties_dropped():
    majority = [vote("battle", ["x", "y"], "A"), vote("battle", ["y", "x"], "B"), vote("battle", ["x", "y"], "B")]
    pairs, _ = dpo.build_pairs(majority, "tiny")
    assert [(p["chosen"], p["rejected"], p["votes_for"], p["votes_against"]) for p in pairs] == [("x", "y", 2, 1)]
    tied, counts = dpo.build_pairs([vote("battle", ["x", "y"], "A"), vote("pick", ["x", "y"], 1)], "tiny")
    assert tied == [] and counts["dropped"]["tied_pairs"] == 1
    # the same two texts under another prompt are another pair
    other = vote("battle", ["x", "y"], "B", question="Invent a useless superpower.")
    assert pairs_of(majority + [other]) == [("x", "y"), ("y", "x")]


def test_the_cutoff_keeps_only_earlier_votes():
    votes = [vote("battle", ["x", "y"], "A", time="2026-11-02T10:00:00Z"),
             vote("battle", ["p", "q"], "A", time="2026-11-03T10:00:00Z")]
    pairs, counts = dpo.build_pairs(votes, "tiny", until="2026-11-02T12:00:00+00:00")
    assert [p["chosen"] for p in pairs] == ["x"] and counts["vote_cutoff"] == "2026-11-02T10:00:00+00:00"


def test_the_split_is_by_prompt_and_seeded():
    votes = [vote("pick", ["a", "b", "c", "d"], k % 4, question=f"Question {k}?") for k in range(10)]
    pairs, _ = dpo.build_pairs(votes, "tiny")
    dpo.split_by_prompt(pairs, 0.3, seed=1)
    sides = {}
    for pair in pairs:
        sides.setdefault(pair["question"], set()).add(pair["split"])
    assert all(len(s) == 1 for s in sides.values())  # a prompt's pairs stay together
    assert sum(s == {"eval"} for s in sides.values()) == 3
    again, _ = dpo.build_pairs(votes, "tiny")
    dpo.split_by_prompt(again, 0.3, seed=1)
    assert [p["split"] for p in again] == [p["split"] for p in pairs]


def test_sample_votes_freeze_into_a_manifest_that_a_rerun_keeps(tmp_path):
    settings = dpo.DpoSettings(votes=str(SAMPLE_VOTES), run_dir=str(tmp_path / "stage3"))
    manifest = dpo.freeze(settings)
    counts = manifest["counts"]
    assert counts["votes"] == 42 and counts["dropped"]["excluded"] == 1 and counts["dropped"]["other_base_model"] == 2
    assert counts["dropped"]["tied_pairs"] == 1
    assert set(counts["pairs_by_language"]) == {"en", "zh", "ja"} and set(counts["pairs_by_kind"]) == {"battle", "pick"}
    assert counts["train_pairs"] + counts["eval_pairs"] == counts["pairs"] and counts["eval_pairs"] > 0
    pairs_file = settings.snapshot_dir / dpo.PAIRS_FILE
    assert hashlib.sha256(pairs_file.read_bytes()).hexdigest() == manifest["pairs_sha256"]
    assert manifest["vote_cutoff"] and manifest["base_model"] == "tiny"
    assert sorted(p.stem for p in (settings.snapshot_dir / "images").iterdir()) == sorted(manifest["images"])
    written = pairs_file.stat().st_mtime_ns
    assert dpo.freeze(settings) == manifest and pairs_file.stat().st_mtime_ns == written  # same manifest: untouched
    # new votes make a new snapshot
    export = tmp_path / "export"
    shutil.copytree(SAMPLE_VOTES, export)
    with open(export / "votes.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(vote("battle", ["New joke.", "Old joke."], "A", time="2026-12-01T00:00:00Z")) + "\n")
    changed = dpo.freeze(dpo.DpoSettings(votes=str(export), run_dir=str(tmp_path / "stage3")))
    assert changed["pairs_sha256"] != manifest["pairs_sha256"] and changed["vote_cutoff"].startswith("2026-12-01")


def test_too_few_pairs_and_precomputed_references_are_refused(tmp_path):
    base = dict(votes=str(SAMPLE_VOTES), run_dir=str(tmp_path / "run"), init_adapter=str(tmp_path / "stage2"))
    refusal = r"Only 35 training pairs .*46 pairs in all.*at least 100 \(setting min_pairs\)"
    with pytest.raises(ClotError, match=refusal):
        dpo.train(dpo.DpoSettings(min_pairs=100, **base))
    with pytest.raises(ClotError, match="precompute_ref_log_probs is not possible"):
        dpo.train(dpo.DpoSettings(precompute_ref_log_probs=True, **base))
    with pytest.raises(ClotError, match="is not a vote export"):
        dpo.freeze(dpo.DpoSettings(votes=str(tmp_path), run_dir=str(tmp_path / "run")))
    broken = tmp_path / "broken"
    broken.mkdir()
    good = json.dumps(vote("battle", ["x", "y"], "A"))
    for bad, reason in [('{"kind": "battle"}', "no vote_id"), ("not json", "Expecting value"),
                        (good.replace('"T2T"', '"X2T"'), "Unknown task type")]:
        (broken / "votes.jsonl").write_text(good + "\n" + bad + "\n")
        with pytest.raises(ClotError, match=f"line 2 is not a valid vote .*{reason}"):
            dpo.freeze(dpo.DpoSettings(votes=str(broken), run_dir=str(tmp_path / "run")))


def test_a_vote_database_is_read_through_its_export(tmp_path):
    from clot.votes import VoteStore

    database = tmp_path / "votes.sqlite"
    store = VoteStore(database, journal_dir=tmp_path / "journal")
    store.import_folder(SAMPLE_VOTES)  # the sample votes, now living in a real vote store
    manifest = dpo.freeze(dpo.DpoSettings(votes=str(database), run_dir=str(tmp_path / "run")))
    assert manifest["counts"]["votes"] == 42
    assert (tmp_path / "run" / "votes-export" / "votes.jsonl").is_file()
    with pytest.raises(ClotError, match="do not exist"):
        dpo.freeze(dpo.DpoSettings(votes=str(tmp_path / "nowhere.sqlite"), run_dir=str(tmp_path / "run")))


def test_the_stage3_adapter_becomes_default_only_above_its_parents_interval():
    assert dpo.becomes_default((1010.0, 1060.0), (950.0, 1005.0))
    assert not dpo.becomes_default((1000.0, 1060.0), (950.0, 1005.0))  # overlapping intervals
    assert not dpo.becomes_default((900.0, 940.0), (950.0, 1005.0))


@pytest.fixture(scope="module")
def trained(engine, tmp_path_factory):
    """Two DPO steps from a stage-2 adapter on the sample votes (one pair per step, logged every step)."""
    from conftest import make_adapter

    folder = tmp_path_factory.mktemp("dpo")
    parent = make_adapter(engine, "tiny-stage2-r1", seed=3, stage=2, round=1, scale=0.05, folder=folder / "adapters")
    settings = dpo.DpoSettings(base_model=engine.base_model, vote_base_model="tiny", votes=str(SAMPLE_VOTES),
                               run_dir=str(folder / "stage3"),
                               init_adapter=str(parent), adapters_dir=str(engine.adapters_dir),
                               adapter_name="tiny-stage3-r1", per_device_train_batch_size=1, max_steps=2,
                               logging_steps=1, save_steps=2, learning_rate=1e-3, max_length=1024, device="cpu")
    card = dpo.train(settings)
    return settings, card


def test_first_dpo_loss_is_ln2_and_the_card_records_the_run(trained):
    settings, card = trained
    rows = dpo.sft.read_csv(Path(settings.run_dir) / "loss.csv")
    first = rows[0]
    assert first["step"] == "1"
    assert float(first["dpo_loss"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert float(first["rewards/margins"]) == pytest.approx(0.0, abs=1e-5)
    assert float(first["loss"]) > math.log(2) + 0.1  # plus the SFT term on the chosen answer
    assert card["stage"] == 3 and card["method"] == "dpo" and card["parent"] == "tiny-stage2-r1"
    manifest = dpo.read_manifest(settings.snapshot_dir)
    assert card["pairs_sha256"] == manifest["pairs_sha256"] and card["vote_cutoff"] == manifest["vote_cutoff"]
    metrics = card["metrics"]
    assert metrics["steps"] == 2 and metrics["final_loss"] > 0
    assert 0.0 <= metrics["eval_reward_accuracy"] <= 1.0 and math.isfinite(metrics["eval_reward_margin"])


def test_saved_adapter_has_no_reference_keys_and_the_engine_loads_it(trained, engine):
    from safetensors import safe_open

    settings, _ = trained
    folder = Path(settings.adapters_dir) / settings.adapter_name
    with safe_open(str(folder / adapters.WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any(".ref." in key or key.startswith("ref.") for key in keys)
    assert not (folder / "ref").exists()
    engine.use_adapter(settings.adapter_name)
    assert engine.active_adapter == settings.adapter_name
    engine.use_adapter(None)


def test_a_rerun_on_the_same_manifest_is_skipped(trained, capsys):
    settings, card = trained
    again = dpo.train(settings)
    assert again["created"] == card["created"] and "skipped" in capsys.readouterr().out


def test_the_collator_scores_each_answer_up_to_its_first_im_end_with_the_image_twice(engine, tmp_path):
    from clot.data import ImageStore
    from clot.engine import load_processor

    settings = dpo.DpoSettings(votes=str(SAMPLE_VOTES), run_dir=str(tmp_path))
    dpo.freeze(settings)
    pairs = dpo.read_pairs(settings.snapshot_dir, "train") + dpo.read_pairs(settings.snapshot_dir, "eval")
    with_image = next(p for p in pairs if p["image"])
    without = next(p for p in pairs if not p["image"])
    processor = load_processor(engine.base_model, 64)
    collator = dpo.PreferenceCollator(processor, ImageStore(settings.snapshot_dir / "images"), 1024)
    rows = dpo._dataset([with_image, without]).to_list()
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 2  # chosen, then rejected
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer = processor.tokenizer
    answers = [with_image["chosen"], without["chosen"], with_image["rejected"], without["rejected"]]
    for row, answer in enumerate(answers):
        scored = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        assert scored[-1] == end and (scored == end).sum() == 1  # ends at the first <|im_end|>, no "\n" after it
        assert tokenizer.decode(scored[:-1]).strip() == answer


def test_a_longer_run_resumes_from_the_checkpoint(trained, capsys):
    settings, _ = trained  # runs last: it extends the shared run by one step under another adapter name
    longer = dataclasses.replace(settings, adapter_name="tiny-stage3-longer", max_steps=3)
    card = dpo.train(longer)
    assert "resuming from" in capsys.readouterr().out and card["metrics"]["steps"] == 3
    assert [row["step"] for row in dpo.sft.read_csv(Path(settings.run_dir) / "loss.csv")] == ["1", "2", "3"]
