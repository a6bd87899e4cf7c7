"""The adapters folder: discovery, cards (clot.json), validation and atomic publishing.

An adapter is a folder `<adapters>/<name>/` holding peft's `adapter_config.json` and
`adapter_model.safetensors` plus our card `clot.json`; on disk it is a symlink into
`<adapters>/.versions/`, and publishing writes a whole new copy there before re-pointing the
symlink atomically, so a running demo never misses an adapter or sees half of one.
Only safetensors weights are ever loaded: pickle files are refused. Adapters made elsewhere (the
authors' CLoT-cn, other tools' LoRAs) come in through `python -m clot.adapters import`
(clot/adapter_import.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clot.tasks import ClotError

CARD = "clot.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
BASE = "base"  # the name that means "no adapter"
STAGES = (1, 2, 3, "official", "imported")  # trained here (CLoT stage 1 or 2, stage 3 = DPO from votes), or imported (python -m clot.adapters import)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str) -> str:
    """Adapter names are plain folder names: no paths, no traversal, no hidden files."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ClotError(f"Invalid adapter name {str(name)[:60]!r}: use letters, digits, '.', '_' and '-' "
                        "(no slashes, no '..').")
    return name


def base_fingerprint(config: Any) -> str:
    """Identifies a base model by the shapes an adapter depends on, whatever path it was loaded from."""
    text = getattr(config, "text_config", config)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    shape = {"model_type": getattr(config, "model_type", "?")}
    shape.update({k: getattr(text, k, None) for k in keys})
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class AdapterInfo:
    name: str
    path: Path
    card: dict

    @property
    def signature(self) -> str:
        """Changes whenever the folder is re-published, so a cached copy can be refreshed."""
        weights = self.path / WEIGHTS
        stat = weights.stat()
        return f"{stat.st_mtime_ns}-{stat.st_size}-{self.card.get('created', '')}"

    def summary(self) -> str:
        """One readable line: stage, round, base, languages, date and evaluation numbers if any."""
        card = self.card
        parts = [stage_label(card), f"base {card.get('base_model', '?')}"]
        if card.get("languages"):
            parts.append("languages " + ", ".join(card["languages"]))
        if card.get("created"):
            parts.append(str(card["created"])[:16].replace("T", " "))
        metrics = card.get("evaluation") or card.get("metrics") or {}  # evaluation numbers first
        shown = [f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in list(metrics.items())[:4]]
        if shown:
            parts.append(", ".join(shown))
        return " · ".join(parts)


def read_card(path: Path) -> dict:
    card_path = Path(path) / CARD
    if not card_path.is_file():
        raise ClotError(f"Adapter {Path(path).name!r} has no {CARD} card; it was not published by CLoT.")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClotError(f"Adapter {Path(path).name!r} has an unreadable {CARD}: {err}.") from None
    if not isinstance(card, dict):
        raise ClotError(f"Adapter {Path(path).name!r} has a malformed {CARD}.")
    return card


def validate(path: Path, fingerprint: str | None = None) -> dict:
    """Check an adapter folder completely before any weight is loaded; return its card."""
    path = Path(path)
    name = path.name
    if not path.is_dir():
        raise ClotError(f"Adapter {name!r} does not exist.")
    card = read_card(path)
    if not (path / CONFIG).is_file():
        raise ClotError(f"Adapter {name!r} has no {CONFIG}.")
    weights = path / WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise ClotError(f"Adapter {name!r} ships only pickle weights ({', '.join(pickles)}); "
                            "only safetensors are loaded.")
        raise ClotError(f"Adapter {name!r} has no {WEIGHTS}.")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:  # reading every tensor catches a truncated file
                f.get_slice(key)[:]
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ClotError(f"Adapter {name!r} has damaged weights ({type(err).__name__}): publish it again.") from None
    if not keys:
        raise ClotError(f"Adapter {name!r} has empty weights.")
    if fingerprint is not None and card.get("base_fingerprint") != fingerprint:
        raise ClotError(f"Adapter {name!r} was trained for base model {card.get('base_model', '?')!r}, "
                        "which does not match the loaded base model; choose an adapter made for this base.")
    return card


def discover(folder: str | Path) -> list[AdapterInfo]:
    """Every published adapter in the folder (hidden staging folders and broken cards are skipped)."""
    folder = Path(folder)
    found = []
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or not _NAME.match(path.name):
            continue
        copy = path.resolve()  # one published copy, even if the name is re-pointed meanwhile
        if not ((copy / WEIGHTS).is_file() and (copy / CONFIG).is_file()):
            continue
        try:
            found.append(AdapterInfo(path.name, copy, read_card(copy)))
        except ClotError:
            continue
    return found


