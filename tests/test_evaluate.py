"""Evaluation: question sets, answering, metrics, the report and the creativity probe."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import statistics

import pytest

from clot import prompts
from clot.data import Prompt, Sample
from clot.tasks import Language, Task
from training import evaluate as ev

from conftest import make_adapter

NUM_SYNTHETIC = 2000  # prompts; five questions each


def synthetic_prompts(count: int) -> list[Prompt]:
    """Prompts with six answers of distinct stars, cycling through languages and task types."""
    out = []
    for n in range(count):
        lang = list(Language)[n % 3]
        task = list(Task)[(n // 3) % 3]
        image = None if task is Task.T2T else f"img{n}"
        question = f"question {n}" if task is Task.T2T else None
        answers = [Sample(lang, task, question, image, f"answer {n}.{k}", star=60 - 10 * k) for k in range(6)]
        out.append(Prompt(f"p{n:05d}", lang, task, question, image, answers))
    return out


class Oracle:
    """Knows the human answers and their stars."""

    def scores(self, questions):
        return [q["relevance"] if q["kind"] == ev.RANK else
                [float(i in q["correct"]) for i in range(len(q["options"]))] for q in questions]


class RandomScorer:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def scores(self, questions):
        return [[self.rng.random() for _ in q["options"]] for q in questions]


@pytest.fixture(scope="module")
def synthetic():
    return ev.build_questions(synthetic_prompts(NUM_SYNTHETIC), None, seed=0)


def pooled(result: dict, kind: str) -> float:
    cells = [c for key, c in result["cells"].items() if key.startswith("all/") and key.endswith(f"/{kind}")]
    return sum(c["value"] * c["n"] for c in cells) / sum(c["n"] for c in cells)


def test_synthetic_questions_have_the_promised_shape(synthetic):
    assert len(synthetic) == 5 * NUM_SYNTHETIC
    for q in synthetic[:50]:
        if q["kind"] == ev.RANK:
            assert sorted(q["relevance"]) == [0, 1, 2, 3, 4]
            assert [q["stars"][i] for i in q["order"]] == sorted(q["stars"], reverse=True)
        else:
            size, num_correct = ev.CHOICE[q["kind"]]
            assert len(q["options"]) == len(set(q["options"])) == size
            assert [q["sources"][i] for i in q["correct"]] == ["human"] * num_correct
            n = int(q["prompt_id"][1:])
            assert {q["options"][i] for i in q["correct"]} <= {f"answer {n}.0", f"answer {n}.1"}
    # Without a literal model the literal options fall back to other prompts' answers.
    assert {s for q in synthetic for s in q["sources"]} == {"human", "other_answer"}


def test_a_cap_per_cell_keeps_a_subset_of_the_same_questions(synthetic):
    capped = ev.build_questions(synthetic_prompts(NUM_SYNTHETIC), None, seed=0, max_per_cell=7)
    assert set(ev.cell_counts(capped).values()) == {7}
    by_id = {q["id"]: q for q in synthetic}
    assert all(by_id[q["id"]] == q for q in capped)


def test_oracle_scores_100_percent(synthetic):
    result = ev.run_scorer(Oracle(), synthetic, batch_size=500)
    assert all(cell["value"] == 1.0 for cell in result["cells"].values())
    assert result["parse_failures"] == 0


def test_random_scorer_lands_at_chance(synthetic):
    result = ev.run_scorer(RandomScorer(), synthetic, batch_size=500)
    # n = 2000 per kind: the standard error of an accuracy is at most 0.011.
    for kind, expected in (("2T1", 1 / 2), ("3T1", 1 / 3), ("4T1", 1 / 4), ("5T2", 1 / 10)):
        assert pooled(result, kind) == pytest.approx(expected, abs=0.035), kind
    assert pooled(result, ev.RANK) == pytest.approx(ev.random_ndcg([4, 3, 2, 1, 0]), abs=0.01)
    chance = {"2T1": 1 / 2, "3T1": 1 / 3, "4T1": 1 / 4, "5T2": 1 / 10, ev.RANK: ev.random_ndcg([4, 3, 2, 1, 0])}
    for key, cell in result["cells"].items():  # the report's random row
        assert cell["chance"] == pytest.approx(chance[key.split("/")[2]])


def test_ndcg_of_the_perfect_order_is_one_and_of_the_reverse_is_below_chance():
    relevance = [1, 4, 0, 3, 2]
    perfect = sorted(range(5), key=lambda i: -relevance[i])
    assert ev.ndcg(relevance, perfect) == 1.0
    assert ev.ndcg(relevance, perfect[::-1]) < ev.random_ndcg(relevance) < 1.0


def test_random_baseline_closed_form_matches_every_order_and_a_simulation():
    relevance = [4, 3, 2, 1, 0]
    exact = statistics.fmean(ev.ndcg(relevance, list(order)) for order in itertools.permutations(range(5)))
    assert ev.random_ndcg(relevance) == pytest.approx(exact, abs=1e-12)
    assert ev.random_ndcg(relevance) == pytest.approx(0.8052, abs=1e-4)  # the number the report states
    rng = random.Random(1)
    simulated = statistics.fmean(ev.ndcg(relevance, rng.sample(range(5), 5)) for _ in range(20000))
    assert simulated == pytest.approx(exact, abs=0.003)
    stars = [120, 3, 45, 7, 60]  # the formula holds for any gains, e.g. raw star counts
    exact = statistics.fmean(ev.ndcg(stars, list(order)) for order in itertools.permutations(range(5)))
    assert ev.random_ndcg(stars) == pytest.approx(exact, abs=1e-12)


def test_generated_picks_become_scores_that_grade_as_parsed():
    q = {"kind": "5T2", "correct": [1, 3], "options": list("abcde")}
    assert ev.grade(q, ev.picks_to_scores([3, 1], 5)) == 1.0
    assert ev.grade(q, ev.picks_to_scores([1, 2], 5)) == 0.0
    assert ev.grade(q, None) == 0.0
    rank = {"kind": ev.RANK, "relevance": [0, 4, 3, 2, 1], "options": list("abcde")}
    assert ev.grade(rank, ev.picks_to_scores([1, 2, 3, 4, 0], 5)) == 1.0


# ---------------------------------------------------------------- with the tiny model on the sample
def settings_for(tmp_path, **extra) -> ev.EvalSettings:
    shared = tmp_path / "shared"
    return ev.EvalSettings(run_dir=str(tmp_path / "run"), split=str(shared / "split.json"), test_ratio=0.2,
                           literal_cache=str(shared / "literal-cache.json"), literal_max_new_tokens=12,
                           device="cpu", **extra)


def test_question_sets_are_byte_identical_for_one_seed(engine, tmp_path):
    files = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        settings = settings_for(tmp_path, seed=seed, questions=str(tmp_path / f"{name}.json"))
        saved, path, _ = ev.question_set(settings, lambda: engine)
        files.append(path.read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]
    saved = json.loads(files[0])
    assert saved["version"] == 1 and saved["literal_model"] == "tiny"
    assert {"seed", "split_hash", "data_hash", "counts", "created_by"} <= set(saved)
    assert sum(saved["counts"].values()) == len(saved["questions"])
    # The literal model wrote the literal options: descriptions, plain answers and rewrites.
    assert {"description", "plain_answer", "rewrite"} <= {s for q in saved["questions"] for s in q["sources"]}
    # A saved set made with another seed is never silently reused.
    with pytest.raises(ev.ClotError, match="seed"):
        ev.question_set(settings_for(tmp_path, seed=5, questions=str(tmp_path / "a.json")), lambda: engine)


def test_report_files_have_a_row_per_model_and_models_are_resumed(engine, tmp_path, artifacts, tiny_embedder):
    make_adapter(engine, "eval-stage1", seed=3)
    settings = settings_for(tmp_path, out=str(tmp_path / "eval"), embedding_model=str(tiny_embedder),
                            creativity_samples=2, creativity_max_new_tokens=24)
    with pytest.raises(ev.ClotError, match="No adapter named missing"):
        ev.evaluate(settings, ["base", "missing"], engine=engine)
    report = ev.evaluate(settings, ["base", "eval-stage1"], engine=engine)
    out = tmp_path / "eval"
    assert list(report["models"]) == ["base", "eval-stage1"]
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["models"]["base"]["cells"] == report["models"]["base"]["cells"]
    total = report["questions"]["total"]
    for name in ("base", "eval-stage1"):
        cells = report["models"][name]["cells"]
        assert sum(c["n"] for key, c in cells.items() if key.startswith("all/")) == total
    table = (out / "report.md").read_text(encoding="utf-8")
    for row in ("| base |", "| eval-stage1 |", "| random |", "| questions |", "## All languages", "NDCG@5 ="):
        assert row in table
    header = next(line for line in table.splitlines() if line.startswith("| model | I2T 3T1"))
    assert header.split(" | ")[1:5] == ["I2T 3T1", "I2T 4T1", "I2T 5T2", "I2T Rank"]  # Table 2's order
    assert (out / "chart-all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    creativity = table.split("## Creativity probe")[1]
    assert "| base |" in creativity and "| eval-stage1 |" in creativity
    assert set(report["models"]["eval-stage1"]["creativity"]["languages"]) == {"en", "zh", "ja"}
    target = artifacts / "eval-tiny"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(out, target)
    # A finished model is not asked again; --force asks again.
    stamp = (out / "models" / "base.json").stat().st_mtime_ns
    ev.evaluate(settings, ["base"], engine=engine)
    assert (out / "models" / "base.json").stat().st_mtime_ns == stamp
    ev.evaluate(settings, ["base"], engine=engine, force=True)
    assert (out / "models" / "base.json").stat().st_mtime_ns != stamp


def test_the_probe_is_skipped_without_an_embedder_and_added_to_finished_models_later(engine, tmp_path, tiny_embedder):
    settings = settings_for(tmp_path, out=str(tmp_path / "eval"))
    first = ev.evaluate(settings, ["base"], engine=engine)
    assert "Skipped: no `embedding_model`" in first["creativity_note"]
    assert "Skipped" in (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    settings.embedding_model, settings.creativity_samples = str(tiny_embedder), 1
    second = ev.evaluate(settings, ["base"], engine=engine)
    assert second["models"]["base"]["created"] == first["models"]["base"]["created"]  # not scored again
    assert second["models"]["base"]["creativity"]["embedding_model"] == str(tiny_embedder)


def test_generation_parse_failures_are_counted(engine, tmp_path):
    settings = settings_for(tmp_path, out=str(tmp_path / "gen"), answer_mode="generate", max_new_tokens=16,
                            batch_size=16)
    report = ev.evaluate(settings, ["base"], engine=engine)
    questions = json.loads((tmp_path / "gen" / "questions.json").read_text(encoding="utf-8"))["questions"]
    scorer = ev.EngineScorer(engine, ev.oogiri.load(settings.data).images)
    unparsed = 0
    for start in range(0, len(questions), settings.batch_size):
        choices = [scorer.choice(q) for q in questions[start:start + settings.batch_size]]
        unparsed += sum(a is None for a in engine.answer_by_generation(choices, max_new_tokens=16))
    assert unparsed > 0  # a random model rarely writes "A. ..." answers
    assert report["models"]["base"]["parse_failures"] == unparsed
    cells = report["models"]["base"]["cells"]
    assert sum(c["parse_failures"] for key, c in cells.items() if key.startswith("all/")) == unparsed
    assert "parse failures" in (tmp_path / "gen" / "report.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- creativity probe
def test_word_lists_are_parsed_from_lines_numbers_and_commas():
    text = "1. Cat\n2) volcano\n- spoon\n• cat\nice cream\n櫻、電車，雲"
    assert prompts.parse_word_list(text) == ["Cat", "volcano", "spoon", "櫻", "電車", "雲"]
    assert len(prompts.parse_word_list("\n".join(f"w{i}" for i in range(15)))) == 10


def test_divergence_is_mean_pairwise_cosine_distance_times_100():
    def orthogonal(words):
        return [[float(i == j) for j in range(len(words))] for i in range(len(words))]

    assert ev.divergence_score(["a", "b", "c"], orthogonal) == pytest.approx(100.0)
    assert ev.divergence_score(["a", "b"], lambda words: [[1.0, 2.0]] * len(words)) == pytest.approx(0.0, abs=1e-4)
    # x ⟂ y (distance 1), and d at 45° from each (distance 1 - 1/√2): computed by hand.
    vectors = {"x": [1.0, 0.0], "y": [0.0, 1.0], "d": [1.0, 1.0]}
    expected = 100 * ((1 - 0) + (1 - 1 / math.sqrt(2)) + (1 - 1 / math.sqrt(2))) / 3
    assert ev.divergence_score(["x", "y", "d"], lambda ws: [vectors[w] for w in ws]) == pytest.approx(expected)


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    """A randomly initialised two-layer BERT with a small word vocabulary: deterministic, offline."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("embedder")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + \
        ["cat", "volcano", "spoon", "cloud", "train", "猫", "雲"]
    BertTokenizer(vocab={word: i for i, word in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_embedder_from_a_folder_scores_words_deterministically(tiny_embedder):
    embed = ev.Embedder(str(tiny_embedder))
    words = ["cat", "volcano", "spoon", "cloud"]
    score = ev.divergence_score(words, embed)
    assert 0 < score < 200
    assert ev.divergence_score(words, ev.Embedder(str(tiny_embedder))) == pytest.approx(score)
    assert ev.divergence_score(["cat", "cat"], embed) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ev.ClotError, match="embedding model"):
        ev.Embedder(str(tiny_embedder / "missing"))


def test_creativity_probe_runs_per_language(engine, tiny_embedder):
    probe = ev.creativity_probe(engine, ev.Embedder(str(tiny_embedder)), "base", samples=2, max_new_tokens=24)
    assert set(probe) == {"en", "zh", "ja"}
    for lang, result in probe.items():
        assert result["scored"] + result["unusable"] == 2
        assert result["score"] is None or 0 <= result["score"] <= 200
        assert all(len(words) <= 10 for words in result["lists"])
