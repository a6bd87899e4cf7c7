"""Stage 3: DPO from human votes. Votes → preference pairs → a frozen snapshot → TRL's DPOTrainer.

    python training/dpo.py --config training/configs/tiny.yaml --set init_adapter=adapters/tiny-stage2-r1

The votes come from a vote export (a folder with votes.jsonl and images/, as `python -m clot.votes
export` writes it) or from a live vote database, exported first. A blind A/B battle gives one pair
(winner over loser); a "funniest" pick gives the winner over up to three other shown candidates;
ties, "both unfunny" and "none is funny" give none; moderated votes and votes on another base model
are dropped; a pair voted several times is settled by majority (an exact tie is dropped). The pairs
are split into train and eval by prompt and frozen in <snapshot>/ (pairs.jsonl, the images they
use, manifest.json); the same manifest as the published adapter's card means nothing to do.

Training starts from the last stage-2 adapter; TRL keeps a frozen copy of it as the reference, so no
second model is loaded. Each pair is encoded by the SFT collator (same chat formatting, image cap and
control-token sanitising as stage 1 and 2), scoring the answer up to its first <|im_end|>. The loss
is DPO's sigmoid loss plus an SFT term on the chosen answer. Output in <run_dir>/: checkpoints/
(resumable), loss.csv, tensorboard/, and the adapter published as <adapter_name> with its card.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from training import sft  # noqa: E402
from training.config import load_config, recipe_parser, resolve_base_model  # noqa: E402

from clot import adapters  # noqa: E402
from clot import data as oogiri  # noqa: E402
from clot import prompts  # noqa: E402
from clot.engine import DEFAULT_MAX_IMAGE_TOKENS, load_processor  # noqa: E402
from clot.tasks import ClotError, Language, Task  # noqa: E402

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
MANIFEST = "manifest.json"


@dataclass
class DpoSettings:
    base_model: str = "tiny"
    run_dir: str = "runs/tiny/stage3"
    seed: int = 0
    votes: str = ""  # a vote export folder (votes.jsonl + images/) or a vote database file
    vote_base_model: str = ""  # the base model name the votes record; default: base_model
    until: str = ""  # ISO time: only votes up to it (a fixed cutoff on a growing vote store); empty: all
    snapshot: str = ""  # frozen pairs; default <run_dir>/pairs
    init_adapter: str = ""  # the stage-2 adapter folder to start from (and the reference)
    adapter_name: str = "stage3"
    adapters_dir: str = "adapters"
    round: int = 1
    # Pairs
    losers_per_pick: int = 3  # a pick's winner is paired with up to this many other shown candidates
    eval_ratio: float = 0.2  # share of prompts held out to measure reward accuracy
    min_pairs: int = 8  # fewer training pairs than this: refuse to train
    # DPO
    beta: float = 0.1
    sigmoid_weight: float = 1.0  # weight of DPO's sigmoid loss
    sft_weight: float = 1.0  # weight of the SFT term on the chosen answer (0: none)
    precompute_ref_log_probs: bool = False  # not possible with image data: refused
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 2  # pairs per step: twice as many sequences
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    max_length: int = 2048
    max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS
    precision: str = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    resume: str = "auto"  # auto: from the last complete checkpoint of this recipe; never; or a checkpoint folder

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.snapshot or Path(self.run_dir) / "pairs")


# ---------------------------------------------------------------- votes
def export_database(database: Path, out: Path) -> Path:
    """A live vote database → a fresh export folder, through the vote store's own exporter."""
    from clot.votes import VoteStore

    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    VoteStore(database).export(out)
    return out


def locate_votes(source: str, work_dir: Path) -> Path:
    """The export folder to read: `source` itself, or a fresh export of the database `source`."""
    path = Path(source)
    if not source:
        raise ClotError("No votes given: set votes to a vote export folder or a vote database.")
    if path.is_dir():
        if not (path / "votes.jsonl").is_file():
            raise ClotError(f"{path} is not a vote export: it has no votes.jsonl.")
        return path
    if path.is_file():
        return export_database(path, work_dir / "votes-export")
    raise ClotError(f"The votes {source} do not exist.")


