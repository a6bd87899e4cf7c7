"""Peak memory of one SFT step (forward + backward) with the real vocabulary: the model's own loss
over full-vocabulary logits against the LM head on labelled rows only (clot/losses.py).

The `small` model of clot/tiny.py with Qwen2's real vocabulary size (151,936; random weights and
random token ids), LoRA r=64 on attention as in training/sft.py, each row's last `--answer` tokens
labelled. Each variant runs in a fresh process; on the CPU its peak is the process's resident-set
high-water mark, reset just before the step (Linux), on CUDA the allocator's peak.

    python benchmarks/bench_memory.py                          # small, batch 4 × 512, CPU
    python benchmarks/bench_memory.py --device cuda --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import save, table

REAL_VOCAB = 151936  # Qwen2's embedding rows (151,643 BPE tokens, 22 special, padding)
VARIANTS = {"full": "full logits (model's loss)", "labelled": "labelled rows only"}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device: torch.device) -> float:
    """Reset the peak counter; return the memory in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _rss_mib("VmRSS")


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib("VmHWM")


def one_step(variant: str, size: str, batch: int, seq: int, answer: int, device: torch.device) -> dict:
    """Build the model and a batch, then measure one forward + backward of `variant`."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from clot import losses, tiny
    from clot.families import family_for

    config = tiny.model_config(size, tiny.build_tokenizer())
    config.text_config.vocab_size = REAL_VOCAB
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    targets = family_for(model.config).lora_targets
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, REAL_VOCAB - 300, (batch, seq), generator=generator).to(device)
    labels = torch.full_like(ids, losses.IGNORE)
    labels[:, -answer:] = ids[:, -answer:]
    mask = torch.ones_like(ids)

    before = _reset_peak(device)
    start = time.perf_counter()
    if variant == "full":
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        head = model.get_output_embeddings()
        with losses.head_bypassed(head):
            hidden_states = model(input_ids=ids, attention_mask=mask).logits
        loss = losses.causal_lm_loss(hidden_states, head, labels)
    loss.backward()
    peak = _peak(device)
    return {"variant": variant, "loss": loss.item(), "before_mib": before, "peak_mib": peak,
            "step_mib": peak - before, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer", type=int, default=64, help="labelled tokens at the end of every row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one measurement
    parser.add_argument("--name", default=None, help="results file name (default memory, memory-cuda on CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.variant:
        print(json.dumps(one_step(args.variant, args.size, args.batch, args.seq, args.answer, device)))
        return

    results, rows = {}, []
    logits_mib = args.batch * args.seq * REAL_VOCAB * 4 / 2**20  # one fp32 [batch, seq, vocab] tensor
    for variant, label in VARIANTS.items():
        command = [sys.executable, __file__, "--variant", variant, "--size", args.size, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--answer", str(args.answer), "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[variant]
        rows.append([label, f"{r['loss']:.4f}", f"{r['before_mib']:,.0f}", f"{r['peak_mib']:,.0f}",
                     f"{r['step_mib']:,.0f}", f"{r['seconds']:.1f}"])
    print(f"{args.size}, vocabulary {REAL_VOCAB:,}, batch {args.batch} × {args.seq}, {args.answer} labelled tokens "
          f"per row, {args.device}; one fp32 [batch, seq, vocab] tensor = {logits_mib:,.0f} MiB")
    print(table(["loss computed on", "loss value", "model loaded MiB", "peak MiB", "step MiB", "step s"], rows))
    ratio = results["full"]["step_mib"] / results["labelled"]["step_mib"]
    print(f"the step's own memory: {ratio:.1f}× less on labelled rows")
    name = args.name or ("memory-cuda" if device.type == "cuda" else "memory")
    print("saved", save(name, {"size": args.size, "vocab_size": REAL_VOCAB, "batch": args.batch, "seq": args.seq,
                               "answer_tokens": args.answer, "device": args.device, "results": results,
                               "step_memory_ratio": ratio}))


if __name__ == "__main__":
    main()
