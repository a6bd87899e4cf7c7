"""Stage-2 exploration throughput: the vLLM backend against the in-process transformers engine.

Both explore the same training prompts of the bundled sample with the same settings (5 conditions,
rank, select) on the same random-weight model folder, generating exactly --new-tokens per row:
the engine one prompt at a time and batched, then a local vLLM server (prefix caching, float32 on a
CPU so both do the same arithmetic) with the same batches. Needs scripts/setup_vllm.sh.

    python benchmarks/bench_vllm.py                                   # small model, CPU
    python benchmarks/bench_vllm.py --size 3b --device cuda --dtype bfloat16 --prompts 256 --batch 64   # GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import save, table

from clot import data as oogiri
from clot import tiny
from clot.engine import Engine
from clot.nouns import load_nouns
from clot.tasks import Language
from clot.vllm_backend import VllmBackend, serve
from training import explore as ex


def run(backend, prompts, images, nouns, settings) -> float:
    start = time.perf_counter()
    for at in range(0, len(prompts), settings.prompts_per_batch):
        ex.explore_batch(backend, prompts[at:at + settings.prompts_per_batch], images, nouns, settings)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(tiny.SIZES))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="prompts per call (the engine also runs 1)")
    parser.add_argument("--new-tokens", type=int, default=64)
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
    seconds = {}

    engine = Engine.load(str(folder), device=args.device)
    engine.fixed_length = True
    run(engine, prompts[:1], dataset.images, nouns, settings[1])  # warm-up
    for b in (1, args.batch):
        engine.prefixes.clear()
        seconds[f"transformers, {b} per call"] = run(engine, prompts, dataset.images, nouns, settings[b])
    del engine

    with serve(str(folder), log_path=Path(tempfile.gettempdir()) / "bench-vllm-server.log", dtype=args.dtype,
               memory_fraction=args.memory_fraction) as url:
        backend = VllmBackend(url, str(folder))
        backend.fixed_length = True
        run(backend, prompts[:1], dataset.images, nouns, settings[1])  # warm-up
        for b in (1, args.batch):
            seconds[f"vLLM, {b} per call"] = run(backend, prompts, dataset.images, nouns, settings[b])

    one = seconds["transformers, 1 per call"]
    rows = [[name, len(prompts) / s, rows_generated / s, f"{one / s:.2f}×"] for name, s in seconds.items()]
    print(table(["backend", "prompts/s", "generated tokens/s", "speed-up over transformers one at a time"], rows))
    print("saved", save(f"vllm-{args.size}-{args.device}", {
        "size": args.size, "prompts": len(prompts), "new_tokens": args.new_tokens, "batch": args.batch,
        "dtype": args.dtype, "seconds": seconds,
        "generated_tokens_per_second": {k: rows_generated / s for k, s in seconds.items()}}))


if __name__ == "__main__":
    main()