def read_votes(folder: Path) -> list[dict]:
    votes = []
    with open(folder / "votes.jsonl", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                vote = json.loads(line)
                _check_vote(vote)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ClotError(f"{folder / 'votes.jsonl'} line {number} is not a valid vote ({err}).") from None
            votes.append(vote)
    return votes


def _check_vote(vote: dict) -> None:
    """Raises ValueError (ClotError is one) or KeyError for a line that breaks the export format."""
    missing = [key for key in ("vote_id", "kind", "time", "base_model", "prompt", "candidates", "choice")
               if key not in vote]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    if vote["kind"] not in ("pick", "battle"):
        raise ValueError(f"unknown kind {vote['kind']!r}")
    Task.parse(vote["prompt"]["task"])
    Language.parse(vote["prompt"]["language"])
    if not all(isinstance(c["text"], str) for c in vote["candidates"]):
        raise ValueError("a candidate has no text")
    _time(vote["time"])


def _time(value: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------- pairs
def _prompt_key(prompt: dict) -> str:
    """One id per prompt (task, language, question, image): pairs and the split are grouped by it."""
    fields = [prompt["task"], prompt["language"], prompt.get("text") or "", prompt.get("image") or ""]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()[:16]


def vote_outcomes(vote: dict, losers_per_pick: int) -> list[tuple[str, str]]:
    """The (winner text, loser text) outcomes one vote states; none for tie, bad and none."""
    texts = [c["text"].strip() for c in vote["candidates"]]
    choice = vote["choice"]
    if vote["kind"] == "battle":
        if choice not in ("A", "B") or len(texts) != 2:
            return []
        winner, loser = (texts[0], texts[1]) if choice == "A" else (texts[1], texts[0])
        return [(winner, loser)] if winner and loser and winner != loser else []
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(texts):
        return []  # "none", or an index that does not exist
    winner = texts[choice]
    losers = []
    for index, text in enumerate(texts):  # in the order shown
        if index != choice and text and text != winner and text not in losers:
            losers.append(text)
    return [(winner, loser) for loser in losers[:losers_per_pick]] if winner else []


def build_pairs(votes: list[dict], base_model: str, losers_per_pick: int = 3,
                until: str = "") -> tuple[list[dict], dict]:
    """Preference pairs from the votes, and the counts of what was used and dropped."""
    cutoff = _time(until) if until else None
    dropped, used = Counter(), Counter()
    tally: dict[tuple, Counter] = {}  # (prompt, text a, text b) with a < b → wins of each text
    prompts_by_key, kinds, last_time = {}, {}, None
    for vote in votes:
        moment = _time(vote["time"])
        if cutoff and moment > cutoff:
            dropped["after_cutoff"] += 1
            continue
        last_time = max(last_time, moment) if last_time else moment  # every vote up to here was considered
        if vote.get("excluded"):
            dropped["excluded"] += 1
            continue
        if vote["base_model"] != base_model:
            dropped["other_base_model"] += 1
            continue
        prompt = vote["prompt"]
        if Task.parse(prompt["task"]).needs_image and not prompt.get("image"):
            dropped["image_missing"] += 1
            continue
        outcomes = vote_outcomes(vote, losers_per_pick)
        if not outcomes:
            dropped["no_preference"] += 1
            continue
        used[vote["kind"]] += 1
        key = _prompt_key(prompt)
        prompts_by_key[key] = prompt
        for winner, loser in outcomes:
            pair = (key, *sorted((winner, loser)))
            tally.setdefault(pair, Counter())[winner] += 1
            kinds.setdefault(pair, Counter())[vote["kind"]] += 1
    pairs = []
    for (key, first, second), wins in sorted(tally.items()):
        if wins[first] == wins[second]:
            dropped["tied_pairs"] += 1
            continue
        chosen, rejected = (first, second) if wins[first] > wins[second] else (second, first)
        prompt = prompts_by_key[key]
        pairs.append({"prompt_id": key, "task": prompt["task"], "language": Language.parse(prompt["language"]).value,
                      "question": prompt.get("text") or "", "image": prompt.get("image"),
                      "chosen": chosen, "rejected": rejected,
                      "votes_for": wins[chosen], "votes_against": wins[rejected],
                      "kind": kinds[(key, first, second)].most_common(1)[0][0]})
    counts = {"votes": len(votes), "votes_used": dict(sorted(used.items())), "dropped": dict(sorted(dropped.items())),
              "vote_cutoff": last_time.isoformat() if last_time else None}
    return pairs, counts


def split_by_prompt(pairs: list[dict], eval_ratio: float, seed: int) -> None:
    """Mark each pair train or eval; all pairs of one prompt land on the same side (seeded)."""
    keys = sorted({p["prompt_id"] for p in pairs})
    random.Random(seed).shuffle(keys)
    held_out = min(len(keys) - 1, math.ceil(len(keys) * eval_ratio)) if eval_ratio > 0 else 0
    evaluation = set(keys[:max(held_out, 0)])
    for pair in pairs:
        pair["split"] = "eval" if pair["prompt_id"] in evaluation else "train"


def freeze(settings: DpoSettings) -> dict:
    """Build the pairs from the votes and freeze them in the snapshot folder; returns its manifest.
    A snapshot with the same manifest is left as it is (its files keep their times)."""
    folder = settings.snapshot_dir
    export = locate_votes(settings.votes, Path(settings.run_dir))
    base = settings.vote_base_model or settings.base_model
    pairs, counts = build_pairs(read_votes(export), base, settings.losers_per_pick, settings.until)
    split_by_prompt(pairs, settings.eval_ratio, settings.seed)
    lines = "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs)
    images = sorted({p["image"] for p in pairs if p["image"]})
    missing = [i for i in images if not (export / "images" / f"{i}.png").is_file()]
    if missing:
        raise ClotError(f"The vote export {export} lacks {len(missing)} image(s) its votes use, "
                        f"e.g. images/{missing[0]}.png.")
    manifest = {
        "pairs_sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "vote_cutoff": counts["vote_cutoff"], "until": settings.until or None,
        "base_model": base, "source": str(settings.votes),
        "counts": {**counts, "pairs": len(pairs),
                   "train_pairs": sum(p["split"] == "train" for p in pairs),
                   "eval_pairs": sum(p["split"] == "eval" for p in pairs),
                   "prompts": len({p["prompt_id"] for p in pairs}),
                   "pairs_by_kind": dict(sorted(Counter(p["kind"] for p in pairs).items())),
                   "pairs_by_language": dict(sorted(Counter(p["language"] for p in pairs).items()))},
        "rules": {"losers_per_pick": settings.losers_per_pick, "eval_ratio": settings.eval_ratio,
                  "seed": settings.seed},
        "images": images,  # their names are the sha256 of their bytes
    }
    if read_manifest(folder) == manifest:
        return manifest
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    (staging / "images").mkdir()
    (staging / PAIRS_FILE).write_text(lines, encoding="utf-8")
    for image in images:
        shutil.copy2(export / "images" / f"{image}.png", staging / "images" / f"{image}.png")
    adapters.write_json_atomic(staging / MANIFEST, manifest)
    retired = folder.with_name(f".{folder.name}.retired-{os.getpid()}")
    if folder.exists():
        os.replace(folder, retired)
    os.replace(staging, folder)  # the snapshot appears whole or not at all
    shutil.rmtree(retired, ignore_errors=True)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_pairs(folder: Path, split: str) -> list[dict]:
    with open(Path(folder) / PAIRS_FILE, encoding="utf-8") as f:
        return [pair for pair in map(json.loads, filter(str.strip, f)) if pair["split"] == split]


def becomes_default(candidate: tuple[float, float], parent: tuple[float, float]) -> bool:
    """A stage-3 adapter replaces its parent as the default only when the leaderboard is sure it is
    better: its whole rating interval (low, high) lies above the parent's."""
    return candidate[0] > parent[1]


# ---------------------------------------------------------------- training
class PreferenceCollator:
    """Pairs → one batch of all chosen answers followed by all rejected ones (the layout DPOTrainer
    expects), each encoded by the SFT collator; `completion_mask` marks the scored tokens: the answer
    up to and including its first <|im_end|>."""

    def __init__(self, processor, images: oogiri.ImageStore, max_length: int):
        self.encoder = sft.Collator(processor, images, max_length)

    def __call__(self, pairs: list[dict]) -> dict:
        records = [{"id": p["prompt_id"], "user": p["prompt"], "lang": p["language"], "image": p["image"],
                    "answer": p[side]} for side in ("chosen", "rejected") for p in pairs]
        batch = self.encoder(records)
        batch["completion_mask"] = (batch.pop("labels") != sft.IGNORE).long()
        return batch


def user_prompt(pair: dict) -> str:
    """The plain generation prompt of the pair's request, as the engine asks it (no condition word)."""
    return prompts.generation_prompt(Task.parse(pair["task"]), Language.parse(pair["language"]), pair["question"])


def _trainer_class():
    from trl import DPOTrainer

    class Trainer(DPOTrainer):
        """DPOTrainer that also logs the sigmoid (DPO) part of the loss on its own as `dpo_loss`,
        recomputed from the policy's and the reference's log-probabilities of each batch."""

        def _compute_loss(self, model, inputs, return_outputs):
            seen = []  # per-token log-probs of the policy's forward, then the reference's

            def keep(module, args, output):
                if getattr(output, "log_probs", None) is not None:
                    seen.append(output.log_probs.detach())

            hook = self.accelerator.unwrap_model(model).register_forward_hook(keep)
            try:
                result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                hook.remove()
            width = inputs["completion_mask"].shape[1] - 1
            policy, reference = (logps[:, -width:].sum(dim=1) for logps in seen[:2])
            delta = (policy - reference).chunk(2)
            dpo = -torch.nn.functional.logsigmoid(self.beta * (delta[0] - delta[1]))
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["dpo_loss"].append(self.accelerator.gather(dpo).mean().item())
            return result

    return Trainer


class DpoCsvLog(sft.CsvLog):
    FIELDS = ("time", "step", "epoch", "loss", "dpo_loss", "rewards/accuracies", "rewards/margins",
              "learning_rate", "grad_norm")


def _dataset(pairs: list[dict]):
    """A datasets.Dataset with an `image` column, which makes DPOTrainer pass rows raw to our collator."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt_id": p["prompt_id"], "prompt": user_prompt(p), "language": p["language"],
                               "image": p["image"] or "", "chosen": p["chosen"], "rejected": p["rejected"]}
                              for p in pairs])


def _recipe(settings: DpoSettings, manifest: dict) -> dict:
    recipe = sft._recipe(settings)
    recipe["pairs_sha256"] = manifest["pairs_sha256"]
    return recipe


def published_card(settings: DpoSettings, manifest: dict) -> dict | None:
    """The card of an adapter already published from the same pairs, parent and settings, if any."""
    try:
        card = adapters.validate(Path(settings.adapters_dir) / settings.adapter_name)
        parent = adapters.read_card(Path(settings.init_adapter))
    except ClotError:
        return None
    same = (card.get("pairs_sha256") == manifest["pairs_sha256"] and card.get("parent_created") == parent.get("created")
            and card.get("settings") == json.loads(json.dumps(asdict(settings))))
    return card if same else None


def train(settings: DpoSettings, manifest: dict | None = None, reuse: bool = True) -> dict:
    """Freeze the pairs (unless given a frozen snapshot's manifest), train from the stage-2 adapter,
    measure reward accuracy on the eval pairs, publish. Returns the card. With `reuse`, an adapter
    already published from the same manifest, parent and settings is returned as it is."""
    if settings.precompute_ref_log_probs:
        raise ClotError("precompute_ref_log_probs is not possible here: the pairs carry images, which DPOTrainer "
                        "processes on the fly; leave it false (the reference adapter is computed alongside).")
    if not settings.init_adapter:
        raise ClotError("Stage 3 starts from a trained adapter: set init_adapter to the last stage-2 adapter's folder.")
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest or freeze(settings)
    train_pairs = read_pairs(settings.snapshot_dir, "train")
    eval_pairs = read_pairs(settings.snapshot_dir, "eval")
    if len(train_pairs) < settings.min_pairs:
        raise ClotError(f"Only {len(train_pairs)} training pairs came from the votes in {settings.votes} "
                        f"({manifest['counts']['pairs']} pairs in all); stage 3 needs at least {settings.min_pairs} "
                        "(setting min_pairs). Collect more votes first.")
    existing = published_card(settings, manifest) if reuse else None
    if existing is not None:
        print(f"{settings.adapter_name} is already trained on these pairs ({manifest['pairs_sha256'][:16]}); skipped",
              flush=True)
        return existing
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig

    use_cpu = settings.device == "cpu" or not torch.cuda.is_available()
    dtype, precision_flags = sft._precision(settings, use_cpu)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    args = DPOConfig(
        output_dir=str(settings.checkpoints_dir), seed=settings.seed, use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        beta=settings.beta, loss_type=["sigmoid", "sft"] if settings.sft_weight else ["sigmoid"],
        loss_weights=[settings.sigmoid_weight] + ([settings.sft_weight] if settings.sft_weight else []),
        max_length=None,  # our collator caps the length; TRL's truncation could cut image tokens
        precompute_ref_log_probs=False,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
        lr_scheduler_type=settings.lr_scheduler_type, warmup_steps=settings.warmup_steps,
        num_train_epochs=settings.num_train_epochs, max_steps=settings.max_steps,
        logging_steps=settings.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=settings.save_total_limit,
        eval_strategy="no", report_to=["tensorboard"], remove_unused_columns=False, dataloader_num_workers=0,
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=precision_flags.get("bf16", False), fp16=precision_flags.get("fp16", False),
    )
    with args.main_process_first(desc="preparing the base model"):
        base_path = resolve_base_model(settings.base_model)
        checkpoint = sft.resume_point(settings, _recipe(settings, manifest)) if settings.resume == "auto" else None
    if settings.resume not in ("auto", "never"):
        checkpoint = Path(settings.resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ClotError(f"{checkpoint} is not a complete checkpoint folder.")

    processor = load_processor(base_path, settings.max_image_tokens)
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype)
    fingerprint = adapters.base_fingerprint(model.config)
    parent = adapters.validate(Path(settings.init_adapter), fingerprint)
    model = PeftModel.from_pretrained(model, settings.init_adapter, is_trainable=True)  # TRL adds the frozen "ref" copy
    trainer = _trainer_class()(
        model=model, args=args, processing_class=processor,
        data_collator=PreferenceCollator(processor, oogiri.ImageStore(settings.snapshot_dir / "images"),
                                         settings.max_length),
        train_dataset=_dataset(train_pairs), eval_dataset=_dataset(eval_pairs) if eval_pairs else None,
        callbacks=[DpoCsvLog(run_dir / "loss.csv")])
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {"train_loss": result.training_loss, "final_loss": history[-1]["loss"] if history else None,
               "final_dpo_loss": history[-1].get("dpo_loss") if history else None,
               "steps": trainer.state.global_step, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)}
    if eval_pairs:
        scores = trainer.evaluate()
        metrics.update({"eval_reward_accuracy": scores.get("eval_rewards/accuracies"),
                        "eval_reward_margin": scores.get("eval_rewards/margins"),
                        "eval_dpo_loss": scores.get("eval_dpo_loss"), "eval_loss": scores.get("eval_loss")})
    card = adapters.make_card(
        base_model=settings.base_model, fingerprint=fingerprint, stage=3, round=settings.round, method="dpo",
        base_model_path=base_path, parent=Path(settings.init_adapter).name, parent_created=parent.get("created"),
        pairs_sha256=manifest["pairs_sha256"], vote_cutoff=manifest["vote_cutoff"], pairs=manifest["counts"],
        settings=asdict(settings), metrics=metrics)
    if trainer.is_world_process_zero():
        with tempfile.TemporaryDirectory(dir=run_dir) as staging:
            trainer.model.save_pretrained(staging, selected_adapters=["default"])  # without the reference copy
            target = adapters.publish(staging, settings.adapters_dir, settings.adapter_name, card)
        print(f"published {target} ({json.dumps(metrics)})", flush=True)
    return card


def main(argv: list[str] | None = None) -> int:
    args = recipe_parser(__doc__, "dpo").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        train(load_config(DpoSettings, args.config, "dpo", args.set))
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
