"""Launching the demo in-process for the app and browser tests."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


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
