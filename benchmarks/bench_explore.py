"""Stage-2 exploration throughput: prompts per second, batched across prompts vs one prompt at a time.

Every run explores the same training prompts of the bundled sample with the same settings (5
conditions, rank, select), on a random-weight model with a fixed number of new tokens. Time inside
the language model is split into prefill (forward passes over many tokens: prompts, and the ranking
and selection questions) and decode (one token per row per step), to show what batching buys.

    python benchmarks/bench_explore.py                    # tiny and small models, batches of 8 and 16
    python benchmarks/bench_explore.py --sizes tiny --repeats 5   # quick and steadier
    python benchmarks/bench_explore.py --sizes 3b --device cuda   # full size, bf16, random weights
"""

from __future__ import annotations

import argparse
import time

from common import compare, load_engine, save, table

from clot import data as oogiri
from clot.nouns import load_nouns
from clot.tasks import Language
from training import explore as ex


class PhaseClock:
    """Seconds spent in the language model's forward passes, by kind (prefill or decode)."""

    def __init__(self, module):
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self._start = 0.0
        module.register_forward_pre_hook(self._enter, with_kwargs=True)
        module.register_forward_hook(self._leave, with_kwargs=True)

    def _enter(self, module, args, kwargs):
        self._start = time.perf_counter()

    def _leave(self, module, args, kwargs, output):
        tokens = kwargs["inputs_embeds"].shape[1]
        self.seconds["decode" if tokens == 1 else "prefill"] += time.perf_counter() - self._start

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def run(engine, clock, prompts, images, nouns, settings) -> dict:
    engine.prefixes.clear()  # nothing left over from the other strategy
    clock.reset()
    start = time.perf_counter()
    for at in range(0, len(prompts), settings.prompts_per_batch):
        ex.explore_batch(engine, prompts[at:at + settings.prompts_per_batch], images, nouns, settings)
    total = time.perf_counter() - start
    return {"prompts_per_second": len(prompts) / total, "seconds": total, **clock.seconds,
            "other": total - sum(clock.seconds.values())}


def max_rate(runs) -> float:
    """The best prompts per second: that of the least disturbed (fastest) round."""
    return max(r["prompts_per_second"] for r in runs.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batches", default="8,16", help="prompts per generate call to compare with 1")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds after the warm-up one")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU figures (with --sizes 3b)")
    args = parser.parse_args()
    dataset = oogiri.load(oogiri.SAMPLE_DIR)
    prompts = [p for p in dataset.prompts() if p.answers][:args.prompts]
    nouns = {lang: load_nouns(lang) for lang in Language}
    batches = [1] + [int(b) for b in args.batches.split(",")]
    rows, results = [], {}
    for size in args.sizes.split(","):
        engine = load_engine(size, args.device)
        engine.fixed_length = True
        clock = PhaseClock(engine._vlm().model.language_model)
        settings = {b: ex.ExploreSettings(max_new_tokens=args.new_tokens, prompts_per_batch=b) for b in batches}
        runs = compare({b: lambda b=b: run(engine, clock, prompts, dataset.images, nouns, settings[b])
                        for b in batches}, args.repeats)
        results[size] = {b: r.summary() for b, r in runs.items()}
        one = runs[1]
        for b, r in runs.items():
            rows.append([size, b, f"{r.median('prompts_per_second'):.3f} (max {max_rate(r):.3f})", r.median("prefill"),
                         r.median("decode"), r.median("other"),
                         f"{one.median() / r.median():.2f}× (min {one.min() / r.min():.2f}×)",
                         f"{one.median('decode') / r.median('decode'):.2f}×"])
    print(f"Medians (and the best) of {args.repeats} interleaved rounds.")
    print(table(["model", "prompts per call", "prompts/s", "prefill s", "decode s", "other s",
                 "speed-up", "decode speed-up"], rows))
    last, best = args.sizes.split(",")[-1], batches[1]
    print(f"\nHeadline ({last} model, {best} prompts per call): batched exploration explores "
          f"{results[last][1]['seconds']['median'] / results[last][best]['seconds']['median']:.2f}× "
          "the prompts per second of one at a time.")
    print("saved", save("explore" if args.device == "cpu" else f"explore-{args.device}", {"prompts": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats,
                                    "by_prompts_per_call": results}))


if __name__ == "__main__":
    main()
