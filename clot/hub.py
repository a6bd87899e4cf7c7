"""Whether the Hugging Face Hub can be used right now, decided in seconds.

Left to itself, huggingface_hub retries every file of a model five times with backoff when the hub
cannot be reached: minutes of warnings before any error. So before loading by hub id we honour
`HF_HUB_OFFLINE` and probe the endpoint with a short TCP connect; when the hub is off or unreachable,
models load from the local HF cache only, and a model that is not there fails at once.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def offline_by_choice() -> bool:
    """HF_HUB_OFFLINE (or its old name TRANSFORMERS_OFFLINE) is set."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@lru_cache(maxsize=8)
def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout` seconds (name lookup included,
    which socket timeouts do not cover, hence the thread). Remembered for the process: a model is
    loaded at start, and an answer that flipped between its files would mix cache and hub."""
    parts = urlsplit(url)
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    opened = threading.Event()

    def connect():
        try:
            with socket.create_connection(address, timeout=timeout):
                opened.set()
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)  # a lookup that hangs is left behind
    probe.start()
    probe.join(timeout)
    return opened.is_set()


def cache_only() -> bool:
    """Whether loads by hub id must use the local cache only: the hub is switched off or unreachable."""
    return offline_by_choice() or not reachable(endpoint())


def not_cached_message(name: str) -> str:
    """The sentence for a hub id that cannot load: the hub is off or unreachable and it is not cached."""
    why = "switched off (HF_HUB_OFFLINE)" if offline_by_choice() else "unreachable"
    return (f"Could not load {name!r}: the Hugging Face Hub is {why} and the model is not in the local cache. "
            "Download it where the hub is reachable and pass its local folder (--base-model /path/to/model), "
            "or run with --tiny for an offline smoke test.")


def unloadable_now(name: str) -> str | None:
    """Before any heavy import: why the model `name` cannot load now, or None when it may.

    A local folder, a hub reachable and switched on, or a hub id whose config is in the local cache may
    load (the loader has the final word); otherwise the answer is the one sentence, in about a second."""
    if os.path.exists(name) or not cache_only():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return None if isinstance(cached, str) else not_cached_message(name)
