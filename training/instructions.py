"""Oogiri-GO samples → stage-1 instruction records: the paper's five kinds.

    python training/instructions.py --config training/configs/tiny.yaml [--set num_options=5]

Writes <run_dir>/instructions/{train,test}.jsonl (test = the held-out prompts, for evaluation
loss), manifest.json (settings, hashes, counts) and nouns.json (the noun set S of the training
answers), and prints counts per kind × task × language. Images are referenced by id, not copied.

A record: {"id", "kind", "task", "lang", "prompt_id", "image", "user", "answer"} where `user` is
built by clot.prompts and `answer` is the exact target text.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from training.config import (PROMPT_TEXT_TOKENS, load_config, recipe_parser,  # noqa: E402
                             resolve_base_model, rows_within_budget)

from clot import data as oogiri  # noqa: E402
from clot import prompts  # noqa: E402
from clot.adapters import write_json_atomic  # noqa: E402
from clot.nouns import answer_condition, build_noun_set, extract_nouns  # noqa: E402
from clot.tasks import ClotError, Language, Task  # noqa: E402

log = logging.getLogger(__name__)

KINDS = ("generation", "conditioned", "masked", "selection", "ranking")
MASK = "[MASK]"
RANK_SIZE = 5


@dataclass
class DatasetSettings:
    """The data a run reads and its train/test split: shared by instruction building and evaluation."""

    base_model: str = "tiny"
    run_dir: str = "runs/tiny"
    seed: int = 0
    data: str = str(oogiri.SAMPLE_DIR)  # a dataset folder, or "hub"
    split: str = ""  # split file; default <run_dir>/split.json, made if missing
    test_ratio: float = 0.05  # only used when the split has to be made
    require_star: bool = False

    @property
    def split_path(self) -> Path:
        return Path(self.split or Path(self.run_dir) / "split.json")


@dataclass
class InstructionSettings(DatasetSettings):
    # Instructions per answer (generation, conditioned, masked, selection) or per rankable prompt
    # (ranking); a fraction is the chance of one more. The paper does not state its mixture.
    mixture: dict = field(default_factory=lambda: {"generation": 1.0, "conditioned": 1.0, "masked": 0.5,
                                                   "selection": 1.0, "ranking": 1.0})
    rho_c: float = 0.5  # chance that a conditioned instruction has no condition (the paper's rho_c)
    num_options: int = 4  # selection options: the human answer + distractors (4T1 as in the paper)
    literal_model: str = "base"  # model for literal distractors: "base", "none", or a hub id / path
    literal_cache: str = ""  # default <run_dir>/literal-cache.json
    literal_batch_size: int = 8  # rows per generate call when literal_memory_budget_gb is 0
    literal_memory_budget_gb: float = 1.0  # KV-cache budget of one generate call: it decides the rows per call
    literal_max_new_tokens: int = 48
    device: str = "auto"
    backend: str = "engine"  # who writes the literal texts: "engine" or "vllm" (clot/vllm_backend.py)
    vllm_url: str = ""  # empty with backend vllm: a local server for the duration of the build
    vllm_model: str = ""

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / "instructions"

    def validate(self) -> "InstructionSettings":
        unknown = set(self.mixture) - set(KINDS)
        if unknown:
            raise ClotError(f"Unknown instruction kind(s) in mixture: {', '.join(sorted(unknown))}; use {KINDS}.")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.mixture.values()):
            raise ClotError("Mixture weights must be numbers >= 0.")
        if not 0 <= self.rho_c <= 1:
            raise ClotError(f"rho_c must be between 0 and 1, got {self.rho_c}.")
        if not 2 <= self.num_options <= len(prompts.LETTERS):
            raise ClotError(f"num_options must be between 2 and {len(prompts.LETTERS)}, got {self.num_options}.")
        return self


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:20]


class LiteralWriter:
    """Literal (unfunny) image descriptions and answer rewrites from a model, cached on disk.

    The cache is a JSON file keyed by a hash of (model id, kind, language, content), so a second
    build, or a build for another split, asks the model only about what is new. Like exploration,
    it puts as many rows in one generate call as `memory_budget_gb` of KV cache holds (or
    `batch_size` rows without a budget); rows with and without a picture go in separate calls, so
    text rows are not padded to an image row's length."""

    def __init__(self, engine, model_id: str, images: oogiri.ImageStore, cache_path: str | Path,
                 batch_size: int = 8, max_new_tokens: int = 48, memory_budget_gb: float = 0.0):
        self.engine = engine
        self.model_id = model_id
        self.images = images
        self.cache_path = Path(cache_path)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.memory_budget_gb = memory_budget_gb
        self.cache: dict[str, str] = {}
        self._image_keys: dict[tuple[str, Language], str] = {}
        if self.cache_path.is_file():
            self.cache = json.loads(self.cache_path.read_text(encoding="utf-8"))

    def _image_key(self, image_id: str, lang: Language) -> str:
        """Keyed by the picture's bytes, not its id, so another dataset's image 123 is not confused."""
        if (image_id, lang) not in self._image_keys:
            content = hashlib.sha256(self.images.read_bytes(image_id)).hexdigest()
            self._image_keys[image_id, lang] = _hash(self.model_id, "describe", lang.value, content)
        return self._image_keys[image_id, lang]

    def rows_per_call(self, with_image: bool) -> int:
        """Rows of one generate call: what the KV-cache budget holds (a row with a picture holds its
        visual tokens too), or `batch_size` without a budget."""
        from clot.engine import DEFAULT_MAX_IMAGE_TOKENS

        if not self.memory_budget_gb:
            return self.batch_size
        row = PROMPT_TEXT_TOKENS + self.max_new_tokens + (DEFAULT_MAX_IMAGE_TOKENS if with_image else 0)
        model = self.engine.model
        return rows_within_budget(model.config, model.dtype.itemsize, self.memory_budget_gb, row)

    def _rewrite_key(self, answer: oogiri.Sample) -> str:
        return _hash(self.model_id, "rewrite", answer.lang.value, answer.question or "", answer.text)

    def _answer_key(self, prompt: oogiri.Prompt) -> str:
        return _hash(self.model_id, "answer", prompt.lang.value, prompt.question or "", prompt.image or "")

    def prepare(self, prompt_list: list[oogiri.Prompt], plain_answers: bool = False) -> None:
        """Ask the model for every description and rewrite these prompts need that is not cached yet;
        with `plain_answers`, also a plain answer to each T2T prompt (evaluation's literal option)."""
        from clot.engine import Turn, prepare_image
        from clot.tasks import Sampling

        jobs: dict[str, tuple[Language, str, str | None]] = {}  # key -> (language, instruction, image id)
        for p in prompt_list:
            if p.image is not None and p.task is not Task.T2T:
                key = self._image_key(p.image, p.lang)
                if key not in self.cache:
                    jobs[key] = (p.lang, prompts.literal_description_prompt(p.lang), p.image)
            if plain_answers and p.task is Task.T2T:
                key = self._answer_key(p)
                if key not in self.cache:
                    jobs[key] = (p.lang, prompts.literal_answer_prompt(p.lang, p.question or ""), p.image)
            for answer in p.answers:
                key = self._rewrite_key(answer)
                if key not in self.cache:
                    jobs[key] = (p.lang, prompts.literal_rewrite_prompt(p.lang, answer.text, p.question or ""), None)
        batches = []
        for with_image in (True, False):
            group = [k for k in jobs if (jobs[k][2] is not None) == with_image]
            size = self.rows_per_call(with_image)
            batches += [group[at:at + size] for at in range(0, len(group), size)]
        # Mild, seeded sampling: literal yet reproducible (greedy decoding tends to loop or stop at once).
        sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=self.max_new_tokens, seed=0)
        saved = time.monotonic()
        for batch in tqdm(batches, desc="literal texts", unit="batch", disable=not batches):
            turns = [Turn(text, lang, prepare_image(self.images.open(image)) if image else None, persona=False)
                     for lang, text, image in (jobs[k] for k in batch)]  # pictures decoded per batch only
            texts = self.engine.sample(turns, sampling)
            self.cache.update({k: prompts.one_line(t) for k, t in zip(batch, texts)})
            if time.monotonic() - saved > 60:  # an interrupted build keeps most of its work
                self.save()
                saved = time.monotonic()
        if jobs:
            self.save()
        log.info("literal writer: %d new texts from %s in %d generate calls", len(jobs), self.model_id, len(batches))

    def save(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.cache_path, self.cache)

    def description(self, prompt: oogiri.Prompt) -> str:
        if prompt.image is None or prompt.task is Task.T2T:
            return ""
        return self.cache.get(self._image_key(prompt.image, prompt.lang), "")

    def rewrite(self, answer: oogiri.Sample) -> str:
        return self.cache.get(self._rewrite_key(answer), "")

    def plain_answer(self, prompt: oogiri.Prompt) -> str:
        return self.cache.get(self._answer_key(prompt), "") if prompt.task is Task.T2T else ""


