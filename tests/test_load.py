"""Load: 32 gradio_client users at once on loopback against `app.py --tiny` (benchmarks/load_test.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import load_test  # noqa: E402


@pytest.mark.slow
def test_32_clients_every_request_answered_or_told_busy(tiny_dir, tmp_path, artifacts):
    """500 requests over the three tabs and both modes, into a queue of 16 (about a minute on 2 cores):
    each is answered or refused with the clear "queue is full" error, none errors or goes missing,
    and the server's memory after the 500th request is within 10% of that after the 50th."""
    server, url = load_test.start_app(tmp_path, queue_size=16, tiny_dir=tiny_dir)
    try:
        report = load_test.drive(url, server.pid, clients=32, requests=500)
        assert server.poll() is None, "the server died under load"
    finally:
        server.terminate()
        server.wait(timeout=30)
    (artifacts / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    assert report["error"] == 0, report["errors_seen"]
    assert report["finished"] == report["answered"] + report["busy"] == 500  # nothing lost silently
    assert report["busy"] > 0 and report["answered"] >= 50  # the bounded queue both served and turned away
    assert all(report["per_endpoint"].values())  # every tab was served
    assert report["rss_mb"]["500"] <= 1.10 * report["rss_mb"]["50"], report["rss_mb"]
