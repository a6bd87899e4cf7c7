"""Shared pieces of the benchmarks: models, a test image, timing, and the results table."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load_engine(size: str, device: str = "cpu"):
    """An engine on a random-weight model of the default architecture: "tiny" or "small" (built
    once into the temp folder), or the full-size "3b", made directly on the device in its dtype."""
    from clot import tiny
    from clot.engine import Engine, pick_device, pick_dtype

    adapters = Path(tempfile.gettempdir()) / "clot-bench-adapters"
    if size == "3b":
        torch_device = pick_device(device)
        model, processor = tiny.random_model(size, torch_device, pick_dtype(torch_device))
        return Engine(model, processor, base_model="random-3b", adapters_dir=adapters, device=torch_device)
    folder = tiny.build(Path(tempfile.gettempdir()) / f"clot-bench-{size}", size=size)
    return Engine.load(str(folder), adapters_dir=adapters, device=device)


def photo(width: int = 448, height: int = 448, seed: int = 0) -> Image.Image:
    """A deterministic, photo-sized RGB image (content does not matter for speed)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def compare(strategies: dict, repeats: int = 3) -> dict[str, float]:
    """Median wall time (s) of each strategy. They run in turn within every round, after one
    warm-up round, so that a busy machine slows them all alike and their ratios stay fair."""
    times: dict[str, list[float]] = {name: [] for name in strategies}
    for round_ in range(repeats + 1):
        for name, fn in strategies.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> str:
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({threads} torch threads), {gpu}"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    """Write the results JSON (with machine, date and command) next to the benchmarks."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name] + sys.argv), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    return path
