"""App cold start: from process start to the first answer over HTTP, and the server's peak memory.

The sizes start in turn (tiny, small, tiny, small, …) after a warm-up round; each figure is the
median and the minimum of the rounds.

Starts `python app.py` on a random-weight model (the tiny model, and the ~100M "small" one as a
local folder) on loopback, asks one Text → Text question with gradio_client, and samples the
server's resident memory (RSS) all along.

    python benchmarks/bench_app.py
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import ROOT, compare, save, spread, table

from clot import tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start(model_args: list[str]) -> dict:
    from gradio_client import Client

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    start = time.perf_counter()
    with open(Path(tempfile.gettempdir()) / "clot-bench-app.log", "w") as log:
        server = subprocess.Popen([sys.executable, "app.py", *model_args, "--port", str(port), "--device", "cpu"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = [0]
    done = threading.Event()

    def watch():
        process = psutil.Process(server.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the app exited with {server.returncode}")
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                time.sleep(0.2)
        ready = time.perf_counter() - start
        client.predict("Why do cats sit on keyboards?", "en", "", 3, "CLoT", "base", 0.9, 0.9, 50, 16, 1.05, 0,
                       api_name="/text_to_text")
        answered = time.perf_counter() - start
    finally:
        done.set()
        server.terminate()
        server.wait(timeout=30)
    return {"ready_s": ready, "first_answer_s": answered, "peak_rss_mb": peak[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds after the warm-up one")
    args = parser.parse_args()
    folders = {size: tiny.build(Path(tempfile.gettempdir()) / f"clot-bench-{size}", size=size)
               for size in args.sizes.split(",")}
    runs = compare({size: lambda folder=folder: cold_start(["--base-model", str(folder)])
                    for size, folder in folders.items()}, args.repeats)
    rows = [[size, spread(r, "ready_s"), spread(r, "first_answer_s"), f"{r.median('peak_rss_mb'):.0f}"]
            for size, r in runs.items()]
    print(f"Median (and minimum) of {args.repeats} interleaved cold starts.")
    print(table(["model", "server ready s", "first answer s", "peak RSS MB (median)"], rows))
    print("saved", save("app", {"repeats": args.repeats, "results": {size: r.summary() for size, r in runs.items()}}))


if __name__ == "__main__":
    main()
