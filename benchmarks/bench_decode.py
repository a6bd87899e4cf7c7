"""Decode step time against the memory-bandwidth bound.

A decoding step of one row must read every weight of the language model once, so it cannot take
less than (weight bytes ÷ memory bandwidth). The bandwidth is measured here with a large copy on
the same device (what the memory actually delivers, not the data sheet), and the step time is the
difference between a long and a short generation of one row, divided by the extra tokens (so the
prompt's prefill cancels out). The issue's target: within 3× of the bound on a GPU.

    python benchmarks/bench_decode.py                          # tiny and small on the CPU
    python benchmarks/bench_decode.py --compile                # also the compiled decoding setting
    python benchmarks/bench_decode.py --sizes 3b --device cuda --compile  # the full-size model in bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import compare, load_engine, save, table

import torch

from clot import prompts
from clot.engine import Turn
from clot.tasks import Language, Sampling, Task


def weight_bytes(engine) -> int:
    """Bytes of the weights one decoding step reads: the language model and the output head
    (a tied embedding counted once; the vision tower does not run while decoding)."""
    vlm = engine._vlm()
    seen, total = set(), 0
    for module in (vlm.model.language_model, vlm.lm_head):
        for p in module.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write), median of 10."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(11):
        sync()
        start = time.perf_counter()
        target.copy_(source)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(times[1:])


def measure(size: str, args) -> dict:
    """One model's bound and decode step (eager, and compiled with --compile); the model is freed
    on return, before the next size loads."""
    engine = load_engine(size, args.device)
    engine.fixed_length = True
    turn = Turn(prompts.generation_prompt(Task.T2T, Language.EN, "Why did the cat apply for a job?"), Language.EN)
    runs = {n: (lambda n=n: engine.sample([turn], Sampling(seed=0, max_new_tokens=n))) for n in (args.short, args.long)}
    nbytes = weight_bytes(engine)
    speed = bandwidth(engine.device, args.copy_mb)
    bound = nbytes / speed
    result = {"weight_bytes": nbytes, "dtype": str(next(engine.model.parameters()).dtype),
              "bandwidth_bytes_per_s": speed, "bound_ms": bound * 1e3}
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        engine.set_compile(mode == "compiled")  # the warm-up round of compare() pays the compilation
        t = compare(runs, args.repeats)
        for stat in ("median", "min"):  # the step from the median times, and from the least disturbed ones
            long, short = getattr(t[args.long], stat)(), getattr(t[args.short], stat)()
            result[f"{mode}_step_ms_{stat}"] = (long - short) / (args.long - args.short) * 1e3
        result[f"{mode}_ratio"] = result[f"{mode}_step_ms_median"] / 1e3 / bound
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--short", type=int, default=8, help="new tokens of the short generation")
    parser.add_argument("--long", type=int, default=72, help="new tokens of the long generation")
    parser.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth copy")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds after the warm-up one")
    parser.add_argument("--compile", action="store_true", help="also time the static-cache + torch.compile setting")
    parser.add_argument("--name", default="decode", help="results file: benchmarks/results/<name>.json")
    args = parser.parse_args()
    results = {size: measure(size, args) for size in args.sizes.split(",")}
    modes = ("eager", "compiled") if args.compile else ("eager",)
    rows = [[size, mode, r["dtype"], f"{r['weight_bytes'] / 2**20:.0f} MiB",
             f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", r["bound_ms"],
             f"{r[f'{mode}_step_ms_median']:.3f} (min {r[f'{mode}_step_ms_min']:.3f})",
             f"{r[f'{mode}_ratio']:.2f}×"] for size, r in results.items() for mode in modes]
    print(f"Decode step: median (and minimum) of {args.repeats} interleaved rounds of the short and long generation.")
    print(table(["model", "decoding", "dtype", "weights read per step", "measured bandwidth", "bound ms",
                 "decode step ms", "step / bound"], rows))
    last = results[args.sizes.split(",")[-1]]
    best = min((m for m in ("eager", "compiled") if f"{m}_ratio" in last), key=lambda m: last[f"{m}_ratio"])
    print(f"\nHeadline ({args.sizes.split(',')[-1]} model, {args.device}, {best}): one decode step takes "
          f"{last[f'{best}_ratio']:.2f}× the memory-bandwidth bound (target: within 3× on a GPU).")
    print("saved", save(args.name, {"device": args.device, "short": args.short, "long": args.long,
                                   "repeats": args.repeats,
                                   "models": results}))


if __name__ == "__main__":
    main()
