"""Stage-2 exploration throughput: prompts per second, batched across prompts vs one prompt at a time.

Both runs explore the same training prompts of the bundled sample with the same settings (5
conditions, rank, select), on a random-weight model with a fixed number of new tokens.

    python benchmarks/bench_explore.py                    # tiny and small models
    python benchmarks/bench_explore.py --sizes small --prompts 16 --batch 8
"""

from __future__ import annotations

import argparse
import time

from common import load_engine, save, table

from clot import data as oogiri
from clot.nouns import load_nouns
from clot.tasks import Language
from training import explore as ex


def throughput(engine, prompts, images, nouns, settings) -> float:
    engine.prefixes.clear()  # nothing left over from the other strategy
    start = time.perf_counter()
    for at in range(0, len(prompts), settings.prompts_per_batch):
        ex.explore_batch(engine, prompts[at:at + settings.prompts_per_batch], images, nouns, settings)
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    dataset = oogiri.load(oogiri.SAMPLE_DIR)
    prompts = [p for p in dataset.prompts() if p.answers][:args.prompts]
    nouns = {lang: load_nouns(lang) for lang in Language}
    rows, results = [], {}
    for size in args.sizes.split(","):
        engine = load_engine(size)
        engine.fixed_length = True
        one = ex.ExploreSettings(max_new_tokens=args.new_tokens, prompts_per_batch=1)
        many = ex.ExploreSettings(max_new_tokens=args.new_tokens, prompts_per_batch=args.batch)
        throughput(engine, prompts[:2], dataset.images, nouns, one)  # warm-up
        single = throughput(engine, prompts, dataset.images, nouns, one)
        batched = throughput(engine, prompts, dataset.images, nouns, many)
        results[size] = {"one_at_a_time": single, "batched": batched}
        rows.append([size, len(prompts), args.batch, single, batched, f"{batched / single:.2f}×"])
    print(table(["model", "prompts", "batch", "one-at-a-time prompts/s", "batched prompts/s", "speed-up"], rows))
    last = args.sizes.split(",")[-1]
    print(f"\nHeadline ({last} model): batched exploration explores "
          f"{results[last]['batched'] / results[last]['one_at_a_time']:.2f}× the prompts per second of one at a time.")
    print("saved", save("explore", {"prompts": len(prompts), "batch": args.batch, "new_tokens": args.new_tokens,
                                    "prompts_per_second": results}))


if __name__ == "__main__":
    main()
