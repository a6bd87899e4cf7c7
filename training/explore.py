"""Stage 2 — explorative self-refinement (the paper's second stage).

For each training prompt: draw n weak conditions (empty with probability ρ, else a uniform noun of
the noun set S), generate one answer per condition with the current adapter, let the same model
rank them and keep the top two, then ask it a 3-option selection question against a human answer.
When it picks one of its own answers over the human one, that answer becomes a new training sample.

    python training/explore.py --config training/configs/tiny.yaml --set adapter=tiny-stage1

Prompts are processed in batches through clot.engine (one generate call and one scoring pass per
batch). Results are appended to <out>/samples.rank<R>.jsonl as each batch finishes, so a killed run
continues where it stopped; at the end they are merged, in training-prompt order, into
<out>/samples.jsonl, and the new training records into <out>/records.jsonl. Under `accelerate
launch` / `torchrun` every process explores its own share of the prompts.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from training import instructions as instruction_set  # noqa: E402
from training.config import (PROMPT_TEXT_TOKENS, distributed, load_config, recipe_parser,  # noqa: E402
                             resolve_base_model, rows_within_budget)

from clot import adapters, prompts  # noqa: E402
from clot import data as oogiri  # noqa: E402
from clot.engine import DEFAULT_MAX_IMAGE_TOKENS, Choice  # noqa: E402
from clot.nouns import draw_conditions, load_nouns  # noqa: E402
from clot.vllm_backend import BACKENDS, open_backend  # noqa: E402
from clot.tasks import ClotError, Language, Request, Sampling, Task  # noqa: E402

log = logging.getLogger(__name__)
FORMATS = ("conditioned", "plain")


@dataclass
class ExploreSettings:
    base_model: str = "tiny"
    run_dir: str = "runs/tiny"
    seed: int = 0
    adapter: str = ""  # the adapter that explores (the stage-1 adapter in round 1)
    adapters_dir: str = "adapters"
    round: int = 1
    instructions: str = ""  # the stage-1 instruction set (data, split, nouns); default <run_dir>/instructions
    out: str = ""  # default <run_dir>/explore-r<round>
    num_conditions: int = 5  # n: candidates per prompt
    rho: float = 0.5  # chance that a condition is empty
    # Sampling of the candidates: not stated in the paper; these follow the released demo's spirit.
    temperature: float = 0.9
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 64
    repetition_penalty: float = 1.05
    human_answer: str = "top"  # which human answer the selection uses: top (most stars) or random
    dedup: float = 0.9  # a candidate this similar (0..1) to an earlier one or to a human answer is dropped
    max_prompts: int = 0  # explore only the first N training prompts (0: all)
    prompts_per_batch: int = 8  # prompts per generate call: bounds memory
    memory_budget_gb: float = 0.0  # KV-cache budget of one generate call; when set, it decides prompts_per_batch
    formats: list = field(default_factory=lambda: list(FORMATS))  # how accepted answers become records
    device: str = "auto"
    max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS
    compile: bool = False  # static KV cache + torch.compile for decoding (Engine.set_compile)
    # Who generates: "engine" (in process) or "vllm": the server at vllm_url, or without one a local
    # server from the vLLM environment that lives as long as the stage (clot/vllm_backend.py).
    backend: str = "engine"
    vllm_url: str = ""
    vllm_model: str = ""  # the name the server gives the base model, when not its path or hub id

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path(self.run_dir) / f"explore-r{self.round}")

    @property
    def instructions_dir(self) -> Path:
        return Path(self.instructions or Path(self.run_dir) / "instructions")

    def batch_size(self, config, dtype_bytes: int) -> int:
        """Prompts per generate call: `prompts_per_batch`, or with `memory_budget_gb` set, as many as
        that budget holds in KV cache. Each prompt has num_conditions rows of at most
        max_image_tokens + PROMPT_TEXT_TOKENS + max_new_tokens positions (an upper estimate), and
        its prompt's prefix (image and text) stays in the engine's prefix store for the ranking and
        selection questions."""
        if not self.memory_budget_gb:
            return self.prompts_per_batch
        prompt = self.max_image_tokens + PROMPT_TEXT_TOKENS
        # Each prompt's rows, plus the copy of its shared prefix that the engine's prefix store keeps.
        return rows_within_budget(config, dtype_bytes, self.memory_budget_gb,
                                  self.num_conditions * (prompt + self.max_new_tokens) + prompt)

    def sampling(self, seed: int) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty,
                        seed=seed).validate()

    def validate(self) -> "ExploreSettings":
        if not 2 <= self.num_conditions <= len(prompts.LETTERS):
            raise ClotError(f"num_conditions must be between 2 and {len(prompts.LETTERS)}, got {self.num_conditions}.")
        if not 0 <= self.rho <= 1:
            raise ClotError(f"rho must be between 0 and 1, got {self.rho}.")
        if self.human_answer not in ("top", "random"):
            raise ClotError(f"human_answer must be top or random, got {self.human_answer!r}.")
        if not 0 <= self.dedup <= 1:
            raise ClotError(f"dedup must be between 0 and 1, got {self.dedup}.")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            raise ClotError(f"formats must be a non-empty list of {FORMATS}, got {self.formats}.")
        if self.backend not in BACKENDS:
            raise ClotError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.prompts_per_batch < 1:
            raise ClotError("prompts_per_batch must be at least 1.")
        if self.memory_budget_gb < 0:
            raise ClotError(f"memory_budget_gb must be 0 (off) or more, got {self.memory_budget_gb}.")
        self.sampling(0)
        return self


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def near_duplicate(text: str, others: list[str], threshold: float) -> bool:
    """Empty, or at least `threshold` similar (difflib ratio of normalised text) to one of `others`."""
    mine = _normal(text)
    if not mine:
        return True
    for other in others:
        theirs = _normal(other)
        if mine == theirs:
            return True
        if threshold < 1:
            matcher = difflib.SequenceMatcher(None, mine, theirs)
            # the two quick ratios are upper bounds of ratio(): most pairs are ruled out without it
            if matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold \
                    and matcher.ratio() >= threshold:
                return True
    return False


def explore_batch(engine, batch: list[oogiri.Prompt], images, nouns: dict[Language, list[str]],
                  settings: ExploreSettings, adapter: str | None = None) -> list[dict]:
    """Explore a batch of prompts: one generate call, one ranking pass, one selection pass.

    `engine` needs only `generate_many(requests, adapter=)` and `score(choices, adapter=)`, so a
    test can control what the "model" prefers. Returns one provenance record per prompt."""
    n = settings.num_conditions
    batch_seed = _seed(settings.seed, settings.round, batch[0].id)
    requests, pictures = [], []
    for p in batch:
        rng = random.Random(_seed(settings.seed, settings.round, p.id, "conditions"))
        picture = images.open(p.image) if p.image else None
        pictures.append(picture)
        requests.append(Request(task=p.task, image=picture, text=p.question or "", language=p.lang,
                                conditions=draw_conditions(nouns.get(p.lang, []), n, settings.rho, rng),
                                num_candidates=n, sampling=settings.sampling(batch_seed)))
    generated = engine.generate_many(requests, adapter=adapter)

    records, rank_questions, humans = [], [], []
    for p, request, picture, candidates in zip(batch, requests, pictures, generated):
        rng = random.Random(_seed(settings.seed, settings.round, p.id, "human"))
        human = p.answers[0] if settings.human_answer == "top" else rng.choice(p.answers)
        humans.append(human)
        kept: list[int] = []
        rows = []
        for i, c in enumerate(candidates):
            earlier = [candidates[j].text for j in kept] + [a.text for a in p.answers]
            dropped = near_duplicate(c.text, earlier, settings.dedup)
            rows.append({"text": c.text, "condition": c.condition, "rank_score": None, "dropped": dropped})
            if not dropped:
                kept.append(i)
        records.append({
            "prompt_id": p.id, "lang": p.lang.value, "task": p.task.value, "image": p.image,
            "question": p.question, "round": settings.round, "adapter": adapter or "base", "seed": batch_seed,
            "candidates": rows, "kept": kept, "human_answer": human.text, "human_star": human.star})
        if len(kept) >= 2:
            rank_questions.append((len(records) - 1, Choice("rank", p.task, p.lang, [candidates[i].text for i in kept],
                                                            picture, p.question or "")))
    ranked = engine.score([q for _, q in rank_questions], adapter=adapter) if rank_questions else []
    for (at, _), scores in zip(rank_questions, ranked):
        record = records[at]
        for i, score in zip(record["kept"], scores):
            record["candidates"][i]["rank_score"] = score

    select_questions = []
    for at, (record, p, picture) in enumerate(zip(records, batch, pictures)):
        kept = record["kept"]
        finalists = sorted(kept, key=lambda i: -(record["candidates"][i]["rank_score"] or 0.0))[:2]
        record["finalists"] = finalists
        if not finalists:
            continue
        sources = [f"candidate:{i}" for i in finalists] + ["human"]
        random.Random(_seed(settings.seed, settings.round, p.id, "options")).shuffle(sources)
        options = [record["human_answer"] if s == "human" else record["candidates"][int(s.split(":")[1])]["text"]
                   for s in sources]
        record["selection"] = {"options": options, "sources": sources, "scores": None, "picked": None}
        select_questions.append((at, Choice("select", p.task, p.lang, options, picture, p.question or "")))
    selected = engine.score([q for _, q in select_questions], adapter=adapter) if select_questions else []
    for (at, _), scores in zip(select_questions, selected):
        selection = records[at]["selection"]
        selection["scores"] = scores
        selection["picked"] = max(range(len(scores)), key=lambda j: scores[j])

    for record in records:
        selection = record.get("selection")
        source = selection["sources"][selection["picked"]] if selection else "human"
        record["accepted"] = source != "human"
        if record["accepted"]:
            chosen = record["candidates"][int(source.split(":")[1])]
            record["answer"], record["condition"] = chosen["text"], chosen["condition"]
        else:
            record["answer"] = record["condition"] = None
    return records


def retraining_records(samples: list[dict], formats: list[str], rng: random.Random) -> list[dict]:
    """Accepted answers as generation instructions: with the condition that produced them
    ("conditioned", when there was one) and without it ("plain")."""
    records = []
    for sample in samples:
        if not sample.get("accepted"):
            continue
        task, lang = Task.parse(sample["task"]), Language.parse(sample["lang"])
        conditions = {"conditioned": sample["condition"] or "", "plain": ""}
        for fmt in dict.fromkeys(f for f in formats if f == "plain" or sample["condition"]):
            user = prompts.generation_prompt(task, lang, sample["question"] or "", conditions[fmt],
                                             rng.randrange(prompts.NUM_WORDINGS))
            records.append({"id": f"{sample['prompt_id']}-explored-r{sample['round']}-{fmt}",
                            "kind": "conditioned" if conditions[fmt] else "generation", "task": task.value,
                            "lang": lang.value, "prompt_id": sample["prompt_id"], "image": sample["image"],
                            "user": user, "answer": sample["answer"], "source": f"explore-r{sample['round']}"})
    return records


def read_done(path: Path) -> list[dict]:
    """Records already written by a previous run; a line cut short by a crash is dropped (and
    removed from the file) so that its prompt is explored again, once."""
    if not path.is_file():
        return []
    done, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                done.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not line.endswith(b"\n"):
                done.pop()
                break
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def explore(settings: ExploreSettings, engine=None) -> dict:
    """Explore every training prompt (this process's share), resumably; merge; return the summary."""
    settings.validate()
    rank, world, barrier = distributed()
    manifest = instruction_set.read_manifest(settings.instructions_dir)
    dataset = oogiri.load(manifest["data"])
    split = oogiri.Split.load(manifest["split"])
    train = [p for p in split.part(dataset.prompts(), "train") if p.answers]
    if settings.max_prompts:
        train = train[:settings.max_prompts]
    noun_file = settings.instructions_dir / "nouns.json"
    nouns = {lang: load_nouns(lang, noun_file) for lang in Language}

    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    shard = out / f"samples.rank{rank}.jsonl"
    mine = train[rank::world]
    finished = read_done(shard)
    done = {r["prompt_id"] for r in finished}
    todo = [p for p in mine if p.id not in done]
    card = {}
    with contextlib.ExitStack() as stack:
        if todo and engine is None:
            engine = stack.enter_context(open_backend(
                settings.backend, resolve_base_model(settings.base_model), adapters_dir=settings.adapters_dir,
                vllm_url=settings.vllm_url, vllm_model=settings.vllm_model, log_dir=out,
                max_image_tokens=settings.max_image_tokens, device=settings.device, compile=settings.compile))
        if todo:
            if settings.adapter:
                card = adapters.read_card(Path(settings.adapters_dir) / settings.adapter)
            accepted = sum(1 for r in finished if r.get("accepted"))
            seen = len(done)
            bar = tqdm(total=len(mine), initial=len(done), desc=f"explore r{settings.round}", unit="prompt",
                       disable=rank != 0)
            if getattr(engine, "prefixes", None) is None:  # a server: it batches and caches prefixes itself
                per_call = settings.prompts_per_batch
            else:
                per_call = settings.batch_size(engine.model.config, engine.model.dtype.itemsize)
                # Every prompt of a call keeps its prefix for its ranking and selection questions.
                engine.prefixes.size = max(engine.prefixes.size, per_call)
            if settings.memory_budget_gb:
                log.info("memory_budget_gb=%s holds %d prompts per generate call", settings.memory_budget_gb, per_call)
            for start in range(0, len(todo), per_call):
                batch = todo[start:start + per_call]
                records = explore_batch(engine, batch, dataset.images, nouns, settings,
                                        adapter=settings.adapter or None)
                for record in records:
                    record["adapter_created"] = card.get("created")
                    record["sampling"] = asdict(settings.sampling(record["seed"]))
                _append(shard, records)
                seen += len(records)
                accepted += sum(r["accepted"] for r in records)
                bar.update(len(records))
                bar.set_postfix(accepted=f"{accepted / max(seen, 1):.0%}")
            bar.close()
    barrier()
    summary_path = out / "summary.json"
    if rank == 0:
        by_id = {}
        for r in range(world):
            for record in read_done(out / f"samples.rank{r}.jsonl"):
                by_id.setdefault(record["prompt_id"], record)
        samples = [by_id[p.id] for p in train if p.id in by_id]
        if len(samples) != len(train):
            raise ClotError(f"Exploration finished with {len(samples)} of {len(train)} prompts; run it again.")
        new = retraining_records(samples, settings.formats, random.Random(_seed(settings.seed, settings.round, "fmt")))
        _write_jsonl_atomic(out / "samples.jsonl", samples)
        _write_jsonl_atomic(out / "records.jsonl", new)
        accepted = sum(s["accepted"] for s in samples)
        summary = {"prompts": len(samples), "accepted": accepted, "acceptance_rate": accepted / max(len(samples), 1),
                   "records": len(new), "processes": world, "adapter": settings.adapter or "base",
                   "adapter_card_created": card.get("created"), "settings": asdict(settings),
                   "samples_hash": hashlib.sha256((out / "samples.jsonl").read_bytes()).hexdigest()[:16],
                   "records_hash": hashlib.sha256((out / "records.jsonl").read_bytes()).hexdigest()[:16]}
        adapters.write_json_atomic(summary_path, summary)
    barrier()
    return json.loads(summary_path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    args = recipe_parser(__doc__, "explore").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = explore(load_config(ExploreSettings, args.config, "explore", args.set))
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
