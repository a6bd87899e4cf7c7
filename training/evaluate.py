"""The paper's evaluation: choice (2T1, 3T1, 4T1, 5T2) and ranking questions, a report, a creativity probe.

    python training/evaluate.py --config training/configs/tiny.yaml --models base,tiny-stage1

1. Questions are built once from the saved test split and written to a versioned JSON file with
   their provenance (seed, split and data hashes, literal model); every model answers that file.
2. Each model (the bare base, or a published adapter) answers by option-letter probabilities
   (`answer_mode: score`, default) or by greedy generation and parsing (`answer_mode: generate`,
   as the paper did; an unparsable answer counts as wrong and as a parse failure).
3. Results go to <out>/models/<name>.json (a finished model is skipped next time unless --force),
   then report.json, report.md (the layout of the paper's Table 2, pooled and per language, with
   the random baseline) and chart-<scope>.png.

Question record: {"id", "kind", "task", "lang", "prompt_id", "image", "question", "wording",
"options", "sources"} plus "correct" (option indices) for choice, or "stars", "relevance" and
"order" (indices, funniest first) for Rank.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import load_config, recipe_parser, resolve_base_model  # noqa: E402
from training.instructions import RANK_SIZE, DatasetSettings, LiteralWriter  # noqa: E402

from clot import adapters as registry  # noqa: E402
from clot import data as oogiri  # noqa: E402
from clot import prompts  # noqa: E402
from clot.adapters import write_json_atomic  # noqa: E402
from clot.tasks import ClotError, Language, Sampling, Task  # noqa: E402

log = logging.getLogger(__name__)

VERSION = 1
# Choice kinds: (number of options, number of correct ones). Each adds one option to the previous.
CHOICE = {"2T1": (2, 1), "3T1": (3, 1), "4T1": (4, 1), "5T2": (5, 2)}
RANK = "Rank"
TASKS = ("I2T", "T2T", "IT2T")
SCOPES = ("all", "en", "zh", "ja")
# Report columns: the paper's Table 2 first, then IT2T and 2T1, which it did not show.
COLUMNS = ([(t, k) for t in ("I2T", "T2T") for k in ("3T1", "4T1", "5T2", RANK)]
           + [("IT2T", k) for k in ("3T1", "4T1", "5T2", RANK)] + [(t, "2T1") for t in TASKS])
NDCG_DEFINITION = (
    "NDCG@5 = DCG / IDCG with DCG = sum_{i=1..5} rel(option at predicted position i) / log2(i + 1), "
    "IDCG = the DCG of the true order. rel = 4, 3, 2, 1, 0 for the answers with the most to the fewest "
    "stars (five distinct star counts). The predicted order sorts the options by the model's score, "
    "highest first (ties: letter order); an unparsable generated ranking scores 0. Random order: "
    "E[NDCG] = mean(rel) * sum_{i=1..5} 1/log2(i + 1) / IDCG = 0.8052 (exact over all 120 orders).")


@dataclass
class EvalSettings(DatasetSettings):
    max_per_cell: int = 0  # at most this many prompts per language × task × kind (0: all)
    literal_model: str = "base"  # writes literal distractors: "base", "none", or a hub id / path
    literal_cache: str = ""  # default <run_dir>/literal-cache.json (shared with instruction building)
    literal_batch_size: int = 8  # rows per generate call when literal_memory_budget_gb is 0
    literal_memory_budget_gb: float = 1.0  # KV-cache budget of one generate call (as in instruction building)
    literal_max_new_tokens: int = 48
    questions: str = ""  # question set file; default <out>/questions.json
    out: str = ""  # default <run_dir>/eval
    adapters_dir: str = "adapters"
    answer_mode: str = "score"  # "score" (option letters) or "generate" (greedy generation + parse)
    batch_size: int = 8
    max_new_tokens: int = 256  # for answer_mode generate
    embedding_model: str = ""  # creativity probe: a hub id or folder; empty skips the probe
    creativity_samples: int = 3  # word lists per language and model
    creativity_words: int = 10
    creativity_max_new_tokens: int = 96
    device: str = "auto"
    backend: str = "engine"  # who answers and writes literal texts: "engine" or "vllm" (clot/vllm_backend.py)
    vllm_url: str = ""  # empty with backend vllm: a local server for the duration of the evaluation
    vllm_model: str = ""

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path(self.run_dir) / "eval")

    @property
    def questions_path(self) -> Path:
        return Path(self.questions or self.out_dir / "questions.json")

    def validate(self) -> "EvalSettings":
        if self.answer_mode not in ("score", "generate"):
            raise ClotError(f"answer_mode must be score or generate, got {self.answer_mode!r}.")
        if self.batch_size < 1 or self.max_per_cell < 0 or self.creativity_samples < 0:
            raise ClotError("batch_size must be >= 1; max_per_cell and creativity_samples >= 0.")
        if self.creativity_words < 2:
            raise ClotError("creativity_words must be at least 2.")
        return self


# ---------------------------------------------------------------- building questions
def _other_answers(p: oogiri.Prompt, tiers: dict, count: int, avoid: set[str], rng: random.Random) -> list[str]:
    """Human answers to other prompts: same language and task first, then same language, then any.
    Random draws with rejection, so the cost does not grow with the size of the test split."""
    chosen: list[str] = []
    for key in ((p.lang, p.task), p.lang, None):
        tier = tiers.get(key, [])
        for _ in range(20 * count if tier else 0):
            if len(chosen) == count:
                return chosen
            prompt_id, text = rng.choice(tier)
            if prompt_id != p.id and text not in avoid and text not in chosen:
                chosen.append(text)
    return chosen


def _option_pool(p: oogiri.Prompt, literal: LiteralWriter | None, tiers: dict,
                 rng: random.Random) -> list[tuple[str, str]]:
    """The options of a prompt's choice questions as (text, source), in the order the kinds add them:
    human answer, literal text, unrelated answer, literal rewrite, second human answer. A literal text
    that is missing (no literal model) or repeats another option is replaced by an unrelated answer."""
    own = {a.text for a in p.answers}
    literal_text = rewrite = ""
    if literal is not None:
        literal_text = literal.plain_answer(p) if p.task is Task.T2T else literal.description(p)
        rewrite = literal.rewrite(p.answers[0])
    pool = [(p.answers[0].text, "human")]
    for text, source in ((literal_text, "plain_answer" if p.task is Task.T2T else "description"),
                         ("", "other_answer"), (rewrite, "rewrite")):
        taken = own | {t for t, _ in pool}
        if not text or text in taken:
            found = _other_answers(p, tiers, 1, taken, rng)
            if not found:
                return pool
            text, source = found[0], "other_answer"
        pool.append((text, source))
    if len(p.answers) >= 2 and p.answers[1].text not in {t for t, _ in pool}:
        pool.append((p.answers[1].text, "human"))
    return pool


def _choice_question(p: oogiri.Prompt, kind: str, pool: list[tuple[str, str]], seed: int) -> dict | None:
    size, num_correct = CHOICE[kind]
    if len(pool) < size:
        return None
    qid = f"{p.id}-{kind}"
    rng = random.Random(f"{seed}:{qid}")
    picked = pool[:size]
    rng.shuffle(picked)
    return {"id": qid, "kind": kind, "task": p.task.value, "lang": p.lang.value, "prompt_id": p.id,
            "image": p.image, "question": p.question or "", "wording": rng.randrange(prompts.NUM_WORDINGS),
            "options": [t for t, _ in picked], "sources": [s for _, s in picked],
            "correct": [i for i, (_, s) in enumerate(picked) if s == "human"][:num_correct]}


def _rank_question(p: oogiri.Prompt, seed: int) -> dict | None:
    if len(p.rankable) < RANK_SIZE:
        return None
    qid = f"{p.id}-{RANK}"
    rng = random.Random(f"{seed}:{qid}")
    chosen = rng.sample(p.rankable, RANK_SIZE)  # five answers of distinct stars, in random order
    order = sorted(range(RANK_SIZE), key=lambda i: -chosen[i].star)
    relevance = [0] * RANK_SIZE
    for place, i in enumerate(order):
        relevance[i] = RANK_SIZE - 1 - place
    return {"id": qid, "kind": RANK, "task": p.task.value, "lang": p.lang.value, "prompt_id": p.id,
            "image": p.image, "question": p.question or "", "wording": rng.randrange(prompts.NUM_WORDINGS),
            "options": [a.text for a in chosen], "sources": ["human"] * RANK_SIZE,
            "stars": [a.star for a in chosen], "relevance": relevance, "order": order}


def build_questions(test_prompts: list[oogiri.Prompt], literal: LiteralWriter | None, seed: int,
                    max_per_cell: int = 0) -> list[dict]:
    """Every question the test prompts allow, sorted by id. Each question's randomness comes from
    random.Random(f"{seed}:{id}"), so it does not depend on which other questions exist."""
    tiers: dict[object, list[tuple[str, str]]] = collections.defaultdict(list)
    for p in test_prompts:
        for a in p.answers:
            for key in ((p.lang, p.task), p.lang, None):
                tiers[key].append((p.id, a.text))
    questions = []
    for p in test_prompts:
        pool = _option_pool(p, literal, tiers, random.Random(f"{seed}:{p.id}"))
        questions += [q for kind in CHOICE if (q := _choice_question(p, kind, pool, seed))]
        if (q := _rank_question(p, seed)) is not None:
            questions.append(q)
    if max_per_cell:
        # A seeded hash order picks the same prompts whatever else the split holds.
        questions.sort(key=lambda q: hashlib.sha256(f"{seed}:{q['prompt_id']}".encode()).hexdigest())
        taken: collections.Counter = collections.Counter()
        kept = []
        for q in questions:
            cell = (q["lang"], q["task"], q["kind"])
            if taken[cell] < max_per_cell:
                taken[cell] += 1
                kept.append(q)
        questions = kept
    return sorted(questions, key=lambda q: q["id"])


def cell_counts(questions: list[dict]) -> dict[str, int]:
    """Questions per "lang/task/kind"."""
    return dict(sorted(collections.Counter(f"{q['lang']}/{q['task']}/{q['kind']}" for q in questions).items()))


def question_set(settings: EvalSettings, get_engine) -> tuple[dict, Path, oogiri.ImageStore]:
    """The saved question set when its provenance matches the settings, else a new one built and saved;
    its path; the dataset's images. `get_engine()` gives the engine (for writing literal texts)."""
    dataset = oogiri.load(settings.data, require_star=settings.require_star)
    all_prompts = dataset.prompts()
    split = oogiri.load_or_make_split(settings.split_path, all_prompts, settings.test_ratio, settings.seed)
    literal_id = "none" if settings.literal_model == "none" else (
        settings.base_model if settings.literal_model == "base" else settings.literal_model)
    provenance = {"version": VERSION, "seed": settings.seed, "split_hash": split.hash,
                  "data_hash": dataset.data_hash(), "literal_model": literal_id,
                  "max_per_cell": settings.max_per_cell}
    path = settings.questions_path
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        differ = [k for k, v in provenance.items() if saved.get(k) != v]
        if differ:
            raise ClotError(f"The question set {path} was made with other {', '.join(differ)}; every model "
                            "must answer the same questions, so delete it or set `questions` to a new file.")
        return saved, path, dataset.images
    test = split.part(all_prompts, "test")
    writer = None
    if literal_id != "none":
        engine = get_engine() if settings.literal_model == "base" else _load_engine(settings, literal_id)
        cache = settings.literal_cache or Path(settings.run_dir) / "literal-cache.json"
        writer = LiteralWriter(engine, literal_id, dataset.images, cache, settings.literal_batch_size,
                               settings.literal_max_new_tokens, settings.literal_memory_budget_gb)
        writer.prepare(test, plain_answers=True)
    questions = build_questions(test, writer, settings.seed, settings.max_per_cell)
    if not questions:
        raise ClotError("The test split gave no question (it needs prompts with at least one answer).")
    saved = {**provenance, "created_by": "training/evaluate.py", "counts": cell_counts(questions),
             "questions": questions}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, saved)
    return saved, path, dataset.images


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- answering
class Scorer(Protocol):
    """Gives each question one score per option (higher = funnier), or None when the model's
    answer could not be understood (a generated answer that does not parse)."""

    def scores(self, questions: list[dict]) -> list[list[float] | None]: ...


