"""Importing PEFT adapters made elsewhere: the authors' CLoT-cn adapter and other tools' LoRAs.

`python -m clot.adapters import <hub id or folder> --name <name>` reads an adapter's weights safely
(safetensors, or `adapter_model.bin` with weights-only loading, never plain pickle), renames keys
written for an older layout of the base model, and publishes `adapter_model.safetensors` +
`adapter_config.json` (+ README) + a `clot.json` card with `adapters.publish`, atomically.
Every check runs before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from clot import adapters
from clot.tasks import ClotError, Language

OFFICIAL_ID = "zhongshsh/CLoT-cn"
BIN = "adapter_model.bin"
README = "README.md"
PEFT_PREFIX = "base_model.model."

# transformers 4.52 moved Qwen2-VL and Qwen2.5-VL's language model under model.language_model and the
# vision tower under model.visual; adapters written before (LLaMA-Factory, ms-swift) carry the old names.
_OLD_LAYOUT = [(re.compile(r"^visual\."), "model.visual."),
               (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model.")]
OLD_LAYOUT_FAMILIES = {"qwen2_vl", "qwen2_5_vl"}


def map_old_layout(weights: dict, model_type: str) -> tuple[dict, int]:
    """Rename pre-4.52 Qwen2(.5)-VL keys to the current layout; returns the weights and how many moved."""
    if model_type not in OLD_LAYOUT_FAMILIES:
        return weights, 0
    mapped, moved = {}, 0
    for key, tensor in weights.items():
        inner = key.removeprefix(PEFT_PREFIX)
        for pattern, replacement in _OLD_LAYOUT:
            inner, count = pattern.subn(replacement, inner)
            if count:
                moved += 1
                break
        mapped[PEFT_PREFIX + inner if key.startswith(PEFT_PREFIX) else inner] = tensor
    return mapped, moved


def read_weights(folder: Path) -> dict:
    """The adapter's tensors: safetensors when present, else the .bin through weights-only unpickling."""
    import torch
    from safetensors.torch import load_file

    if (folder / adapters.WEIGHTS).is_file():
        try:
            return load_file(str(folder / adapters.WEIGHTS))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise ClotError(f"{folder / adapters.WEIGHTS} is not a readable safetensors file "
                            f"({type(err).__name__}).") from None
    try:
        weights = torch.load(folder / BIN, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled objects, RuntimeError for a damaged zip
        raise ClotError(f"{folder / BIN} cannot be read safely: it needs full pickle loading "
                        f"({type(err).__name__}), which could run arbitrary code; convert it to safetensors "
                        "where you trust it.") from None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise ClotError(f"{folder / BIN} is not a plain state dict of tensors.")
    return weights


def fetch_source(source: str) -> Path:
    """A local adapter folder as is, else a hub repo's adapter files downloaded into the hub cache."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists() or source.count("/") != 1:
        raise ClotError(f"{source} is neither an adapter folder nor a hub id like owner/name.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=[adapters.CONFIG, adapters.WEIGHTS, BIN, README]))
    except Exception as err:  # offline, unknown repo, no permission
        raise ClotError(f"Could not download the adapter {source} from the hub ({type(err).__name__}); "
                        "check the network, or download it and pass its folder.") from None


def read_base_config(base: str):
    """The base model's config (a local folder's config.json, or the hub's)."""
    from transformers import AutoConfig

    from clot import models  # noqa: F401  (registers our own families: model_type qwen)

    folder = Path(base)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ClotError(f"The base model folder {base} has no config.json.")
    try:
        return AutoConfig.from_pretrained(base)
    except Exception as err:
        if folder.is_dir():
            raise ClotError(f"The base model's config in {base} cannot be read ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160]}).") from None
        raise ClotError(f"The base model {base} cannot be reached on the hub ({type(err).__name__}); "
                        "pass a local folder of the base model with --base-model.") from None


def same_base(declared: str, given: str, given_config) -> bool:
    """Whether `given` (a folder or hub id) is the base the adapter declares.

    Equal names, equal fingerprints when the declared base can be read, or else a folder named after
    the declared hub repo (a download of it, or a hub-cache snapshot)."""
    if declared == given:
        return True
    try:
        return adapters.base_fingerprint(read_base_config(declared)) == adapters.base_fingerprint(given_config)
    except ClotError:
        pass
    repo_name = declared.rstrip("/").split("/")[-1].lower()
    parts = [p.lower() for p in Path(given).resolve().parts]
    return bool(parts) and (parts[-1] == repo_name or f"models--{declared.replace('/', '--').lower()}" in parts)


def _module_names(weights: dict) -> list[str]:
    """The modules the LoRA weights belong to, relative to the base model."""
    names = {re.sub(r"\.lora_(A|B)(\.[^.]+)?\.weight$", "", key.removeprefix(PEFT_PREFIX))
             for key in weights if ".lora_" in key}
    return sorted(names)


def _licence(source: str, base: str, model_type: str) -> str:
    base_licence = "Tongyi Qianwen licence" if model_type == "qwen" else "its own licence"
    return f"Adapter: per its model card ({source}). Base model {base}: {base_licence}."


def import_adapter(source: str, name: str, adapters_dir: str | Path = "adapters", *, base_model: str | None = None,
                   stage: str | None = None, languages: list[str] | None = None, force: bool = False,
                   replace: bool = False) -> Path:
    """Convert the PEFT adapter at `source` (folder or hub id) and publish it as `adapters_dir/name`."""
    from safetensors.torch import save_file

    adapters.check_name(name)
    target = Path(adapters_dir) / name
    if target.exists() and not replace:
        raise ClotError(f"An adapter named {name!r} already exists in {adapters_dir}; pass --replace to overwrite it.")
    stage = stage or ("official" if source == OFFICIAL_ID else "imported")
    if stage not in ("official", "imported"):
        raise ClotError(f"Unknown stage {stage!r}: use official or imported.")
    if languages is None:
        languages = ["zh"] if stage == "official" else []
    if any(code.lower() == "auto" for code in languages):
        raise ClotError("--languages names the languages the adapter was trained on (en, zh, ja), not auto.")
    languages = [Language.parse(code).value for code in languages]

    folder = fetch_source(source)
    if not (folder / adapters.CONFIG).is_file() or not ((folder / adapters.WEIGHTS).is_file() or (folder / BIN).is_file()):
        raise ClotError(f"{source} has no PEFT adapter: it needs {adapters.CONFIG} and {adapters.WEIGHTS} "
                        f"or {BIN}.")
    try:
        peft_config = json.loads((folder / adapters.CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClotError(f"{source} has an unreadable {adapters.CONFIG}: {err}.") from None
    if not isinstance(peft_config, dict) or peft_config.get("peft_type", "LORA") != "LORA":
        raise ClotError(f"{source} is not a LoRA adapter; only LoRA adapters can be imported.")

    declared = peft_config.get("base_model_name_or_path") or ""
    base = base_model or declared
    if not base:
        raise ClotError(f"{source} does not name its base model; pass it with --base-model.")
    base_config = read_base_config(base)
    if base_model and declared and not force and not same_base(declared, base_model, base_config):
        raise ClotError(f"The adapter was made for {declared}, not {base_model}; pass --force if that base "
                        "fits it anyway.")
    model_type = getattr(base_config, "model_type", "?")

    weights = read_weights(folder)
    if not any(".lora_" in key for key in weights):
        raise ClotError(f"{source} holds no LoRA weights.")
    weights, moved = map_old_layout(weights, model_type)
    if moved and isinstance(peft_config.get("target_modules"), str):
        # a regex written for the old module names cannot be trusted on the new ones: name the modules
        peft_config["target_modules"] = _module_names(weights)
    peft_config["base_model_name_or_path"] = base

    card = adapters.make_card(base_model=base, fingerprint=adapters.base_fingerprint(base_config), stage=stage,
                              source=source, declared_base=declared, languages=languages,
                              licence=_licence(source, base, model_type), layout_keys_mapped=moved)
    with tempfile.TemporaryDirectory(prefix="clot-import-") as staging:  # publish copies it in atomically
        staging = Path(staging)
        # own copies: safetensors refuses tensors that share storage, which a .bin may hold
        save_file({key: tensor.contiguous().clone() for key, tensor in weights.items()},
                  str(staging / adapters.WEIGHTS), metadata={"format": "pt"})
        adapters.write_json_atomic(staging / adapters.CONFIG, peft_config)
        if (folder / README).is_file():
            (staging / README).write_bytes((folder / README).read_bytes())
        return adapters.publish(staging, adapters_dir, name, card)


def add_arguments(parser) -> None:
    parser.add_argument("source", help="hub id (e.g. zhongshsh/CLoT-cn) or a folder with a PEFT adapter")
    parser.add_argument("--name", required=True, help="the adapter's name in the adapters folder")
    parser.add_argument("--adapters-dir", default=os.environ.get("CLOT_ADAPTERS_DIR", "adapters"),
                        help="the adapters folder (env CLOT_ADAPTERS_DIR; default %(default)s)")
    parser.add_argument("--base-model", default=None,
                        help="hub id or local folder of the base (default: the adapter's own base_model_name_or_path)")
    parser.add_argument("--stage", choices=["official", "imported"], default=None,
                        help=f"card stage (default: official for {OFFICIAL_ID}, else imported)")
    parser.add_argument("--languages", default=None,
                        help="comma-separated languages it was trained on (default: zh for official)")
    parser.add_argument("--force", action="store_true", help="accept a --base-model other than the declared base")
    parser.add_argument("--replace", action="store_true", help="overwrite an adapter of the same name")


def run(args) -> Path:
    languages = None if args.languages is None else [c.strip() for c in args.languages.split(",") if c.strip()]
    return import_adapter(args.source, args.name, args.adapters_dir, base_model=args.base_model, stage=args.stage,
                          languages=languages, force=args.force, replace=args.replace)
