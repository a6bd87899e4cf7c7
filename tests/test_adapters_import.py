"""python -m clot.adapters import: safe reading, layouts, cards, and adapters whose keys don't land."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clot import adapters
from clot.adapter_import import OFFICIAL_ID, import_adapter
from clot.tasks import ClotError

from conftest import make_adapter

ROOT = Path(__file__).resolve().parent.parent
TOKENS = torch.tensor([[5, 17, 301, 42, 999, 7, 256, 1024]])  # plain text ids: the LoRA is in the language model


def _old_layout(key: str) -> str:
    """The names LLaMA-Factory and ms-swift wrote under transformers < 4.52."""
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.") \
              .replace("base_model.model.model.visual.", "base_model.model.visual.")


def _peft_source(engine, tmp_path, seed: int = 11) -> Path:
    """A LoRA saved by peft for the tiny base (as another tool would hand it over, card aside)."""
    published = make_adapter(engine, "source", seed=seed, folder=tmp_path / "made")
    source = tmp_path / f"source-{seed}"
    shutil.copytree(published, source)
    (source / adapters.CARD).unlink()
    return source


def _as_bin(source: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(source / adapters.CONFIG, folder / adapters.CONFIG)
    torch.save(load_file(str(source / adapters.WEIGHTS)), folder / "adapter_model.bin")
    return folder


def _engine_logits(engine, adapter: str) -> torch.Tensor:
    with engine.using(adapter):
        return engine.model(input_ids=TOKENS).logits


def _peft_logits(base_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.inference_mode():
        return model(input_ids=TOKENS).logits


def test_bin_and_safetensors_import_identically_with_a_card(engine, tmp_path):
    source = _peft_source(engine, tmp_path)
    from_bin = import_adapter(str(_as_bin(source, tmp_path / "bin")), "from-bin", tmp_path / "out")
    from_safetensors = import_adapter(str(source), "from-st", tmp_path / "out")
    assert (from_bin / adapters.WEIGHTS).read_bytes() == (from_safetensors / adapters.WEIGHTS).read_bytes()
    assert sorted(p.name for p in from_bin.iterdir()) == [adapters.CONFIG, adapters.WEIGHTS, adapters.CARD]
    assert sorted(p.name for p in from_safetensors.iterdir()) == ["README.md", adapters.CONFIG, adapters.WEIGHTS,
                                                                  adapters.CARD]
    card = adapters.validate(from_bin, engine.fingerprint)
    assert card["stage"] == "imported" and card["round"] == 0 and card["languages"] == []
    assert card["source"] == str(tmp_path / "bin") and card["base_model"] == engine.base_model
    assert card["declared_base"] == engine.base_model and card["layout_keys_mapped"] == 0
    assert card["licence"] == f"Adapter: per its model card ({tmp_path / 'bin'}). Base model {engine.base_model}: " \
                              "its own licence."
    assert adapters.AdapterInfo("from-bin", from_bin, card).summary().startswith("imported · base ")


def test_imported_adapter_changes_logits_exactly_as_peft_on_the_original(engine, tiny_dir, tmp_path):
    source = _peft_source(engine, tmp_path, seed=12)
    original = _as_bin(source, tmp_path / "bin")
    import_adapter(str(original), "imported-12", engine.adapters_dir)
    served = _engine_logits(engine, "imported-12")
    assert torch.equal(served, _peft_logits(tiny_dir, original))
    assert not torch.allclose(served, _engine_logits(engine, "base"), atol=1e-3)


def test_old_layout_adapter_is_mapped_and_matches_the_new_layout(engine, tiny_dir, tmp_path):
    source = _peft_source(engine, tmp_path, seed=13)
    old = tmp_path / "old-layout"
    old.mkdir()
    weights = load_file(str(source / adapters.WEIGHTS))
    save_file({_old_layout(k): v for k, v in weights.items()}, str(old / adapters.WEIGHTS))
    config = json.loads((source / adapters.CONFIG).read_text())
    config["target_modules"] = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"  # old names only
    (old / adapters.CONFIG).write_text(json.dumps(config))
    assert all(".language_model." not in k for k in load_file(str(old / adapters.WEIGHTS)))

    path = import_adapter(str(old), "mapped-13", engine.adapters_dir)
    card = adapters.read_card(path)
    assert card["layout_keys_mapped"] == len(weights) == 16
    assert set(load_file(str(path / adapters.WEIGHTS))) == set(weights)
    saved = json.loads((path / adapters.CONFIG).read_text())["target_modules"]
    assert saved == sorted(f"model.language_model.layers.{i}.self_attn.{p}"
                           for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert torch.equal(_engine_logits(engine, "mapped-13"), _peft_logits(tiny_dir, source))


def test_plain_target_names_select_only_the_language_models_attention(engine):
    import peft

    model = engine.model.get_base_model() if isinstance(engine.model, peft.PeftModel) else engine.model
    config = peft.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    chosen = [name for name, _ in model.named_modules() if peft.tuners.tuners_utils.check_target_module_exists(
        config, name)]
    layers = model.config.text_config.num_hidden_layers
    assert len(chosen) == 4 * layers and all(".language_model.layers." in n and ".self_attn." in n for n in chosen)
    assert any(".visual." in name for name, _ in model.named_modules())


def test_adapter_whose_keys_do_not_land_is_refused_and_the_previous_one_stays(engine, tiny_dir, tmp_path):
    from clot.engine import Engine

    fresh = Engine.load(str(tiny_dir), adapters_dir=tmp_path / "adapters", device="cpu")
    base_logits = _engine_logits(fresh, "base")
    stale = make_adapter(fresh, "stale", seed=14)
    weights = load_file(str(stale / adapters.WEIGHTS))
    save_file({_old_layout(k): v for k, v in weights.items()}, str(stale / adapters.WEIGHTS),
              metadata={"format": "pt"})
    message = ("Adapter 'stale' does not fit this base model: 16 of its 16 weights match no module and 16 LoRA "
               "weights are missing (e.g. base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight)")
    with pytest.raises(ClotError, match=re.escape(message)):
        fresh.use_adapter("stale")  # the first adapter: the bare base model comes back
    assert fresh.active_adapter == adapters.BASE and torch.equal(_engine_logits(fresh, "base"), base_logits)

    make_adapter(fresh, "good", seed=15)
    good_logits = _engine_logits(fresh, "good")
    fresh.use_adapter("good")
    with pytest.raises(ClotError, match="'stale' does not fit this base model: 16 of its 16"):
        fresh.use_adapter("stale")
    assert fresh.active_adapter == "good" and "stale" not in fresh.model.peft_config
    assert torch.equal(_engine_logits(fresh, None), good_logits)


class _Opaque:
    """Any object that only full pickle loading could rebuild."""


def test_checkpoint_that_needs_pickle_is_refused_and_nothing_is_written(engine, tmp_path):
    source = tmp_path / "pickled"
    source.mkdir()
    shutil.copy(_peft_source(engine, tmp_path) / adapters.CONFIG, source / adapters.CONFIG)
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "extra": _Opaque()},
               source / "adapter_model.bin")
    with pytest.raises(ClotError, match="cannot be read safely: it needs full pickle loading"):
        import_adapter(str(source), "pickled", tmp_path / "out")
    assert not (tmp_path / "out" / "pickled").exists()


def _qwen_vl_base(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "qwen", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 151936, "visual": {"layers": 1, "width": 32, "heads": 2},
              "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"}}  # as on the hub; ours is used
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_official_qwen_vl_adapter_imports_with_its_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "CLoT-cn"
    source.mkdir()
    peft_config = {"peft_type": "LORA", "base_model_name_or_path": "Qwen/Qwen-VL-Chat", "r": 64, "lora_alpha": 16,
                   "lora_dropout": 0.05, "target_modules": ["c_attn", "attn.c_proj"], "bias": "none",
                   "task_type": "CAUSAL_LM"}
    (source / adapters.CONFIG).write_text(json.dumps(peft_config))
    generator = torch.Generator().manual_seed(0)
    weights = {f"base_model.model.transformer.h.{i}.attn.{m}.lora_{ab}.weight": torch.randn(4, 4, generator=generator)
               for i in range(2) for m in ("c_attn", "c_proj") for ab in "AB"}
    torch.save(weights, source / "adapter_model.bin")
    (source / "README.md").write_text("# CLoT-cn\n")
    base = _qwen_vl_base(tmp_path / "models" / "Qwen-VL-Chat")
    downloads = []
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda repo_id, allow_patterns: downloads.append(repo_id) or str(source))

    with pytest.raises(ClotError, match="cannot be reached on the hub.*pass a local folder of the base model with "
                                        "--base-model"):
        import_adapter(OFFICIAL_ID, "clot-cn", tmp_path / "out")
    path = import_adapter(OFFICIAL_ID, "clot-cn", tmp_path / "out", base_model=str(base))
    assert downloads == [OFFICIAL_ID, OFFICIAL_ID]
    assert (path / "README.md").read_text() == "# CLoT-cn\n"
    card = adapters.validate(path)
    assert card["stage"] == "official" and card["languages"] == ["zh"] and card["source"] == OFFICIAL_ID
    assert card["base_model"] == str(base) and card["declared_base"] == "Qwen/Qwen-VL-Chat"
    assert "Tongyi Qianwen licence" in card["licence"] and card["layout_keys_mapped"] == 0
    from transformers import AutoConfig

    assert card["base_fingerprint"] == adapters.base_fingerprint(AutoConfig.from_pretrained(str(base)))
    saved = load_file(str(path / adapters.WEIGHTS))
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in weights)
    assert json.loads((path / adapters.CONFIG).read_text())["target_modules"] == ["c_attn", "attn.c_proj"]
    assert adapters.AdapterInfo("clot-cn", path, card).summary().startswith("official · base ")
    from training import run_clot

    assert f"CVPR 2024): official, imported from {OFFICIAL_ID}, for" in " ".join(run_clot.model_card("clot-cn", card).split())

    # a base folder that is not the declared one is refused unless forced
    other = _qwen_vl_base(tmp_path / "models" / "some-other-model")
    with pytest.raises(ClotError, match="made for Qwen/Qwen-VL-Chat, not .*some-other-model; pass --force"):
        import_adapter(str(source), "clot-cn-2", tmp_path / "out", base_model=str(other))
    assert not (tmp_path / "out" / "clot-cn-2").exists()
    forced = import_adapter(str(source), "clot-cn-2", tmp_path / "out", base_model=str(other), force=True)
    assert adapters.read_card(forced)["stage"] == "imported"


def test_cli_publishes_and_refuses_in_one_sentence(engine, tmp_path, capsys):
    source = _peft_source(engine, tmp_path, seed=16)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "clot.adapters", "import", str(source), "--name", "cli",
                             "--adapters-dir", str(out), "--languages", "en, ja"],
                            capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported cli: imported · base ") and "languages en, ja" in result.stdout
    assert adapters.read_card(out / "cli")["languages"] == ["en", "ja"]

    from clot.adapters import main

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()  # drop the progress bars of making the source
    cases = [
        ([str(source), "--name", "cli"], f"error: An adapter named 'cli' already exists in {out}; pass --replace "
                                          "to overwrite it."),
        ([str(empty), "--name", "x"], f"error: {empty} has no PEFT adapter: it needs adapter_config.json and "
                                      "adapter_model.safetensors or adapter_model.bin."),
        ([str(tmp_path / "nowhere" / "x"), "--name", "x"], f"error: {tmp_path / 'nowhere' / 'x'} is neither an "
                                                           "adapter folder nor a hub id like owner/name."),
        ([str(source), "--name", "../x"], "error: Invalid adapter name '../x'"),
        ([str(source), "--name", "x", "--languages", "fr"], "error: Unknown language 'fr'"),
        ([str(source), "--name", "x", "--languages", "auto"], "error: --languages names the languages"),
        (["nobody/no-such-adapter", "--name", "x"], "error: Could not download the adapter nobody/no-such-adapter "
                                                     "from the hub"),
    ]
    for argv, expected in cases:
        assert main(["import", *argv, "--adapters-dir", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["cli"]
    assert len(list((out / adapters.VERSIONS).iterdir())) == 1  # the refusals wrote no copy
    assert main(["import", str(source), "--name", "cli", "--adapters-dir", str(out), "--replace"]) == 0
    with pytest.raises(SystemExit) as usage:
        main(["import", str(source)])  # --name is required
    assert usage.value.code == 2