def picks_to_scores(picks: list[int], num_options: int) -> list[float]:
    """A parsed answer (picked letters, or a full order) as scores: earlier = higher, unnamed = 0."""
    scores = [0.0] * num_options
    for place, i in enumerate(picks):
        scores[i] = float(len(picks) - place)
    return scores


class EngineScorer:
    """Questions → clot.engine.Choice (image from the dataset) → the engine, with one adapter."""

    def __init__(self, engine, images: oogiri.ImageStore, adapter: str = registry.BASE,
                 answer_mode: str = "score", max_new_tokens: int = 256):
        self.engine = engine
        self.images = images
        self.adapter = adapter
        self.answer_mode = answer_mode
        self.max_new_tokens = max_new_tokens

    def choice(self, q: dict):
        from clot.engine import Choice

        kind, num_correct = ("rank", 1) if q["kind"] == RANK else ("select", CHOICE[q["kind"]][1])
        image = self.images.open(q["image"]) if q["image"] else None
        return Choice(kind, Task.parse(q["task"]), Language.parse(q["lang"]), q["options"], image,
                      q["question"], num_correct, q["wording"])

    def scores(self, questions: list[dict]) -> list[list[float] | None]:
        choices = [self.choice(q) for q in questions]
        if self.answer_mode == "score":
            return self.engine.score(choices, adapter=self.adapter)
        answers = self.engine.answer_by_generation(choices, adapter=self.adapter, max_new_tokens=self.max_new_tokens)
        return [None if a is None else picks_to_scores(a, len(q["options"])) for q, a in zip(questions, answers)]


