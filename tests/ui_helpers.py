"""Launching the demo, in-process or as `python app.py`, for the app and browser tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"


def tab_inputs(*head, language="auto", conditions="", n=3, mode="CLoT", adapter="base", seed=7,
               temperature=0.9, top_p=0.9, top_k=50, max_new_tokens=12, repetition_penalty=1.05) -> list:
    """Positional inputs of a tab endpoint: its own inputs, then the shared ones in order."""
    return [*head, language, conditions, n, mode, adapter, temperature, top_p, top_k, max_new_tokens,
            repetition_penalty, seed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_demo(tiny_dir: Path, adapters_dir: Path, **demo_options):
    """The app on the tiny model, its own engine and adapters folder, served on a free local port
    (`demo_options` go to build_demo)."""
    from clot.engine import Engine
    from clot.ui import CSS, MAX_FILE_SIZE, build_demo

    engine = Engine.load(str(tiny_dir), adapters_dir=adapters_dir, device="cpu")
    demo = build_demo(engine, **demo_options)
    demo.queue(default_concurrency_limit=1, max_size=16)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                            quiet=True, max_file_size=MAX_FILE_SIZE, css=CSS)
    try:
        yield engine, url
    finally:
        demo.close()


@contextlib.contextmanager
def app_process(args: list[str], log_path: Path, **env):
    """`python app.py ARGS --port P` in its own process (hub off, `env` added), yielding a gradio Client
    once it serves. No deadline of its own: however long a busy machine takes, only the app's exit ends
    the wait (the test's timeout bounds a start that never comes). Output goes to `log_path`: an
    undrained pipe would block the app."""
    from gradio_client import Client

    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "app.py", *args, "--port", str(port)], cwd=ROOT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert server.poll() is None, Path(log_path).read_text()[-3000:]
                time.sleep(1)
        yield client
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
