"""Training throughput of the stage-1 SFT step: tokens per second (forward + backward + optimiser).

Runs real instruction batches of the bundled sample through the same collator and LoRA setup as
training/sft.py, on a random-weight model, and counts the tokens that reach the model.

    python benchmarks/bench_train.py                  # tiny and small models
    python benchmarks/bench_train.py --sizes small --steps 6 --batch 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import save, table

from clot import data as oogiri
from clot import tiny
from clot.engine import load_processor
from clot.families import family_for
from training import instructions as ins
from training import sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    with tempfile.TemporaryDirectory() as run:
        settings = ins.InstructionSettings(run_dir=run, test_ratio=0.2, literal_model="none")
        ins.build(settings)
        records = ins.read_records(settings.out_dir, "train")
    rows, results = [], {}
    for size in args.sizes.split(","):
        folder = tiny.build(Path(tempfile.gettempdir()) / f"clot-bench-{size}", size=size)
        processor = load_processor(str(folder))
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        targets = family_for(model.config).lora_targets
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules=targets))
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        collator = sft.Collator(processor, oogiri.image_store(oogiri.SAMPLE_DIR))
        batches = [collator(records[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps + 1)]
        tokens, elapsed = 0, 0.0
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            if i:  # the first step warms up
                elapsed += time.perf_counter() - start
                tokens += int(batch["attention_mask"].sum())
        results[size] = {"tokens_per_second": tokens / elapsed, "steps": args.steps, "batch": args.batch,
                         "tokens": tokens}
        rows.append([size, args.batch, args.steps, tokens, tokens / elapsed])
    print(table(["model", "batch", "steps", "tokens", "tokens/s"], rows))
    print("saved", save("train", {"results": results}))


if __name__ == "__main__":
    main()