def top(scores: list[float], k: int) -> list[int]:
    """The k highest-scored option indices (ties: letter order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


# ---------------------------------------------------------------- metrics
def dcg(gains: list[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg(relevance: list[float], predicted: list[int]) -> float:
    """NDCG of a predicted order (option indices, best first) given each option's relevance."""
    ideal = dcg(sorted(relevance, reverse=True))
    return dcg([relevance[i] for i in predicted]) / ideal if ideal else 1.0


def random_ndcg(relevance: list[float]) -> float:
    """Expected NDCG of a uniformly random order: every option is equally likely at every position,
    so E[DCG] = mean(rel) * sum of the discounts."""
    ideal = dcg(sorted(relevance, reverse=True))
    discounts = sum(1 / math.log2(i + 2) for i in range(len(relevance)))
    return (sum(relevance) / len(relevance)) * discounts / ideal if ideal else 1.0


def chance(q: dict) -> float:
    """What random answering scores on a question in expectation."""
    if q["kind"] == RANK:
        return random_ndcg(q["relevance"])
    size, num_correct = CHOICE[q["kind"]]
    return 1 / math.comb(size, num_correct)


def grade(q: dict, scores: list[float] | None) -> float:
    """1/0 for choice (all correct options among the top-scored), NDCG for Rank; 0 for no answer."""
    if scores is None:
        return 0.0
    if q["kind"] == RANK:
        return ndcg(q["relevance"], top(scores, len(scores)))
    return float(set(top(scores, len(q["correct"]))) == set(q["correct"]))


