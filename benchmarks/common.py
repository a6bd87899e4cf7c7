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
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class Runs:
    """One strategy's measurements over the rounds: its wall time ("seconds") and whatever numbers
    it returned itself, each round a dict."""

    rounds: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str = "seconds") -> float:
        return statistics.median(r[key] for r in self.rounds)

    def min(self, key: str = "seconds") -> float:
        return min(r[key] for r in self.rounds)

    def summary(self) -> dict[str, dict]:
        """For the results JSON: per number, its median, minimum and every round's value."""
        return {key: {"median": self.median(key), "min": self.min(key), "rounds": [r[key] for r in self.rounds]}
                for key in self.rounds[0]}


def compare(strategies: dict[str, Callable[[], dict | None]], repeats: int = 3,
            warm_up: bool = True) -> dict[str, Runs]:
    """Time the strategies interleaved (A B C, A B C, …) for `repeats` rounds, after one warm-up
    round that is not kept: a busy moment then slows one round of every strategy rather than all
    rounds of one. Read each strategy's median for the typical time and its minimum for the time
    least disturbed by other work; ratios of either can be trusted on a shared machine."""
    runs = {name: Runs() for name in strategies}
    for round_ in range(repeats + warm_up):
        for name, fn in strategies.items():
            start = time.perf_counter()
            extra = fn() or {}
            if round_ >= warm_up:
                runs[name].rounds.append({"seconds": time.perf_counter() - start, **extra})
    return runs


def spread(runs: Runs, key: str = "seconds", scale: float = 1.0) -> str:
    """A table cell: "median (min …)"."""
    return f"{runs.median(key) * scale:.3f} (min {runs.min(key) * scale:.3f})"


def ratio(a: Runs, b: Runs, key: str = "seconds") -> str:
    """a / b of the medians, and of the minima."""
    return f"{a.median(key) / b.median(key):.2f}× (min {a.min(key) / b.min(key):.2f}×)"


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
