"""CLoT humor studio: the Gradio demo (and the Hugging Face Space's app_file).

    python app.py --tiny                                   # offline smoke run on a tiny random model
    python app.py --base-model Qwen/Qwen2.5-VL-3B-Instruct --adapters-dir adapters
    python app.py --backend vllm --vllm-url http://gpu-box:8000            # the model runs in a vLLM server
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"  # kept equal to clot.engine's (tested); --help stays instant


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CLoT humor studio: play Oogiri with a vision-language model in the browser or over HTTP. "
                    "Every flag falls back on the environment variable named in its help.")
    parser.add_argument("--base-model", default=env("CLOT_BASE_MODEL", DEFAULT_BASE_MODEL),
                        help="base model: a Hugging Face hub id or a local folder (env CLOT_BASE_MODEL; "
                             "default %(default)s)")
    parser.add_argument("--adapters-dir", default=env("CLOT_ADAPTERS_DIR", "adapters"),
                        help="folder of published LoRA adapters, re-read by the Refresh button "
                             "(env CLOT_ADAPTERS_DIR; default %(default)s)")
    parser.add_argument("--adapter", default=env("CLOT_ADAPTER"),
                        help="adapter selected at start; default: the bare base model (env CLOT_ADAPTER)")
    parser.add_argument("--device", default=env("CLOT_DEVICE", "auto"),
                        help="auto, cpu, cuda, cuda:N or mps; without a GPU it runs on the CPU, slowly "
                             "(env CLOT_DEVICE; default %(default)s)")
    parser.add_argument("--nouns", default=env("CLOT_NOUNS"),
                        help="noun-set JSON from training for the Draw words button and CLoT mode; default: the bundled "
                             "lists in assets/nouns (env CLOT_NOUNS)")
    parser.add_argument("--host", default=env("CLOT_HOST", env("GRADIO_SERVER_NAME", "127.0.0.1")),
                        help="address to listen on; 0.0.0.0 for every interface "
                             "(env CLOT_HOST or GRADIO_SERVER_NAME; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(env("CLOT_PORT", env("GRADIO_SERVER_PORT", "7860"))),
                        help="port (env CLOT_PORT or GRADIO_SERVER_PORT; default %(default)s)")
    parser.add_argument("--share", action="store_true", default=env("CLOT_SHARE", "") in ("1", "true", "yes"),
                        help="also open a temporary public gradio.live link (env CLOT_SHARE=1)")
    parser.add_argument("--queue-size", type=int, default=int(env("CLOT_QUEUE_SIZE", "32")),
                        help="requests allowed to wait in the queue before new ones are turned away "
                             "(env CLOT_QUEUE_SIZE; default %(default)s)")
    parser.add_argument("--queue-deadline", type=float, default=float(env("CLOT_QUEUE_DEADLINE", "120")),
                        help="seconds a generation may wait in the queue; one that cannot start by then is turned "
                             "away with a busy message, not left to time out (env CLOT_QUEUE_DEADLINE; default "
                             "%(default)s)")
    parser.add_argument("--compile", action="store_true", default=env("CLOT_COMPILE", "") in ("1", "true", "yes"),
                        help="decode with a static KV cache and torch.compile: faster steps on a GPU after a "
                             "compilation per new batch shape (tens of seconds); off where unsupported, ZeroGPU "
                             "included (env CLOT_COMPILE=1)")
    parser.add_argument("--backend", choices=("engine", "vllm"), default=env("CLOT_BACKEND", "engine"),
                        help="engine: the model runs in this process; vllm: a vLLM server runs it (--vllm-url, or "
                             "a local one started from scripts/setup_vllm.sh's environment and stopped on exit) "
                             "(env CLOT_BACKEND; default %(default)s)")
    parser.add_argument("--vllm-url", default=env("CLOT_VLLM_URL", ""),
                        help="a running vLLM server serving --base-model, e.g. http://gpu-box:8000 (env CLOT_VLLM_URL)")
    parser.add_argument("--vllm-model", default=env("CLOT_VLLM_MODEL", ""),
                        help="the server's name for the base model, if not --base-model itself (env CLOT_VLLM_MODEL)")
    parser.add_argument("--tiny", action="store_true", default=env("CLOT_TINY", "") in ("1", "true", "yes"),
                        help="ignore --base-model and use a tiny random-weight model built offline in seconds: "
                             "a smoke test of the whole app, its answers are gibberish (env CLOT_TINY=1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from clot.hub import unloadable_now  # stdlib only: the offline sentence comes before seconds of imports

    if not args.tiny and (why := unloadable_now(args.base_model)):
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
    # Heavy imports after parsing; clot.ui imports `spaces` (when installed) before the engine touches CUDA.
    import gradio as gr

    from clot.ui import CSS, MAX_FILE_SIZE, build_demo
    from clot.tasks import ClotError
    from clot.vllm_backend import open_backend

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base_model = args.base_model
    if args.tiny:
        from clot import tiny

        base_model = str(tiny.build())
    with contextlib.ExitStack() as stack:
        try:
            engine = stack.enter_context(open_backend(
                args.backend, base_model, adapters_dir=args.adapters_dir, vllm_url=args.vllm_url,
                vllm_model=args.vllm_model, adapter=args.adapter, device=args.device, compile=args.compile))
        except ClotError as err:  # a wrong id, no hub access, a bad adapter, no vLLM server: one sentence
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        demo = build_demo(engine, nouns_path=args.nouns, queue_deadline_s=args.queue_deadline)
        demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=gr.themes.Soft(),
                    css=CSS, max_file_size=MAX_FILE_SIZE)  # blocks until stopped; a managed vLLM server stops after


if __name__ == "__main__":
    main()