def summarise(questions: list[dict], values: dict[str, float], failures: set[str]) -> dict[str, dict]:
    """Mean value, count and parse failures per "scope/task/kind" (scope: all languages, or one)."""
    cells: dict[str, dict] = {}
    for q in questions:
        for scope in ("all", q["lang"]):
            cell = cells.setdefault(f"{scope}/{q['task']}/{q['kind']}",
                                    {"n": 0, "value": 0.0, "parse_failures": 0, "chance": 0.0})
            cell["n"] += 1
            cell["value"] += values[q["id"]]
            cell["chance"] += chance(q)
            cell["parse_failures"] += q["id"] in failures
    for cell in cells.values():
        cell["value"] /= cell["n"]
        cell["chance"] /= cell["n"]
    return dict(sorted(cells.items()))


def run_scorer(scorer: Scorer, questions: list[dict], batch_size: int = 8, desc: str = "") -> dict:
    """Ask every question in batches (with a progress bar); the per-question results and the cells."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(questions), desc=desc or "questions", unit="q") as bar:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            for q, s in zip(batch, scorer.scores(batch)):
                results.append({"id": q["id"], "scores": s, "value": grade(q, s)})
            bar.update(len(batch))
    failures = {r["id"] for r in results if r["scores"] is None}
    return {"cells": summarise(questions, {r["id"]: r["value"] for r in results}, failures),
            "parse_failures": len(failures), "results": results}


# ---------------------------------------------------------------- creativity probe
class Embedder:
    """Sentence embeddings from a local folder or hub id via transformers: mean of the last hidden
    states over real tokens (the pooling of MiniLM-class sentence-transformers models)."""

    def __init__(self, name: str):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).eval()
        except (OSError, ValueError) as err:
            raise ClotError(f"Could not load the embedding model {name!r} ({str(err).splitlines()[0][:120]}); "
                            "give a local folder with `embedding_model`.") from None

    def __call__(self, texts: list[str]):
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


def divergence_score(words: list[str], embed) -> float:
    """Mean pairwise cosine distance of the words' embeddings, times 100 (the DAT scale)."""
    import torch

    vectors = torch.nn.functional.normalize(torch.as_tensor(embed(words), dtype=torch.float32), dim=-1)
    similarity = vectors @ vectors.T
    n = len(words)
    pairs = n * (n - 1) / 2
    return float((1 - similarity[torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)]).sum() / pairs * 100)