def _count(weight: float, rng: random.Random) -> int:
    """How many instructions of a kind: the integer part, plus one with the fractional chance."""
    whole = int(weight)
    return whole + (rng.random() < weight - whole)


def mask_answer(text: str, lang: Language, rng: random.Random) -> str:
    """The answer with one noun (or, without nouns, one word / two characters) replaced by [MASK]."""
    nouns = [n for n in extract_nouns(text, lang) if n.lower() in text.lower()]
    if nouns:
        noun = rng.choice(nouns)
        at = text.lower().index(noun.lower())
        return text[:at] + MASK + text[at + len(noun):]
    if lang is Language.EN:
        words = list(re.finditer(r"\w+", text))
        if len(words) < 2:
            return ""
        word = rng.choice(words)
        return text[:word.start()] + MASK + text[word.end():]
    if len(text) < 4:
        return ""
    at = rng.randrange(len(text) - 1)
    return text[:at] + MASK + text[at + 2:]


class Builder:
    """Makes the records of one part of the split; `pool` are the prompts distractors come from."""

    def __init__(self, settings: InstructionSettings, pool: list[oogiri.Prompt], writer: LiteralWriter | None,
                 rng: random.Random):
        self.settings = settings
        self.writer = writer
        self.rng = rng
        self.records: list[dict] = []  # made since the caller last took them
        self.made = 0
        # Answers to draw distractors from, indexed once: same language and task, same language, any.
        self.tiers: dict[object, list[tuple[str, str]]] = collections.defaultdict(list)
        for p in pool:
            for a in p.answers:
                for key in ((p.lang, p.task), p.lang, None):
                    self.tiers[key].append((p.id, a.text))

    def _record(self, kind: str, p: oogiri.Prompt, user: str, answer: str) -> None:
        self.made += 1
        self.records.append({"id": f"{p.id}-{kind}-{self.made}", "kind": kind, "task": p.task.value,
                             "lang": p.lang.value, "prompt_id": p.id, "image": p.image, "user": user,
                             "answer": answer})

    def other_answers(self, p: oogiri.Prompt, count: int, avoid: set[str]) -> list[str]:
        """Human answers to other prompts: same language and task first, then same language, then any.
        Random draws with rejection, so the cost does not grow with the size of the dataset."""
        chosen: list[str] = []
        for key in ((p.lang, p.task), p.lang, None):
            tier = self.tiers.get(key, [])
            for _ in range(20 * count if tier else 0):
                if len(chosen) == count:
                    return chosen
                prompt_id, text = self.rng.choice(tier)
                if prompt_id != p.id and text not in avoid and text not in chosen:
                    chosen.append(text)
        return chosen

    def add_prompt(self, p: oogiri.Prompt) -> None:
        mix, rng, question = self.settings.mixture, self.rng, p.question or ""
        for answer in p.answers:
            for _ in range(_count(mix.get("generation", 0), rng)):
                user = prompts.generation_prompt(p.task, p.lang, question, "", rng.randrange(prompts.NUM_WORDINGS))
                self._record("generation", p, user, answer.text)
            for _ in range(_count(mix.get("conditioned", 0), rng)):
                condition = answer_condition(answer.text, p.lang, self.settings.rho_c, rng)
                user = prompts.generation_prompt(p.task, p.lang, question, condition,
                                                 rng.randrange(prompts.NUM_WORDINGS))
                self._record("conditioned" if condition else "generation", p, user, answer.text)
            for _ in range(_count(mix.get("masked", 0), rng)):
                masked = mask_answer(answer.text, p.lang, rng)
                if masked:
                    user = prompts.masked_prompt(p.task, p.lang, masked, question, rng.randrange(prompts.NUM_WORDINGS))
                    self._record("masked", p, user, answer.text)
            for _ in range(_count(mix.get("selection", 0), rng)):
                self.add_selection(p, answer)
        if len(p.rankable) >= RANK_SIZE:
            for _ in range(_count(mix.get("ranking", 0), rng)):
                self.add_ranking(p)

    def add_selection(self, p: oogiri.Prompt, answer: oogiri.Sample) -> None:
        """The human answer among literal texts and other prompts' answers; the target names it."""
        own = {a.text for a in p.answers}
        distractors: list[str] = []
        if self.writer is not None:
            for text in (self.writer.description(p), self.writer.rewrite(answer)):
                if text and text not in own and text not in distractors:
                    distractors.append(text)
        wanted = self.settings.num_options - 1
        distractors = distractors[:wanted]
        distractors += self.other_answers(p, wanted - len(distractors), own | set(distractors))
        if not distractors:
            return
        options = [answer.text] + distractors
        self.rng.shuffle(options)
        correct = options.index(answer.text)
        user = prompts.selection_prompt(p.task, p.lang, options, 1, p.question or "",
                                        self.rng.randrange(prompts.NUM_WORDINGS))
        self._record("selection", p, user, prompts.selection_target(options, [correct]))

    def add_ranking(self, p: oogiri.Prompt) -> None:
        """Five answers of distinct likes, shuffled; the target orders them by likes, most first."""
        chosen = self.rng.sample(p.rankable, RANK_SIZE)  # a random choice, in random order
        options = [a.text for a in chosen]
        order = sorted(range(RANK_SIZE), key=lambda i: -chosen[i].star)
        user = prompts.ranking_prompt(p.task, p.lang, options, p.question or "", self.rng.randrange(prompts.NUM_WORDINGS))
        self._record("ranking", p, user, prompts.ranking_target(options, order))


