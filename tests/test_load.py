"""Load: 32 gradio_client users at once on loopback against `app.py --tiny` (benchmarks/load_test.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import load_test  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from ui_helpers import running_demo, tab_inputs  # noqa: E402


def test_a_request_that_cannot_start_within_the_queue_deadline_is_turned_away_as_busy(tiny_dir, tmp_path):
    """With a deadline of 0 s every request has waited too long by the time it starts: each gets the
    busy sentence, which the load test counts as busy."""
    with running_demo(tiny_dir, tmp_path / "adapters", queue_deadline_s=0.0) as (engine, url):
        client = Client(url, verbose=False)
        for _ in range(2):
            with pytest.raises(AppError) as refused:
                client.predict(*tab_inputs("Why?", n=1, max_new_tokens=2), api_name="/text_to_text")
            assert str(refused.value).startswith(load_test.BUSY + "; please try again in a minute (this request "
                                                 "waited "), str(refused.value)


@pytest.mark.slow
def test_32_clients_every_request_answered_or_told_busy(tiny_dir, tmp_path, artifacts):
    """500 requests over the three tabs and both modes, into a queue of 16 (about a minute on 2 idle
    cores): each is answered or refused with a clear busy error (queue full, or not started within
    the 30 s queue deadline), none errors or goes missing, and the server's memory after the 500th
    request is within 10% of that after the 200th (by then the worker threads, their allocator
    arenas and the engine's caches have warmed up; a leak still shows over the 300 requests after). Clients never time out, so a slow machine changes
    the counts, not the verdict."""
    server, url = load_test.start_app(tmp_path, queue_size=16, tiny_dir=tiny_dir, queue_deadline_s=30)
    try:
        report = load_test.drive(url, server.pid, clients=32, requests=500)
        assert server.poll() is None, "the server died under load"
    finally:
        server.terminate()
        server.wait(timeout=30)
    (artifacts / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    assert report["error"] == 0, report["errors_seen"]
    assert report["finished"] == report["answered"] + report["busy"] == 500  # nothing lost silently
    assert report["busy"] > 0 and report["answered"] > 0  # served and turned away (the first always starts)
    assert all(report["per_endpoint"].values())  # every tab was served
    assert report["rss_mb"]["500"] <= 1.10 * report["rss_mb"]["200"], report["rss_mb"]