def creativity_probe(engine, embed, adapter: str, samples: int, words: int = 10, max_new_tokens: int = 96,
                     seed: int = 0) -> dict:
    """Per language: `samples` sampled word lists, each scored when it has at least two words."""
    from clot.engine import Turn

    out = {}
    for lang in Language:
        turn = Turn(prompts.unrelated_nouns_prompt(lang, words), lang)
        texts = engine.sample([turn] * samples, Sampling(max_new_tokens=max_new_tokens, seed=seed), adapter=adapter)
        lists = [prompts.parse_word_list(t, words) for t in texts]
        scored = [divergence_score(w, embed) for w in lists if len(w) >= 2]
        out[lang.value] = {"score": sum(scored) / len(scored) if scored else None, "scored": len(scored),
                           "unusable": samples - len(scored), "lists": lists}
    return out


# ---------------------------------------------------------------- the report
NO_PROBE = ("Skipped: no `embedding_model` is configured (a local folder or hub id of a sentence-embedding "
            "model).")


def _write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)

def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _probe_cell(result: dict) -> str:
    """The mean score and how many word lists were usable, e.g. "71.3 (3/3)"."""
    score = "–" if result["score"] is None else f"{result['score']:.1f}"
    return f"{score} ({result['scored']}/{result['scored'] + result['unusable']})"


