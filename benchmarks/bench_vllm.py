"""Stage-2 exploration throughput: the vLLM backend against the in-process transformers engine.

Both explore the same training prompts of the bundled sample with the same settings (5 conditions,
rank, select) on the same random-weight model folder, generating exactly --new-tokens per row: the
engine one prompt at a time and batched, and a local vLLM server (prefix caching, float32 on a CPU
so both do the same arithmetic) with the same batches. The four strategies run interleaved with
repeats (benchmarks/common.compare; the idle server takes about 5% of a core meanwhile), each from
empty prefix caches. Needs scripts/setup_vllm.sh.

    python benchmarks/bench_vllm.py                                   # small model, CPU
    python benchmarks/bench_vllm.py --size 3b --device cuda --dtype bfloat16 --prompts 256 --batch 64   # GPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import urllib.request
from pathlib import Path

from common import compare, ratio, save, spread, table

from clot import data as oogiri
from clot import tiny
from clot.engine import Engine
from clot.nouns import load_nouns
from clot.tasks import Language
from clot.vllm_backend import VllmBackend, serve
from training import explore as ex


def run(backend, prompts, images, nouns, settings) -> None:
    for at in range(0, len(prompts), settings.prompts_per_batch):
        ex.explore_batch(backend, prompts[at:at + settings.prompts_per_batch], images, nouns, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(tiny.SIZES))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="prompts per call (the engine also runs 1)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds kept, after one warm-up round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the server's dtype (float32 matches the CPU engine)")
    parser.add_argument("--memory-fraction", type=float, default=0.25, help="RAM (CPU) or GPU memory for vLLM")
    args = parser.parse_args()
    folder = tiny.build(Path(tempfile.gettempdir()) / f"clot-bench-{args.size}", size=args.size)
    dataset = oogiri.load(oogiri.SAMPLE_DIR)
    prompts = [p for p in dataset.prompts() if p.answers][:args.prompts]
    nouns = {lang: load_nouns(lang) for lang in Language}
    settings = {b: ex.ExploreSettings(max_new_tokens=args.new_tokens, prompts_per_batch=b) for b in (1, args.batch)}
    rows_generated = len(prompts) * settings[1].num_conditions * args.new_tokens
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache: every run starts from an empty cache

    with serve(str(folder), log_path=Path(tempfile.gettempdir()) / "bench-vllm-server.log", dtype=args.dtype,
               memory_fraction=args.memory_fraction) as url:
        backend = VllmBackend(url, str(folder))
        engine = Engine.load(str(folder), device=args.device)
        for model in (engine, backend):
            model.fixed_length = True

        def on_engine(b):
            engine.prefixes.clear()
            run(engine, prompts, dataset.images, nouns, settings[b])

        def on_vllm(b):
            urllib.request.urlopen(urllib.request.Request(url + "/reset_prefix_cache", method="POST")).close()
            run(backend, prompts, dataset.images, nouns, settings[b])

        runs = compare({"transformers, 1 per call": lambda: on_engine(1),
                        f"transformers, {args.batch} per call": lambda: on_engine(args.batch),
                        "vLLM, 1 per call": lambda: on_vllm(1),
                        f"vLLM, {args.batch} per call": lambda: on_vllm(args.batch)}, args.repeats)

    one = runs["transformers, 1 per call"]
    rows = [[name, spread(r, scale=1 / len(prompts)) + " s", f"{len(prompts) / r.median():.3f}",
             f"{rows_generated / r.median():.1f}", ratio(one, r)] for name, r in runs.items()]
    print(table(["backend", "seconds per prompt: median (min)", "prompts/s (median)", "generated tokens/s (median)",
                 "speed-up over transformers one at a time: median (min)"], rows))
    print("saved", save(f"vllm-{args.size}-{args.device}", {
        "size": args.size, "prompts": len(prompts), "new_tokens": args.new_tokens, "batch": args.batch,
        "dtype": args.dtype, "repeats": args.repeats,
        "reserved_cpus": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0 (clot's default)"),
        "runs": {name: r.summary() for name, r in runs.items()}}))


if __name__ == "__main__":
    main()