def _write_jsonl(path: Path, records) -> tuple[str, dict[str, int]]:
    """Stream records to a file written atomically; return its content hash (recorded in the
    manifest and the adapter card) and the records per "kind/task/lang"."""
    digest = hashlib.sha256()
    table: collections.Counter = collections.Counter()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for record in records:
            line = json.dumps(record, ensure_ascii=False) + "\n"
            digest.update(line.encode("utf-8"))
            f.write(line)
            table[f"{record['kind']}/{record['task']}/{record['lang']}"] += 1
    os.replace(tmp, path)
    return digest.hexdigest()[:16], dict(sorted(table.items()))


def _stream(builder: "Builder", part: list[oogiri.Prompt], name: str):
    """Records prompt by prompt, so the whole set never has to sit in memory."""
    for p in tqdm(part, desc=f"{name} instructions", unit="prompt"):
        builder.add_prompt(p)
        yield from builder.records
        builder.records.clear()


def format_counts(table: dict[str, int]) -> str:
    lines = [f"{'kind':<12}{'task':<6}{'lang':<5}{'count':>7}"]
    for key, n in table.items():
        kind, task, lang = key.split("/")
        lines.append(f"{kind:<12}{task:<6}{lang:<5}{n:>7}")
    lines.append(f"{'total':<23}{sum(table.values()):>7}")
    return "\n".join(lines)


