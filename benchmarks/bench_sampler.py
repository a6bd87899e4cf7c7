"""Cost of picking the next token: transformers' sampling against the engine's Sampler.

transformers applies temperature, top-k and top-p to the whole vocabulary (top-p sorts all of it)
and then runs multinomial over it; clot.engine.Sampler works on the top-k logits only. Both are
timed per decoding step on random logits, for the tiny model's vocabulary and the real Qwen2.5-VL
one, at 1, 9 and 40 rows (one candidate; a k=9 request; an exploration batch).

    python benchmarks/bench_sampler.py
    python benchmarks/bench_sampler.py --device cuda
"""

from __future__ import annotations

import argparse

from common import compare, ratio, save, spread, table

import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from clot.engine import Sampler
from clot.tasks import Sampling

VOCABS = {"tiny": 4000, "qwen2.5-vl": 151936}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="1,9,40")
    parser.add_argument("--steps", type=int, default=20, help="decoding steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds after the warm-up one")
    args = parser.parse_args()
    device = torch.device(args.device)
    sampling = Sampling(seed=0).validate()  # the demo's defaults: temperature, top-k 50, top-p
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature), TopKLogitsWarper(sampling.top_k),
                                   TopPLogitsWarper(sampling.top_p)])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows_out, results = [], {}
    for name, vocab in VOCABS.items():
        for rows in [int(r) for r in args.rows.split(",")]:
            logits = torch.randn(rows, vocab, device=device) * 3

            def transformers_way():
                for _ in range(args.steps):
                    torch.multinomial(torch.softmax(warpers(None, logits.clone()), dim=-1), 1)
                sync()

            sampler = Sampler(sampling, device)

            def ours():
                for _ in range(args.steps):
                    sampler(None, logits.clone()).argmax(-1)  # generate's greedy step
                sync()

            t = compare({"transformers": transformers_way, "sampler": ours}, args.repeats)
            ms_per_step = 1000 / args.steps
            results[f"{name}/rows={rows}"] = {way: {"median": runs.median() * ms_per_step, "min": runs.min() * ms_per_step}
                                              for way, runs in t.items()}
            rows_out.append([name, vocab, rows, spread(t["transformers"], scale=ms_per_step),
                             spread(t["sampler"], scale=ms_per_step), ratio(t["transformers"], t["sampler"])])
    print(f"Median (and minimum) of {args.repeats} interleaved rounds.")
    print(table(["vocabulary", "size", "rows", "transformers ms/step", "Sampler ms/step", "speed-up"], rows_out))
    rows = 9 if "qwen2.5-vl/rows=9" in results else int(args.rows.split(",")[-1])
    last = results[f"qwen2.5-vl/rows={rows}"]
    print(f"\nHeadline (Qwen2.5-VL vocabulary, {rows} rows, medians): the Sampler picks a token "
          f"{last['transformers']['median'] / last['sampler']['median']:.1f}× faster than transformers' sampling.")
    print("saved", save("sampler", {"device": str(device), "steps": args.steps, "repeats": args.repeats,
                                   "ms_per_step": results}))


if __name__ == "__main__":
    main()
