"""Without the hub: the app ends in its one sentence at once (no minutes of retries), and a model in
the local HF cache still loads by its hub id."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from clot import hub
from clot.adapters import base_fingerprint
from clot.engine import _load_pretrained

ROOT = Path(__file__).resolve().parent.parent
NOTHING_LISTENS = "http://127.0.0.1:9"  # the discard port on loopback: connections are refused at once


@pytest.mark.parametrize("hub_env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": NOTHING_LISTENS}],
                         ids=["HF_HUB_OFFLINE", "unreachable-endpoint"])
def test_app_without_the_hub_ends_in_one_sentence(hub_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(hub_env, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    done = subprocess.run([sys.executable, "app.py", "--base-model", "some-owner/some-model"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    why = "switched off (HF_HUB_OFFLINE)" if "HF_HUB_OFFLINE" in hub_env else "unreachable"
    assert (f"error: Could not load 'some-owner/some-model': the Hugging Face Hub is {why} and the model is not "
            "in the local cache. Download it where the hub is reachable and pass its local folder") in output
    assert "Retry" not in output and "Traceback" not in output, output[-2000:]


def test_a_cached_model_loads_by_hub_id_when_the_hub_is_unreachable(tiny_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "models--clot-test--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (tmp_path / "models--clot-test--tiny" / "refs").mkdir()
    (tmp_path / "models--clot-test--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", NOTHING_LISTENS)
    assert hub.cache_only()
    config = _load_pretrained(AutoConfig, "clot-test/tiny", cache_dir=str(tmp_path))
    assert base_fingerprint(config) == base_fingerprint(AutoConfig.from_pretrained(tiny_dir))


def test_the_probe_tells_a_listening_endpoint_from_a_refusing_one():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    assert not hub.reachable(NOTHING_LISTENS)


def test_the_offline_sentence_comes_before_the_heavy_imports(tmp_path):
    """The sentence in about a second whatever the machine: neither torch, transformers nor gradio is
    imported before it (they are what took 26-59 s on a loaded machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    probe = ("import sys, app\n"
             "try:\n    app.main(['--base-model', 'some-owner/some-model'])\nexcept SystemExit as stop:\n"
             "    print('exit', stop.code, sorted(m for m in ('torch', 'transformers', 'gradio') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "error: Could not load 'some-owner/some-model'" in done.stderr
    assert done.stdout.strip() == "exit 2 []", done.stdout + done.stderr[-2000:]