def make_card(*, base_model: str, fingerprint: str, stage: int | str, round: int = 0, **extra: Any) -> dict:
    """`stage` is 1 or 2 for adapters trained here, "official" or "imported" for adapters made elsewhere."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    card = {"base_model": base_model, "base_fingerprint": fingerprint, "stage": stage, "round": round,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    card.update(extra)
    return card


def stage_label(card: dict) -> str:
    """How a card's stage reads: "stage 1", "stage 2 · round 1", "official" or "imported"."""
    stage = card.get("stage", "?")
    if stage in ("official", "imported"):
        return str(stage)
    return f"stage {stage} · round {card['round']}" if card.get("round") else f"stage {stage}"


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


VERSIONS = ".versions"  # every published copy lives here; `<adapters>/<name>` is a symlink to one of them
RETIRED_GRACE_S = 60  # a replaced copy stays this long for readers that resolved the link just before
_VERSION = re.compile(r"^(\d+)-(\d+)-")  # <time_ns>-<publisher pid>-<random>


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(folder: Path) -> None:
    """Remove the copies nobody can reach any more: a replaced copy once its grace period is over,
    and the half-written copy or link of a publisher that died (live publishers are left alone)."""
    folder = Path(folder)
    versions = folder / VERSIONS
    linked = {entry.resolve().parent for entry in folder.iterdir()
              if entry.is_symlink() and not entry.name.startswith(".")}  # the published names
    for path in folder.glob(".*.link-*"):  # a link made but never renamed into place
        match = _VERSION.match(path.name.rpartition(".link-")[2])
        if match and not _alive(int(match.group(2))):
            path.unlink(missing_ok=True)
    for version in versions.iterdir() if versions.is_dir() else ():
        match = _VERSION.match(version.name)
        if not match or version in linked:
            continue
        complete = any((copy / CARD).is_file() for copy in version.iterdir())
        retired_long_ago = time.time() - version.stat().st_mtime > RETIRED_GRACE_S
        if (complete and retired_long_ago) or (not complete and not _alive(int(match.group(2)))):
            shutil.rmtree(version, ignore_errors=True)


def publish(source: str | Path, folder: str | Path, name: str, card: dict) -> Path:
    """Copy an adapter (peft save_pretrained output) into the adapters folder with its card, and make
    `folder/name` point at it in one atomic step.

    The copy is written completely into `.versions/<stamp>/<name>/`, then a symlink to it replaces
    `folder/name` by rename: a reader sees the old adapter or the new one, never neither, never a
    half. The replaced copy stays for RETIRED_GRACE_S so a reader that resolved the old link can
    finish. (POSIX only: it relies on symlinks and on rename replacing a symlink atomically.)"""
    check_name(name)
    source, folder = Path(source), Path(folder)
    if not (source / WEIGHTS).is_file() or not (source / CONFIG).is_file():
        raise ClotError(f"{source} is not a saved adapter (needs {WEIGHTS} and {CONFIG}).")
    (folder / VERSIONS).mkdir(parents=True, exist_ok=True)
    sweep(folder)
    version = Path(tempfile.mkdtemp(prefix=f"{time.time_ns()}-{os.getpid()}-", dir=folder / VERSIONS))
    copy = version / name
    copy.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.suffix not in (".bin", ".pt", ".pth", ".pkl"):
            shutil.copy2(item, copy / item.name)
    write_json_atomic(copy / CARD, card)
    for item in copy.iterdir():  # make sure the bytes are on disk before the rename publishes them
        with open(item, "rb") as f:
            os.fsync(f.fileno())
    os.utime(version)  # complete now: the grace period of sweep counts from here
    target = folder / name
    if target.is_dir() and not target.is_symlink():  # published before the symlink layout: move it aside once
        legacy = Path(tempfile.mkdtemp(prefix=f"{time.time_ns()}-{os.getpid()}-", dir=folder / VERSIONS))
        os.replace(target, legacy / name)
    link = folder / f".{name}.link-{version.name}"
    os.symlink(os.path.relpath(copy, folder), link)
    previous = target.resolve().parent if target.is_symlink() else None
    os.replace(link, target)
    if previous is not None and previous.is_dir():
        os.utime(previous)  # retired now
    return target


def main(argv: list[str] | None = None) -> int:
    """Manage the adapters folder: python -m clot.adapters import <hub id or folder> --name <name>."""
    import argparse
    import sys

    from clot import adapter_import

    parser = argparse.ArgumentParser(prog="python -m clot.adapters", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    adapter_import.add_arguments(commands.add_parser("import", help="convert and publish a PEFT adapter made elsewhere"))
    args = parser.parse_args(argv)
    try:
        path = adapter_import.run(args)
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"imported {path.name}: {AdapterInfo(path.name, path, read_card(path)).summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