def markdown(report: dict) -> str:
    """Tables in the layout of the paper's Table 2 (accuracy / NDCG in %), pooled then per language."""
    lines = [f"# CLoT evaluation — {report['created']}", "",
             f"Question set `{report['questions']['path']}` (hash {report['questions']['hash']}, "
             f"{report['questions']['total']} questions, seed {report['questions']['seed']}, "
             f"literal model `{report['questions']['literal_model']}`); answers by "
             f"**{report['answer_mode']}**.", "",
             "Accuracy for 2T1–5T2 (5T2: both correct options are the two top-scored), NDCG@5 for Rank, in %. "
             "`random` is the expected score of answering at random; `–` means no question of that kind.", ""]
    columns = [c for c in COLUMNS if any(f"all/{c[0]}/{c[1]}" in m["cells"] for m in report["models"].values())]
    for scope in SCOPES:
        if not any(f"{scope}/{t}/{k}" in m["cells"] for m in report["models"].values() for t, k in columns):
            continue
        lines += [f"## {'All languages' if scope == 'all' else scope}", "",
                  "| model | " + " | ".join(f"{t} {k}" for t, k in columns) + " | parse failures |",
                  "|---" * (len(columns) + 2) + "|"]
        any_model = next(iter(report["models"].values()))
        for name, model in report["models"].items():
            cells = [model["cells"].get(f"{scope}/{t}/{k}") for t, k in columns]
            failures = sum(c["parse_failures"] for c in cells if c)
            lines.append(f"| {name} | " + " | ".join(_fmt(c and c["value"]) for c in cells) + f" | {failures} |")
        cells = [any_model["cells"].get(f"{scope}/{t}/{k}") for t, k in columns]
        lines.append("| random | " + " | ".join(_fmt(c and c["chance"]) for c in cells) + " | |")
        lines.append("| questions | " + " | ".join(str(c["n"]) if c else "0" for c in cells) + " | |")
        lines.append("")
    creativity = {n: m["creativity"]["languages"] for n, m in report["models"].items() if m.get("creativity")}
    lines += ["## Creativity probe (Divergent-Association style)", ""]
    if creativity:
        lines += [f"Mean pairwise cosine distance × 100 of up to {report['creativity_words']} generated "
                  f"nouns, embeddings by `{report['embedding_model']}`; in brackets the usable word lists "
                  "(at least two single words).", "",
                  "| model | " + " | ".join(lang.value for lang in Language) + " |", "|---" * 4 + "|"]
        for name, probe in creativity.items():
            lines.append(f"| {name} | " + " | ".join(_probe_cell(probe[lang.value]) for lang in Language) + " |")
    else:
        lines.append(report["creativity_note"])
    lines += ["", "## Definitions", "", NDCG_DEFINITION, ""]
    return "\n".join(lines)