def build(settings: InstructionSettings, engine=None) -> dict:
    """Build and write both parts; returns the manifest. `engine` can supply an already loaded
    literal model (otherwise one is loaded unless literal_model is "none")."""
    settings.validate()
    dataset = oogiri.load(settings.data, require_star=settings.require_star)
    all_prompts = dataset.prompts()
    split = oogiri.load_or_make_split(settings.split_path, all_prompts, settings.test_ratio, settings.seed)
    parts = {name: split.part(all_prompts, name) for name in ("train", "test")}

    with contextlib.ExitStack() as backends:
        writer = None
        if settings.literal_model != "none":
            model_id = settings.base_model if settings.literal_model == "base" else settings.literal_model
            if engine is None:
                from clot.vllm_backend import open_backend

                engine = backends.enter_context(open_backend(
                    settings.backend, resolve_base_model(model_id), adapters_dir="adapters", vllm_url=settings.vllm_url,
                    vllm_model=settings.vllm_model, log_dir=settings.run_dir, device=settings.device))
            cache = settings.literal_cache or Path(settings.run_dir) / "literal-cache.json"
            writer = LiteralWriter(engine, model_id, dataset.images, cache, settings.literal_batch_size,
                                   settings.literal_max_new_tokens, settings.literal_memory_budget_gb)
        return _write_parts(settings, dataset, split, parts, writer)


def _write_parts(settings: InstructionSettings, dataset, split, parts: dict, writer) -> dict:
    """Write the train and test parts, the noun set and the manifest; returns the manifest."""
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"data": str(Path(dataset.folder).resolve()), "data_hash": dataset.data_hash(),
                "split": str(settings.split_path), "split_hash": split.hash, "settings": asdict(settings),
                "skipped_rows": dict(dataset.report.skipped), "files": {}, "counts": {}}
    for offset, (name, part) in enumerate(parts.items()):
        if writer is not None:
            writer.prepare(part)
        # Distractors come from the same part only, so no test answer leaks into training.
        builder = Builder(settings, part, writer, random.Random(f"{settings.seed}-{offset}"))
        digest, table = _write_jsonl(out / f"{name}.jsonl", _stream(builder, part, name))
        manifest["files"][name] = {"path": f"{name}.jsonl", "records": builder.made, "hash": digest}
        manifest["counts"][name] = table
    build_noun_set(parts["train"], out / "nouns.json", data_hash=manifest["data_hash"], split_hash=split.hash)
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ClotError(f"No instruction set in {folder}: run `python training/instructions.py --config ...` first.")
    return json.loads(path.read_text(encoding="utf-8"))


def read_records(folder: str | Path, part: str) -> list[dict]:
    with open(Path(folder) / f"{part}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    args = recipe_parser(__doc__, "instructions").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_config(InstructionSettings, args.config, "instructions", args.set)
        manifest = build(settings)
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in ("train", "test"):
        print(f"\n{name}: {settings.out_dir / (name + '.jsonl')}")
        print(format_counts(manifest["counts"][name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
