"""Run configuration: one YAML recipe per run, read into dataclasses, with `--set key=value` overrides.

A recipe has shared top-level keys (base_model, run_dir, seed) and one section per script:

    base_model: tiny
    run_dir: runs/tiny
    instructions: {num_options: 4, ...}
    training: {max_steps: 40, ...}

`--set max_steps=20` (or `--set training.max_steps=20`) overrides one value; values are parsed as YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that `python training/sft.py` finds the clot package
    sys.path.insert(0, str(ROOT))

from clot.tasks import ClotError  # noqa: E402

T = TypeVar("T")
SHARED = ("base_model", "run_dir", "seed")


def recipe_parser(doc: str, section: str) -> argparse.ArgumentParser:
    """The command line of a stage script: a YAML recipe and `--set` overrides of its `section`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML recipe (its `{section}` section and shared keys)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    return parser


def parse_overrides(items: list[str] | None, section: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ClotError(f"Override {item!r} is not key=value.")
        key = key.strip()
        prefix, dot, rest = key.partition(".")
        if dot:
            if prefix != section:
                continue  # meant for the other script
            key = rest
        values[key] = yaml.safe_load(raw)
    return values


def load_config(cls: type[T], path: str | Path | None, section: str, overrides: list[str] | None = None,
                also: str | None = None) -> T:
    """The dataclass `cls` filled from the recipe's shared keys and its `section`, then the overrides.
    `also` names a second section layered on top (stage 2's changes to the training settings)."""
    data: dict[str, Any] = {}
    sections = [section] + ([also] if also else [])
    if path is not None:
        try:
            recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ClotError(f"Could not read the config {path}: {err}") from None
        if not isinstance(recipe, dict):
            raise ClotError(f"The config {path} must be a mapping of settings.")
        data.update({k: v for k, v in recipe.items() if k in SHARED})
        for name in sections:
            data.update(recipe.get(name) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    for name in sections:
        data.update(parse_overrides(overrides, name))
    unknown = sorted(set(data) - known)
    if unknown:
        raise ClotError(f"Unknown setting(s) {', '.join(unknown)} for {section}; known: {', '.join(sorted(known))}.")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    return cls(**{key: _coerce(key, value, types[key]) for key, value in data.items()})


def _coerce(key: str, value: Any, kind: str) -> Any:
    """YAML reads 1e-5 as a string (1.0e-5 is a float): convert numbers to the declared type."""
    try:
        if kind == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ClotError(f"Setting {key} must be a number, got {value!r}.") from None
    return value


def resolve_base_model(name: str) -> str:
    """`tiny` means the offline tiny model of clot/tiny.py and `tiny-qwen-vl` the tiny Qwen-VL-Chat of
    clot/models/qwen_vl/tiny.py (each built once); anything else is a hub id or path."""
    if name == "tiny":
        from clot import tiny

        return str(tiny.build())
    if name == "tiny-qwen-vl":
        from clot.models.qwen_vl import tiny as tiny_qwen_vl

        return str(tiny_qwen_vl.build())
    return name


TINY_OFFICIAL_ADAPTER = "tiny-clot-cn"


def resolve_adapter_source(source: str) -> str:
    """`tiny-clot-cn` means a random LoRA in the official CLoT-cn format for `tiny-qwen-vl`, its offline
    stand-in (written next to the tiny model); anything else is a hub id or folder."""
    if source == TINY_OFFICIAL_ADAPTER:
        from clot.models.qwen_vl import tiny as tiny_qwen_vl

        return str(tiny_qwen_vl.build_official_lora(tiny_qwen_vl.DEFAULT_DIR.with_name(
            f"{tiny_qwen_vl.DEFAULT_DIR.name}-{TINY_OFFICIAL_ADAPTER}")))
    return source


def distributed():
    """(rank, world size, barrier) under torchrun / accelerate launch; (0, 1, no-op) alone.
    Without a GPU, accelerate only sees the processes when told to use the CPU (gloo)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, lambda: None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone


PROMPT_TEXT_TOKENS = 256  # system turn, instruction, question and condition of a generation row: generous


def rows_within_budget(config, dtype_bytes: int, budget_gb: float, positions_per_row: int) -> int:
    """How many generation rows of at most `positions_per_row` positions one generate call may run so
    that their KV cache stays within `budget_gb` (at least one). `config` is the model's config."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads  # Qwen-VL: no GQA
    per_position = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes  # keys + values
    return max(1, int(budget_gb * 2**30 // (per_position * positions_per_row)))
