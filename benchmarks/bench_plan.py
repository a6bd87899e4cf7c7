"""The memory plan (training/plan.py) against measured peaks on the CPU, at clot/tiny.py's `small` size.

Every measurement runs in a fresh Python process and reports what it adds to that process's memory:
- weights: the resident memory (RSS) a random-weight small model adds (fp32);
- SFT step: the peak of the tensors one forward + backward creates, with LoRA (r 64 on the LM
  attention, as the presets) and gradient checkpointing, over the resident weights, LoRA and batch;
- KV cache: the bytes of the cache a plain generate call returns (exact, counted from its tensors);
- exploration: the peak of the tensors one engine generate call creates as exploration makes it
  (5 rows per prompt, shared prefixes), over the resident model.
Tensor peaks are torch's own accounting (what max_memory_allocated reports on a GPU); the growth of
the peak RSS, which adds the CPU allocator's slack, is shown next to them. Linux only (/proc).

    python benchmarks/bench_plan.py                         # batch 2 × 1024 positions, 2 prompts × 5 rows
    python benchmarks/bench_plan.py --labelled-tokens 128   # once the loss runs the LM head on labels only
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile

import torch
import torch.utils._pytree as pytree
from common import photo, save, table
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from clot import tiny
from clot.tasks import Language
from training import plan
from training.sft import LM_ATTENTION

SIZE = "small"
NEW_TOKENS = 16
ROWS_PER_PROMPT = 5
MiB = 2**20


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS


class TensorPeak(TorchDispatchMode):
    """The peak bytes of the tensors created while it is active (forward, backward and recompute), as
    torch accounts them: what a GPU's max_memory_allocated reports, without the CPU allocator's slack."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {value.untyped_storage()._cdata for value in pytree.tree_leaves((args, kwargs))
                  if isinstance(value, torch.Tensor)}
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                storage = value.untyped_storage()
                key = storage._cdata
                if key in inputs or (key in self.live and not self.live[key][0].expired()):
                    continue  # a view or in-place result: no new memory
                if key in self.live:  # freed and its address reused
                    self.current -= self.live.pop(key)[1]
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        if self.current > self.peak:  # only a new peak needs the freed storages subtracted
            self._sweep()
            self.peak = max(self.peak, self.current)
        return out


def _peaks(action) -> dict:
    """Run `action()`; the peak of the tensors it creates and the growth of the process's peak RSS."""
    tracker = TensorPeak()
    _reset_peak()
    before = _status("VmRSS")
    with tracker:
        action()
    return {"tensors": tracker.peak, "rss": _status("VmHWM") - before}


def _model(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(tiny.SEED)
    return Qwen2_5_VLForConditionalGeneration._from_config(tiny.model_config(SIZE, processor.tokenizer),
                                                           dtype=torch.float32, attn_implementation="sdpa")


def measure_weights(args) -> dict:
    processor = tiny.build_processor(SIZE)
    gc.collect()
    before = _status("VmRSS")
    model = _model(processor)
    gc.collect()
    return {"weights": _status("VmRSS") - before, "parameters": sum(p.numel() for p in model.parameters())}


def _training_batch(processor, rows: int, length: int, labelled: int) -> dict:
    """`rows` copies of one example: a 448 × 448 photo (256 tokens at the small size's cap), then text
    up to `length` positions, with labels on the last `labelled` positions."""
    text = " ".join(f"word{i}" for i in range(length))
    conversation = [{"role": "user", "content": [{"type": "image", "image": photo()}, {"type": "text", "text": text}]}]
    encoded = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    ids = encoded["input_ids"][:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"the example has only {ids.shape[1]} positions; lower --length")
    labels = torch.full_like(ids, -100)
    labels[:, -labelled:] = ids[:, -labelled:]
    batch = {"input_ids": ids.repeat(rows, 1), "attention_mask": torch.ones(rows, length, dtype=torch.long),
             "labels": labels.repeat(rows, 1), "pixel_values": encoded["pixel_values"].repeat(rows, 1),
             "image_grid_thw": encoded["image_grid_thw"].repeat(rows, 1)}
    if "mm_token_type_ids" in encoded:
        batch["mm_token_type_ids"] = encoded["mm_token_type_ids"][:, :length].repeat(rows, 1)
    return batch


def measure_sft(args) -> dict:
    from peft import LoraConfig, get_peft_model

    processor = tiny.build_processor(SIZE)
    model = get_peft_model(_model(processor), LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05,
                                                         target_modules=LM_ATTENTION))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _training_batch(processor, args.batch, args.length, args.labelled_tokens or args.length)
    return {**_peaks(lambda: model(**batch).loss.backward()),
            "lora": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _exploration_turns(prompts: int):
    from clot.engine import Turn

    nouns = ["cat", "moon", "tax", "soup", "sock"]
    images = [photo(seed=p) for p in range(prompts)]  # one object per prompt: its rows share its prefix
    return [Turn(f"Write a funny caption for this picture, about: {noun}.", Language.EN, image)
            for image in images for noun in nouns[:ROWS_PER_PROMPT]]


def measure_kv(args) -> dict:
    from clot.engine import Engine

    processor = tiny.build_processor(SIZE)
    with tempfile.TemporaryDirectory() as adapters:
        engine = Engine(_model(processor), processor, base_model=SIZE, adapters_dir=adapters)
        inputs = engine.encode(_exploration_turns(args.prompts))
        with torch.no_grad():
            out = engine.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False, return_dict_in_generate=True,
                                        pad_token_id=processor.tokenizer.pad_token_id)
    cache = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)
    # the cache holds every position but the last generated token, which was never fed back
    return {"kv": cache, "cached_positions": out.past_key_values.get_seq_length(),
            "prompt_positions": inputs["input_ids"].shape[1]}


