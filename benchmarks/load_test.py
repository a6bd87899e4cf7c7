"""Load test: many gradio_client users at once against `app.py --tiny` on loopback.

    python benchmarks/load_test.py                        # 32 clients, 500 requests, queue of 16
    python benchmarks/load_test.py --clients 8 --requests 100 --queue-size 4 --queue-deadline 10

Requests mix the three tabs and both modes (tiny max_new_tokens, so the run measures the serving
path rather than the model). Every request ends in one of three outcomes: answered; "busy" (the
bounded queue was full: gradio_client's QueueError, "Queue is full! Please try again."; or the
request could not start within the server's queue deadline: "The server is busy…"); or an error,
which should never happen. Clients wait as long as the server takes (no read timeouts), so the
verdict depends on what the server does, not on how fast the machine is. Prints p50/p95 latency of answered requests, the counts, and the
server's resident memory after the 50th and the last request; writes benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "assets" / "examples" / "cat.jpg"
BUSY = "The server is busy"  # clot.ui.BUSY: a request that could not start within the queue deadline
FAST = [0.9, 0.9, 50, 4, 1.05]  # temperature, top_p, top_k, max_new_tokens, repetition_penalty


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(folder: Path, queue_size: int, tiny_dir: Path | None = None,
              queue_deadline_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`app.py --tiny` in its own process, output to a file (an undrained pipe would block it)."""
    port = free_port()
    # MALLOC_ARENA_MAX: glibc gives each worker thread its own malloc arena, and the requests' large
    # full-vocabulary buffers (151,936 logits a row) fragment them all; two arenas keep RSS flat, as
    # for any threaded Python server (docs/reliability.md, Load).
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLOT_CPU_THREADS="1", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    if tiny_dir is not None:
        env["CLOT_TINY_DIR"] = str(tiny_dir)
    with open(folder / "app.log", "w") as log:
        server = subprocess.Popen([sys.executable, "app.py", "--tiny", "--port", str(port), "--queue-size",
                                   str(queue_size), "--queue-deadline", str(queue_deadline_s),
                                   "--adapters-dir", str(folder / "adapters")],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    from gradio_client import Client

    while True:  # however long a busy machine takes to start it: only the server's exit ends the wait
        try:
            Client(url, verbose=False)
            return server, url
        except Exception:
            if server.poll() is not None:
                raise RuntimeError(f"the app did not start:\n{(folder / 'app.log').read_text()[-3000:]}")
            time.sleep(1)


def request_args(index: int) -> tuple[str, list]:
    """The index-th request of the mix: three tabs × two modes, in turn."""
    from gradio_client import handle_file

    mode = "CLoT" if index % 2 == 0 else "sample"
    common = ["auto", "", 2, mode, "base", *FAST, index]
    tab = index // 2 % 3
    if tab == 0:
        return "/image_to_text", [handle_file(CAT), *common]
    if tab == 1:
        return "/image_text_to_text", [handle_file(CAT), "What is the cat thinking?", *common]
    return "/text_to_text", [f"Why is request {index} late?", *common]


def drive(url: str, server_pid: int, clients: int, requests: int, marks: tuple[int, ...] = (50, 100, 200, 300, 400)) -> dict:
    """`clients` threads, each its own gradio_client, share `requests` requests; every one is accounted for."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    server = psutil.Process(server_pid)
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    outcomes: list[tuple[str, str, float]] = []  # (outcome, endpoint, seconds)
    errors: list[str] = []
    rss: dict[int, float] = {}

    def worker():
        client = Client(url, verbose=False, httpx_kwargs={"timeout": None})  # only the server decides
        while True:
            with lock:
                index = state["next"]
                state["next"] += 1
            if index >= requests:
                return
            endpoint, args = request_args(index)
            start = time.perf_counter()
            try:
                client.predict(*args, api_name=endpoint)
                outcome = "answered"
            except QueueError:
                outcome = "busy"
            except AppError as err:
                outcome = "busy" if str(err).startswith(BUSY) else "error"
                if outcome == "error":
                    errors.append(f"{endpoint}: AppError: {str(err)[:200]}")
            except Exception as err:  # a gr.Error (AppError) or anything else: should never happen here
                outcome = "error"
                errors.append(f"{endpoint}: {type(err).__name__}: {str(err)[:200]}")
            seconds = time.perf_counter() - start
            with lock:
                outcomes.append((outcome, endpoint, seconds))
                state["done"] += 1
                if state["done"] in marks or state["done"] == requests:
                    rss[state["done"]] = server.memory_info().rss / 2**20
            if outcome == "busy":
                time.sleep(1.0)  # what a polite client does before its next try

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    answered = sorted(s for o, _, s in outcomes if o == "answered")
    counts = {kind: sum(o == kind for o, _, _ in outcomes) for kind in ("answered", "busy", "error")}
    return {
        "clients": clients, "sent": requests, "finished": len(outcomes), **counts, "errors_seen": errors[:10],
        "seconds": round(elapsed, 1), "answered_per_s": round(len(answered) / elapsed, 2),
        "p50_s": round(statistics.median(answered), 3) if answered else None,
        "p95_s": round(answered[max(0, int(0.95 * len(answered)) - 1)], 3) if answered else None,
        "rss_mb": {str(k): round(v, 1) for k, v in sorted(rss.items())},
        "per_endpoint": {e: sum(1 for o, ep, _ in outcomes if ep == e and o == "answered")
                         for e in ("/image_to_text", "/image_text_to_text", "/text_to_text")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--queue-deadline", type=float, default=120, help="the server's --queue-deadline (s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_app(Path(tmp), args.queue_size, queue_deadline_s=args.queue_deadline)
        try:
            report = drive(url, server.pid, args.clients, args.requests)
        finally:
            server.terminate()
            server.wait(timeout=30)
    report.update(queue_size=args.queue_size, queue_deadline_s=args.queue_deadline, machine=f"{platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} CPUs", date=dt.date.today().isoformat())
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["error"] == 0 and report["finished"] == report["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
