"""Stage-1 training (AIT): LoRA supervised fine-tuning on the instruction set, loss on the answer only.

    python training/sft.py --config training/configs/tiny.yaml --set max_steps=20
    accelerate launch --num_processes 2 training/sft.py --config ...    # or: torchrun --nproc_per_node 2 ...

transformers.Trainer runs the loop (multi-process through accelerate, resuming, TensorBoard,
progress bar), peft adds LoRA to the language model's attention projections, and our collator
encodes every example exactly as the engine does at inference. Output in <run_dir>/:
checkpoints/, loss.csv, tensorboard/, and the adapter published to <adapters_dir>/<adapter_name>/
with its clot.json card. Re-running the same command after an interruption resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from training import instructions as instruction_set  # noqa: E402
from training.config import SHARED, load_config, recipe_parser, resolve_base_model  # noqa: E402

from clot import adapters  # noqa: E402
from clot import data as oogiri  # noqa: E402
from clot import losses  # noqa: E402
from clot.families import family_for  # noqa: E402
from clot.engine import DEFAULT_MAX_IMAGE_TOKENS, Turn, load_processor, prepare_image  # noqa: E402
from clot.tasks import ClotError, Language  # noqa: E402

log = logging.getLogger(__name__)

IGNORE = losses.IGNORE  # label value the loss skips


@dataclass
class TrainSettings:
    base_model: str = "tiny"
    run_dir: str = "runs/tiny"
    seed: int = 0
    instructions: str = ""  # default <run_dir>/instructions; built from the recipe when missing
    adapter_name: str = "stage1"
    adapters_dir: str = "adapters"
    stage: int = 1
    round: int = 0
    # LoRA and optimiser: the paper's Qwen-VL settings.
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str = ""  # a regex over module names, or a comma-separated list; "" = the family's (clot/families)
    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    lr_scheduler_type: str = "cosine"  # not stated in the paper
    warmup_steps: int = 0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    eval_samples: int = 256  # held-out instructions scored before and after training (0: none)
    max_length: int = 2048  # longer examples lose the end of their answer
    max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS  # visual tokens per image; the engine uses the same cap
    precision: str = "auto"  # auto (bf16 on a bf16 GPU, fp16 on another GPU, fp32 on CPU), bf16, fp16, fp32
    activation_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    dataloader_num_workers: int = 0
    device: str = "auto"  # auto or cpu
    resume: str = "auto"  # auto: from the last complete checkpoint; never; or a checkpoint folder
    # Stage 2: more training records (JSONL files, comma-separated) and an adapter to continue from.
    extra_records: str = ""
    init_adapter: str = ""  # an adapter folder; empty: a fresh LoRA on the base model

    @property
    def instructions_dir(self) -> Path:
        return Path(self.instructions or Path(self.run_dir) / "instructions")

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"


# ---------------------------------------------------------------- data
class InstructionDataset(torch.utils.data.Dataset):
    """Records kept as their JSON lines: far less memory than ~500k dicts, in every data-loader worker."""

    def __init__(self, paths: Path | list[Path], limit: int | None = None):
        self.lines = []
        for path in paths if isinstance(paths, list) else [paths]:
            with open(path, encoding="utf-8") as f:
                self.lines += [line for line in f if line.strip()]
        self.lines = self.lines[:limit]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict:
        return json.loads(self.lines[index])


class Collator:
    """Instruction records → a right-padded batch with labels on the answer (and its end-of-turn) only.

    Each example is encoded with the engine's own conversation (clot.engine.Turn) and the
    processor's chat template, once with the generation prompt (the prompt) and once with the
    answer appended (the full example). The prompt must be a prefix of the full example; the
    labels cover the tokens after it up to and including the first <|im_end|>."""

    def __init__(self, processor, images: oogiri.ImageStore, max_length: int = 2048):
        self.processor = processor
        self.images = images
        self.max_length = max_length
        self.pad_id = processor.tokenizer.pad_token_id
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _tokens(self, conversation: list[dict], add_generation_prompt: bool) -> dict:
        return self.processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=True, return_tensors="pt",
                                                  sanitize_control_tokens=True)

    def encode(self, record: dict) -> dict:
        image = prepare_image(self.images.open(record["image"])) if record.get("image") else None
        conversation = Turn(record["user"], Language.parse(record["lang"]), image).conversation()
        prompt = self._tokens(conversation, add_generation_prompt=True)
        answer = {"role": "assistant", "content": [{"type": "text", "text": record["answer"]}]}
        full = self._tokens(conversation + [answer], add_generation_prompt=False)
        ids = full["input_ids"][0]
        start = prompt["input_ids"].shape[1]
        if not torch.equal(ids[:start], prompt["input_ids"][0]):
            raise ClotError(f"Record {record.get('id')}: the chat template does not end the prompt where the "
                            "answer starts, so the answer cannot be masked reliably.")
        ends = (ids[start:] == self.end_id).nonzero()
        stop = start + int(ends[0]) + 1 if len(ends) else len(ids)
        labels = torch.full_like(ids, IGNORE)
        labels[start:stop] = ids[start:stop]
        if start >= self.max_length:
            raise ClotError(f"Record {record.get('id')}: its prompt alone is {start} tokens, over "
                            f"max_length {self.max_length}; raise max_length or use smaller images.")
        example = {key: value[0] for key, value in full.items() if key in ("input_ids", "attention_mask",
                                                                           "mm_token_type_ids")}
        example = {key: value[:self.max_length] for key, value in example.items()}
        example["labels"] = labels[:self.max_length]
        for key in ("pixel_values", "image_grid_thw"):  # per-image rows, concatenated across a batch
            if key in full:
                example[key] = full[key]
        return example

    def __call__(self, records: list[dict]) -> dict:
        examples = [self.encode(r) for r in records]
        width = max(len(e["input_ids"]) for e in examples)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE}
        batch = {}
        for key, value in fill.items():
            if key in examples[0]:
                rows = [torch.cat([e[key], torch.full((width - len(e[key]),), value, dtype=e[key].dtype)])
                        for e in examples]
                batch[key] = torch.stack(rows)
        for key in ("pixel_values", "image_grid_thw"):
            parts = [e[key] for e in examples if key in e]
            if parts:
                batch[key] = torch.cat(parts)
        return batch


# ---------------------------------------------------------------- the loss
class LabelledRowsTrainer(Trainer):
    """Trainer whose loss runs the LM head on the labelled positions only (clot.losses), instead of
    the model's own loss over full-vocabulary logits at every position. The value is the same
    (including Trainer's gradient-accumulation normalisation by `num_items_in_batch`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        head = self.model.get_output_embeddings()  # self.model: not wrapped for distributed training
        with losses.head_bypassed(head):
            hidden_states = model(**inputs).logits  # the final hidden states: the head passed them through
        if not self.model_accepts_loss_kwargs:  # as Trainer does: a per-batch mean, divided by the accumulation steps
            num_items_in_batch = None
        loss = losses.causal_lm_loss(hidden_states, head, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens; gradients are averaged over processes
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return (loss, {}) if return_outputs else loss


# ---------------------------------------------------------------- logging and checkpoints
class CsvLog(TrainerCallback):
    """Appends every logged loss to a CSV (main process only), so a resumed run continues the file."""

    FIELDS = ("time", "step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not any(k in (logs or {}) for k in self.FIELDS[3:]):
            return
        new = not self.path.exists()
        row = {"time": f"{time.time():.0f}", "step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        row.update({k: logs[k] for k in self.FIELDS[3:] if k in logs})
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was completely written (Trainer writes trainer_state.json last)."""
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


# Settings a rerun may change and still resume the checkpoints: they do not change what the
# checkpoints hold (max_steps and epochs: a run can be extended).
RESUMABLE_CHANGES = {"resume", "device", "logging_steps", "save_steps", "save_total_limit", "adapters_dir",
                     "adapter_name", "dataloader_num_workers", "eval_samples", "max_steps", "num_train_epochs"}


def _recipe(settings: TrainSettings) -> dict:
    return json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k not in RESUMABLE_CHANGES}))


def resume_point(settings: TrainSettings, recipe: dict | None = None) -> Path | None:
    """For resume: auto, the newest complete checkpoint, if this recipe made it and it is not past
    this run's last step. Checkpoints of another recipe (say, a stage redone with other settings)
    are cleared, so the run starts over instead of continuing someone else's training.
    `recipe` replaces the one read from the settings (stage 3 adds its pairs to it)."""
    recipe = recipe or _recipe(settings)
    folder = settings.checkpoints_dir
    recipe_file = folder / "recipe.json"
    checkpoint = last_checkpoint(folder)
    if checkpoint is not None:
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        same = not recipe_file.is_file() or json.loads(recipe_file.read_text()) == recipe
        if same and (settings.max_steps <= 0 or step <= settings.max_steps):
            return checkpoint
        print(f"not resuming {checkpoint}: it was made with other settings; starting over", flush=True)
        start_over(settings, recipe)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        adapters.write_json_atomic(recipe_file, recipe)
    return None


def start_over(settings: TrainSettings, recipe: dict | None = None) -> None:
    """Clear the checkpoints and the loss log of earlier runs (a later `resume: auto` would pick up
    their stale steps), and record this run's recipe (`recipe`, or the one read from the settings)."""
    shutil.rmtree(settings.checkpoints_dir, ignore_errors=True)
    (Path(settings.run_dir) / "loss.csv").unlink(missing_ok=True)
    settings.checkpoints_dir.mkdir(parents=True)
    adapters.write_json_atomic(settings.checkpoints_dir / "recipe.json", recipe or _recipe(settings))


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- training
def _target_modules(spec: str):
    """A regex string as is (peft matches it against full names), or a list of name suffixes from
    "q_proj,v_proj" or "c_attn,attn.c_proj" (a dot alone does not make a regex)."""
    if any(ch in spec for ch in "*()|[]\\^$+?"):
        return spec
    return [name.strip() for name in spec.split(",") if name.strip()]


def _precision(settings: TrainSettings, use_cpu: bool) -> tuple[torch.dtype, dict]:
    choice = settings.precision
    if choice == "auto":
        choice = "fp32" if use_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    table = {"fp32": (torch.float32, {}), "bf16": (torch.bfloat16, {"bf16": True}),
             "fp16": (torch.float32, {"fp16": True})}  # fp16: fp32 weights under autocast with a grad scaler
    if choice not in table:
        raise ClotError(f"Unknown precision {settings.precision!r}: use auto, bf16, fp16 or fp32.")
    return table[choice]


def _files_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _instruction_overrides(overrides: list[str]) -> list[str]:
    """The --set values that concern instruction building: shared keys and `instructions.*`."""
    return [item for item in overrides
            if item.startswith("instructions.") or item.partition("=")[0].strip() in SHARED]


def train(settings: TrainSettings, config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train (or resume), evaluate before and after on held-out instructions, publish the adapter.
    Returns the card (on every process; only the main process publishes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, TrainingArguments

    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    use_cpu = settings.device == "cpu" or not torch.cuda.is_available()
    dtype, precision_flags = _precision(settings, use_cpu)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")  # Trainer's TensorBoard reads this
    args = TrainingArguments(
        output_dir=str(settings.checkpoints_dir), seed=settings.seed, use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2,
        lr_scheduler_type=settings.lr_scheduler_type, warmup_steps=settings.warmup_steps,
        num_train_epochs=settings.num_train_epochs, max_steps=settings.max_steps,
        logging_steps=settings.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=settings.save_total_limit,
        eval_strategy="no", report_to=["tensorboard"], label_names=["labels"],
        remove_unused_columns=False, dataloader_num_workers=settings.dataloader_num_workers,
        activation_checkpointing=settings.activation_checkpointing,  # (transformers 5 name; gradient_* warns)
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs (LoRA)
        **precision_flags,
    )
    with args.main_process_first(desc="preparing the base model and instructions"):
        base_path = resolve_base_model(settings.base_model)
        folder = settings.instructions_dir
        if not (folder / "manifest.json").is_file():
            if settings.instructions:
                raise ClotError(f"No instruction set in {folder}.")
            recipe = load_config(instruction_set.InstructionSettings, config_path, "instructions",
                                 _instruction_overrides(overrides or []))
            instruction_set.build(recipe)
        if settings.resume == "never":
            start_over(settings)
        checkpoint = resume_point(settings) if settings.resume == "auto" else None
    manifest = instruction_set.read_manifest(folder)
    extra_files = [Path(f.strip()) for f in settings.extra_records.split(",") if f.strip()]
    for path in extra_files:
        if not path.is_file():
            raise ClotError(f"Extra training records {path} do not exist.")
    train_set = InstructionDataset([folder / "train.jsonl"] + extra_files)
    eval_set = InstructionDataset(folder / "test.jsonl", settings.eval_samples)

    processor = load_processor(base_path, settings.max_image_tokens)
    family = family_for(AutoConfig.from_pretrained(base_path))
    model = family.model_class().from_pretrained(base_path, dtype=dtype)
    fingerprint = adapters.base_fingerprint(model.config)
    if settings.init_adapter:  # continue training an earlier adapter (stage 2 by default)
        from peft import PeftModel

        adapters.validate(Path(settings.init_adapter), fingerprint)
        model = PeftModel.from_pretrained(model, settings.init_adapter, is_trainable=True)
    else:
        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules=_target_modules(settings.target_modules) or family.lora_targets)
        model = get_peft_model(model, lora)

    collator = Collator(processor, oogiri.image_store(manifest["data"]), settings.max_length)
    trainer = LabelledRowsTrainer(model=model, args=args, train_dataset=train_set,
                      eval_dataset=eval_set if len(eval_set) else None,
                      data_collator=collator, callbacks=[CsvLog(run_dir / "loss.csv")])

    if settings.resume not in ("auto", "never"):
        checkpoint = Path(settings.resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ClotError(f"{checkpoint} is not a complete checkpoint folder.")
    start_file = run_dir / "eval_before.json"
    if checkpoint is None:
        before = trainer.evaluate()["eval_loss"] if len(eval_set) else None
        if trainer.is_world_process_zero():
            adapters.write_json_atomic(start_file, {"eval_loss": before})
    else:
        print(f"resuming from {checkpoint}", flush=True)
        before = json.loads(start_file.read_text())["eval_loss"] if start_file.is_file() else None
    state = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint else None
    if state and state["global_step"] >= (settings.max_steps if settings.max_steps > 0 else state["max_steps"]):
        # Killed after its last step (while evaluating or publishing): take the trained weights as
        # they are. Resumed there, Trainer would run one step too many before noticing.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / adapters.WEIGHTS)))
        losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        steps, train_loss = state["global_step"], sum(losses) / len(losses) if losses else None
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        steps, train_loss = trainer.state.global_step, result.training_loss
    after = trainer.evaluate()["eval_loss"] if len(eval_set) else None

    metrics = {"train_loss": train_loss, "steps": steps,
               "eval_loss_before": before, "eval_loss_after": after,
               "train_instructions": len(train_set), "eval_instructions": len(eval_set)}
    card = adapters.make_card(
        base_model=settings.base_model, fingerprint=fingerprint, stage=settings.stage, round=settings.round,
        base_model_path=base_path, data_hash=manifest["data_hash"], split_hash=manifest["split_hash"],
        instructions_hash=manifest["files"]["train"]["hash"],
        extra_records_hash=_files_hash(extra_files) if extra_files else None,
        settings=asdict(settings), metrics=metrics)
    if trainer.is_world_process_zero():
        with tempfile.TemporaryDirectory(dir=run_dir) as staging:
            trainer.model.save_pretrained(staging)
            target = adapters.publish(staging, settings.adapters_dir, settings.adapter_name, card)
        print(f"published {target} ({json.dumps(metrics)})", flush=True)
    return card


def main(argv: list[str] | None = None) -> int:
    args = recipe_parser(__doc__, "training").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_config(TrainSettings, args.config, "training", args.set)
        train(settings, args.config, args.set)
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