def measure_explore(args) -> dict:
    from clot.engine import Engine, Turn
    from clot.tasks import Sampling

    processor = tiny.build_processor(SIZE)
    with tempfile.TemporaryDirectory() as adapters:
        engine = Engine(_model(processor), processor, base_model=SIZE, adapters_dir=adapters)
        engine.fixed_length = True  # random weights: always generate max_new_tokens
        sampling = Sampling(max_new_tokens=NEW_TOKENS, seed=0)
        engine.sample([Turn("warm up", Language.EN)], Sampling(max_new_tokens=2, seed=0))  # lazy set-up, text only
        turns = _exploration_turns(args.prompts)
        prompt_positions = engine.encode(turns)["input_ids"].shape[1]
        return {**_peaks(lambda: engine.sample(turns, sampling)), "prompt_positions": prompt_positions}


MEASUREMENTS = {"weights": measure_weights, "sft": measure_sft, "kv": measure_kv, "explore": measure_explore}


def _run_fresh(name: str, args) -> dict:
    command = [sys.executable, __file__, "--measure", name, "--batch", str(args.batch), "--length", str(args.length),
               "--labelled-tokens", str(args.labelled_tokens), "--prompts", str(args.prompts)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="SFT rows")
    parser.add_argument("--length", type=int, default=1024, help="SFT positions per row")
    parser.add_argument("--labelled-tokens", type=int, default=0,
                        help="labelled positions per row: the plan's LM-head assumption (0: the loss makes "
                             "logits at every position, as training/sft.py's loss on this branch)")
    parser.add_argument("--prompts", type=int, default=2, help="exploration prompts (5 rows each)")
    parser.add_argument("--measure", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        torch.set_num_threads(2)
        print(json.dumps(MEASUREMENTS[args.measure](args)))
        return

    measured = {name: _run_fresh(name, args) for name in MEASUREMENTS}
    arch = plan.tiny_architecture(SIZE)
    assume = plan.Assumptions(labelled_tokens=args.labelled_tokens, overhead_gb=0)
    image = arch.image_tokens(tiny.SIZES[SIZE]["max_image_tokens"])
    lora = plan.lora_parameters(arch, LM_ATTENTION, 64)
    sft = plan.Stage("SFT", "train", image_tokens=image, positions=args.length, batch=args.batch, accumulation=1,
                     precision="fp32", on_gpu=False, lora=lora, checkpointing=True)
    explore_positions = measured["explore"]["prompt_positions"] + NEW_TOKENS
    explore = plan.Stage("exploration", "explore", image_tokens=image, positions=explore_positions,
                         batch=args.prompts, accumulation=1, precision="fp32", on_gpu=False, lora=0,
                         rows_per_batch=ROWS_PER_PROMPT, new_tokens=NEW_TOKENS)
    weights = plan.weight_bytes(arch, 4, base_4bit=False)
    kv_positions = measured["kv"]["prompt_positions"] + NEW_TOKENS
    # what each measurement adds: a step adds its activations, logits, vision and the LoRA gradients
    # (not Adam's moments, made by the optimiser step; its batch is made before); a generate call
    # adds all but the weights
    rows = [
        ("weights (fp32), RSS", weights, measured["weights"]["weights"], None),
        ("SFT step peak over weights + LoRA + the batch", sft.total(arch, assume) - weights - lora * 12
         - plan.pixel_bytes(args.batch, image),
         measured["sft"]["tensors"], measured["sft"]["rss"]),
        ("exploration KV cache, plain generate", args.prompts * ROWS_PER_PROMPT * kv_positions
         * arch.kv_bytes_per_position(4), measured["kv"]["kv"], None),
        ("exploration generate peak over weights", explore.total(arch, assume) - weights,
         measured["explore"]["tensors"], measured["explore"]["rss"]),
    ]
    results = [{"part": part, "estimate_mib": round(estimate / MiB, 1), "measured_mib": round(actual / MiB, 1),
                "estimate_over_measured": round(estimate / actual, 2),
                "rss_growth_mib": round(rss / MiB, 1) if rss is not None else None}
               for part, estimate, actual, rss in rows]
    print(f"small: {arch.parameters():,} parameters (model: {measured['weights']['parameters']:,}), LoRA r 64 "
          f"{lora:,} (peft: {measured['sft']['lora']:,}); SFT {args.batch} rows × {args.length} positions, "
          f"LM head on {f'{args.labelled_tokens} positions' if args.labelled_tokens else 'every position'} of a row; "
          f"exploration {args.prompts} prompts × "
          f"{ROWS_PER_PROMPT} rows × {explore_positions} positions. Measured: torch's tensor accounting "
          "(RSS for the weights; the RSS growth, allocator slack included, for reference)")
    print(table(["part", "estimate MiB", "measured MiB", "estimate / measured", "RSS growth MiB"],
                [[r["part"], r["estimate_mib"], r["measured_mib"], r["estimate_over_measured"],
                  "" if r["rss_growth_mib"] is None else r["rss_growth_mib"]] for r in results]))
    print(f"saved {save('plan', {'settings': vars(args), 'measured': measured, 'results': results})}")


if __name__ == "__main__":
    main()