def charts(report: dict, out: Path) -> list[Path]:
    """One grouped bar chart per scope: a bar per model and column, a tick at the random baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = report["models"]
    for scope in SCOPES:
        columns = [c for c in COLUMNS if any(f"{scope}/{c[0]}/{c[1]}" in m["cells"] for m in models.values())]
        if not columns:
            continue
        width = 0.8 / max(1, len(models))
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(columns) + 2), 4))
        for j, (name, model) in enumerate(models.items()):
            values = [100 * model["cells"].get(f"{scope}/{t}/{k}", {}).get("value", 0) for t, k in columns]
            ax.bar([i + j * width for i in range(len(columns))], values, width, label=name)
        first = next(iter(models.values()))["cells"]
        for i, (t, k) in enumerate(columns):
            level = 100 * first[f"{scope}/{t}/{k}"]["chance"] if f"{scope}/{t}/{k}" in first else None
            if level is not None:
                ax.hlines(level, i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="dashed",
                          label="random" if i == 0 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], [f"{t}\n{k}" for t, k in columns])
        ax.set_ylabel("accuracy / NDCG (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"CLoT evaluation — {'all languages' if scope == 'all' else scope}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"chart-{scope}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        _write_atomic(path, buffer.getvalue())
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the command
def _load_engine(settings: EvalSettings, model: str):
    from clot.engine import Engine

    return Engine.load(resolve_base_model(model), adapters_dir=settings.adapters_dir, device=settings.device)


def evaluate(settings: EvalSettings, models: list[str], engine=None, force: bool = False,
             scorers: dict[str, Scorer] | None = None) -> dict:
    """Build (or reuse) the question set, run every model on it, and write the report files.

    `models` are "base" and adapter names; `engine` may be an already loaded base model; `scorers`
    replaces the engine for the named models (tests plug an oracle or a random scorer here).
    Returns the report (also written as <out>/report.json)."""
    with contextlib.ExitStack() as backends:  # a local vLLM server lives as long as the evaluation
        return _evaluate(settings, models, engine, force, scorers, backends)


def _evaluate(settings: EvalSettings, models: list[str], engine, force: bool, scorers: dict[str, Scorer] | None,
              backends: contextlib.ExitStack) -> dict:
    settings.validate()
    if not models:
        raise ClotError("Name at least one model to evaluate (base, or an adapter name).")
    adapters_dir = Path(engine.adapters_dir if engine is not None else settings.adapters_dir)
    missing = [m for m in models if m != registry.BASE and m not in (scorers or {}) and not (adapters_dir / m).is_dir()]
    if missing:  # say so now, not after hours of evaluating the others
        raise ClotError(f"No adapter named {', '.join(missing)} in {adapters_dir}; publish it first or "
                        "set adapters_dir.")
    out = settings.out_dir
    (out / "models").mkdir(parents=True, exist_ok=True)
    loaded = {"engine": engine}

    def get_engine():
        if loaded["engine"] is None:
            from clot.vllm_backend import open_backend

            loaded["engine"] = backends.enter_context(open_backend(
                settings.backend, resolve_base_model(settings.base_model), adapters_dir=settings.adapters_dir,
                vllm_url=settings.vllm_url, vllm_model=settings.vllm_model, log_dir=settings.out_dir,
                device=settings.device))
        return loaded["engine"]

    saved, path, images = question_set(settings, get_engine)
    questions, qhash = saved["questions"], file_hash(path)
    embed = Embedder(settings.embedding_model) if settings.embedding_model and settings.creativity_samples else None
    report_models = {}
    for name in models:
        registry.check_name(name)
        file = out / "models" / f"{name}.json"
        result = json.loads(file.read_text(encoding="utf-8")) if file.is_file() and not force else {}
        if (result.get("questions_hash"), result.get("answer_mode")) == (qhash, settings.answer_mode):
            log.info("%s: already evaluated on this question set (%s)", name, file)
        else:
            scorer = (scorers or {}).get(name) or EngineScorer(get_engine(), images, name, settings.answer_mode,
                                                               settings.max_new_tokens)
            result = {"model": name, "questions_hash": qhash, "answer_mode": settings.answer_mode,
                      "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      **run_scorer(scorer, questions, settings.batch_size, desc=name)}
            write_json_atomic(file, result)
        # The probe is added to finished models too, when an embedding model is configured later.
        if embed is not None and name not in (scorers or {}) and \
                (result.get("creativity") or {}).get("embedding_model") != settings.embedding_model:
            probe = creativity_probe(get_engine(), embed, name, settings.creativity_samples,
                                     settings.creativity_words, settings.creativity_max_new_tokens, settings.seed)
            result["creativity"] = {"embedding_model": settings.embedding_model, "languages": probe}
            write_json_atomic(file, result)
        report_models[name] = result
    report = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "questions": {"path": str(path), "hash": qhash, "total": len(questions), "seed": saved["seed"],
                            "split_hash": saved["split_hash"], "data_hash": saved["data_hash"],
                            "literal_model": saved["literal_model"], "counts": saved["counts"]},
              "answer_mode": settings.answer_mode, "ndcg_definition": NDCG_DEFINITION,
              "embedding_model": settings.embedding_model or None, "creativity_words": settings.creativity_words,
              "creativity_note": "" if embed else NO_PROBE, "settings": asdict(settings),
              "models": {n: {k: v for k, v in m.items() if k != "results"} for n, m in report_models.items()}}
    write_json_atomic(out / "report.json", report)
    _write_atomic(out / "report.md", markdown(report).encode("utf-8"))
    charts(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser(__doc__, "evaluation")
    parser.add_argument("--models", default="base", help="comma-separated: base and/or adapter names")
    parser.add_argument("--out", help="output folder (default <run_dir>/eval)")
    parser.add_argument("--force", action="store_true", help="evaluate models again even if results exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_config(EvalSettings, args.config, "evaluation", args.set)
        if args.out:
            settings.out = args.out
        evaluate(settings, [m.strip() for m in args.models.split(",") if m.strip()], force=args.force)
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((settings.out_dir / "report.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
