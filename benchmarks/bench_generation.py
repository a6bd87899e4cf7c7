"""Generation speed for one request: the original demo's strategy against ours, side by side.

Strategies, on the same model and image, with a fixed number of new tokens per candidate:
  sequential  the original demo: one generate call per candidate (3 wordings × samples), each
              re-reading the image;
  batched     all k candidates as rows of one generate call;
  shared      one generate call whose rows share one prefill of the common prompt (the default).
Also CLoT mode (5 conditioned candidates + rank + select) against plain sampling of 5.

    python benchmarks/bench_generation.py                 # tiny and small models, k = 1, 5, 9
    python benchmarks/bench_generation.py --sizes small --new-tokens 16
    python benchmarks/bench_generation.py --sizes 3b --device cuda   # full size, bf16, random weights
"""

from __future__ import annotations

import argparse
import random

from common import Runs, compare, load_engine, photo, ratio, save, spread, table

from clot import prompts
from clot.engine import Turn
from clot.tasks import Language, Request, Sampling, Task


def strategies(engine, image, k: int, new_tokens: int, repeats: int) -> dict[str, Runs]:
    settings = Sampling(seed=0, max_new_tokens=new_tokens)
    turns = [Turn(prompts.generation_prompt(Task.I2T, Language.EN, wording=i % 3), Language.EN, image)
             for i in range(k)]
    same_prompt = [turns[0]] * k  # one wording, k samples: what our demo asks for

    def sequential():  # as the original demo: every call encodes its whole prompt, image included
        engine.shared_prefill = False
        for turn in turns:
            engine.sample([turn], settings)
        engine.shared_prefill = True

    def batched(shared: bool):
        engine.shared_prefill = shared
        engine.sample(same_prompt, settings)
        engine.shared_prefill = True

    def shared():
        engine.prefixes.clear()  # each request is new: nothing cached from the last one
        batched(True)

    return compare({"sequential": sequential, "batched": lambda: batched(False), "shared": shared}, repeats)


def clot_vs_sampling(engine, image, new_tokens: int, repeats: int) -> dict[str, Runs]:
    settings = Sampling(seed=0, max_new_tokens=new_tokens)

    def plain():
        engine.prefixes.clear()
        turns = engine.turns_for(Request(task="I2T", image=image, num_candidates=5, sampling=settings).validate())
        engine.sample(turns, settings)

    def clot():
        engine.prefixes.clear()
        engine.clot(Request(task="I2T", image=image, num_candidates=5, sampling=settings), rng=random.Random(0))

    return compare({"sample5": plain, "clot5": clot}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--ks", default="1,5,9")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU figures (with --sizes 3b)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds after the warm-up one")
    args = parser.parse_args()
    image = photo()
    rows, results = [], {}
    for size in args.sizes.split(","):
        engine = load_engine(size, args.device)
        engine.fixed_length = True  # random weights stop anywhere: time a fixed number of new tokens
        for k in [int(k) for k in args.ks.split(",")]:
            t = strategies(engine, image, k, args.new_tokens, args.repeats)
            results[f"{size}/k={k}"] = t
            rows.append([size, k, spread(t["sequential"]), spread(t["batched"]), spread(t["shared"]),
                         ratio(t["sequential"], t["shared"]), ratio(t["batched"], t["shared"])])
        c = clot_vs_sampling(engine, image, args.new_tokens, args.repeats)
        results[f"{size}/clot"] = c
        rows.append([size, "CLoT 5 vs sample 5", spread(c["sample5"]), "", spread(c["clot5"]), "",
                     ratio(c["clot5"], c["sample5"]) + " latency"])
    print(f"Median (and minimum) of {args.repeats} interleaved rounds.")
    print(table(["model", "k", "sequential s", "batched s", "shared s", "sequential/shared", "batched/shared"], rows))
    size, k = args.sizes.split(",")[-1], max(int(k) for k in args.ks.split(","))
    headline = results[f"{size}/k={k}"]
    print(f"\nHeadline ({size} model, k={k}, medians): shared prefill is "
          f"{headline['sequential'].median() / headline['shared'].median():.2f}× faster than the original demo's "
          f"sequential calls and {headline['batched'].median() / headline['shared'].median():.2f}× faster than plain "
          "batching.")
    seconds = {key: {name: runs.summary()["seconds"] for name, runs in t.items()} for key, t in results.items()}
    print("saved", save("generation" if args.device == "cpu" else f"generation-{args.device}",
                        {"new_tokens": args.new_tokens, "repeats": args.repeats, "seconds": seconds}))


if __name__ == "__main__":
    main()
