"""The vLLM client against a small fake OpenAI-compatible server (standard library): what it sends,
how it reads answers, and its errors. The real server's tests are in tests/test_vllm.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from clot.engine import Choice, Turn
from clot.tasks import ClotError, Language, Request, Sampling, Task
from clot.vllm_backend import VllmBackend, open_backend
from tests.conftest import make_adapter
from tests.ui_helpers import ROOT, app_process, tab_inputs


class FakeVllm:
    """Answers like vLLM's OpenAI-compatible server; remembers every request body."""

    def __init__(self, model: str):
        self.model = model
        self.adapters: set[str] = set()
        self.requests: list[tuple[str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    models = [{"id": fake.model, "root": fake.model}]
                    models += [{"id": name, "root": "/x", "parent": fake.model} for name in sorted(fake.adapters)]
                    self._send(200, {"data": models})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                status, answer = fake.answer(self.path, body)
                if status != 200 or not body.get("stream"):
                    return self._send(status, answer)
                self.send_response(200)  # server-sent events, a word at a time, the choices interleaved
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chat = self.path == "/v1/chat/completions"
                texts = [c["message"]["content"] if chat else c["text"] for c in answer["choices"]]
                pieces = [text.split(" ") for text in texts]
                for step in range(max(len(words) for words in pieces)):
                    for index, words in enumerate(pieces):
                        if step < len(words):
                            piece = words[step] + (" " if step < len(words) - 1 else "")
                            choice = {"index": index, **({"delta": {"content": piece}} if chat else {"text": piece})}
                            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/v1/load_lora_adapter":
            self.adapters.add(body["lora_name"])
            return 200, {}
        if path == "/v1/unload_lora_adapter":
            self.adapters.discard(body["lora_name"])
            return 200, {}
        if body["model"] not in {self.model, *self.adapters}:
            return 404, {"error": {"message": f"The model `{body['model']}` does not exist."}}
        chat = path == "/v1/chat/completions"
        choices = []
        for index in range(body.get("n", 1)):
            text = f"{body['model']} seed={body.get('seed')} #{index} <|im_end|>\x07"
            choice = {"index": index, **({"message": {"content": text}} if chat else {"text": text})}
            if body["max_tokens"] == 1:  # letter scoring: log-probabilities 0, -1, -2, … over the allowed ids
                logprobs = {f"token_id:{t}": -float(rank) for rank, t in enumerate(body["allowed_token_ids"])}
                choice["logprobs"] = ({"content": [{"top_logprobs": [{"token": k, "logprob": v}
                                                                     for k, v in logprobs.items()]}]}
                                      if chat else {"top_logprobs": [logprobs]})
            choices.append(choice)
        return 200, {"choices": choices}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(tiny_dir):
    server = FakeVllm(str(tiny_dir))
    yield server
    server.close()


@pytest.fixture
def client(fake, tiny_dir, tmp_path):
    return VllmBackend(fake.url, str(tiny_dir), adapters_dir=tmp_path / "adapters")


def test_text_rows_are_sent_as_the_engines_token_ids_and_identical_rows_share_n(client, fake):
    turns = [Turn("a question", Language.EN), Turn("a question", Language.EN), Turn("another", Language.EN)]
    texts = client.sample(turns, Sampling(seed=7, temperature=0.7, top_p=0.8, top_k=0, repetition_penalty=1.1))
    assert len(fake.requests) == 2
    (path, first), (_, second) = sorted(fake.requests, key=lambda r: -r[1]["n"])
    expected = client.family.encode(client.processor, [turns[0].conversation()], False)["input_ids"][0].tolist()
    assert path == "/v1/completions" and first["prompt"] == expected and first["n"] == 2 and second["n"] == 1
    assert {first["seed"], second["seed"]} == {7, 8}  # each request its own seed, reproducibly
    assert first["temperature"] == 0.7 and first["top_p"] == 0.8 and first["top_k"] == -1
    assert first["repetition_penalty"] == 1.1 and first["stop_token_ids"] == client._stop_ids()
    # the two identical rows get the request's two samples; control characters are cleaned away
    assert sorted(texts[:2]) == [f"{client.served_model} seed={first['seed']} #{i} <|im_end|>" for i in (0, 1)]


def test_a_streamer_sees_every_rows_text_grow_and_the_answers_stay_the_same(client, fake):
    from clot.engine import RowStreamer

    image = Image.new("RGB", (40, 30), "red")
    turns = [Turn("a question", Language.EN), Turn("a question", Language.EN), Turn("caption", Language.EN, image)]
    plain = client.sample(turns, Sampling(seed=3))
    streamer = RowStreamer(client.tokenizer)
    streamed = client.sample(turns, Sampling(seed=3), streamer=streamer)
    assert streamed == plain
    assert all(body.get("stream") for _, body in fake.requests[-2:])
    snapshots = []
    while not streamer.updates.empty():
        snapshots.append(streamer.updates.get())
    assert len(snapshots) >= 6 and snapshots[-1] == streamed  # a piece at a time, ending in the answers
    for row in range(3):  # each row's text only grows
        texts = [snapshot[row] for snapshot in snapshots]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
        assert texts[0] != texts[-1]


def test_image_rows_go_to_chat_with_a_data_url_and_greedy_has_no_seed(client, fake):
    image = Image.new("RGB", (40, 30), "red")
    client.sample([Turn("caption this", Language.EN, image)], Sampling(max_new_tokens=5), greedy=True)
    path, body = fake.requests[0]
    assert path == "/v1/chat/completions" and body["temperature"] == 0.0 and "seed" not in body
    assert body["max_tokens"] == 5 and body["add_generation_prompt"] and not body["continue_final_message"]
    user = body["messages"][1]["content"]
    assert user[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user[1] == {"type": "text", "text": "caption this"}


def test_letter_scores_are_the_softmax_of_the_letter_logprobs(client, fake):
    image = Image.new("RGB", (40, 30), "blue")
    questions = [Choice("select", Task.T2T, Language.EN, ["x", "y", "z"]),
                 Choice("rank", Task.I2T, Language.EN, ["x", "y"], image)]
    scores = client.score(questions)
    weights = [math.exp(-r) for r in range(3)]
    assert scores[0] == pytest.approx([w / sum(weights) for w in weights])
    assert scores[1] == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])
    bodies = dict(fake.requests)  # the two questions are sent at once: in either order
    text_body, chat_body = bodies["/v1/completions"], bodies["/v1/chat/completions"]
    assert text_body["allowed_token_ids"] == client._letters("", 3)[1] and text_body["logprobs"] == 3
    assert chat_body["continue_final_message"]
    assert chat_body["messages"][-1]["role"] == "assistant" and chat_body["top_logprobs"] == 2


def test_adapters_are_loaded_by_name_and_reloaded_when_republished(client, fake, engine, tmp_path):
    engine.adapters_dir = client.adapters_dir
    make_adapter(engine, "funny", seed=1)
    request = Request(task="T2T", text="Why?", num_candidates=2, sampling=Sampling(seed=1))
    client.generate_many([request], adapter="funny")
    loads = [b for p, b in fake.requests if p == "/v1/load_lora_adapter"]
    assert loads == [{"lora_name": "funny", "lora_path": str((client.adapters_dir / "funny").resolve())}]
    assert all(b["model"] == "funny" for p, b in fake.requests if p == "/v1/completions")
    client.sample([Turn("q", Language.EN)], Sampling(), adapter="base")
    assert fake.requests[-1][1]["model"] == client.served_model
    client.use_adapter("funny")  # unchanged: not loaded again
    make_adapter(engine, "funny", seed=2)  # re-published
    client.use_adapter("funny")
    assert [p for p, _ in fake.requests if "lora" in p] == ["/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                                                           "/v1/load_lora_adapter"]
    with pytest.raises(ClotError, match="Unknown adapter 'nobody'. Published adapters: funny."):
        client.use_adapter("nobody")


def test_model_mismatch_unreachable_server_and_a_refused_request_are_one_sentence(fake, tiny_dir, client):
    with pytest.raises(ClotError, match=r"serves .*, not other-model: start it with that model or set vllm_model"):
        VllmBackend(fake.url, str(tiny_dir), served_model="other-model")
    fake.close()
    with pytest.raises(ClotError, match=r"cannot be reached .*a rerun resumes from the last record"):
        client.sample([Turn("q", Language.EN)], Sampling())
    with pytest.raises(ClotError, match="backend must be one of engine, vllm"):
        with open_backend("tgi", str(tiny_dir), adapters_dir="adapters"):
            pass


def test_a_refused_request_names_the_server_and_its_reason(client, fake):
    client.active_adapter = "vanished"  # the server no longer knows it
    with pytest.raises(ClotError, match="refused /v1/completions: The model `vanished` does not exist."):
        client.sample([Turn("q", Language.EN)], Sampling())


def test_the_demo_serves_through_a_vllm_server(fake, tiny_dir, tmp_path):
    """`python app.py --backend vllm --vllm-url URL`: the candidates, ranking and selection are the server's."""
    args = ["--base-model", str(tiny_dir), "--backend", "vllm", "--vllm-url", fake.url,
            "--adapters-dir", str(tmp_path / "adapters")]
    with app_process(args, tmp_path / "app.log") as client:
        result = client.predict(*tab_inputs("Why?", n=2), api_name="/text_to_text")
    assert result["mode"] == "CLoT" and len(result["candidates"]) == 2
    assert all(f"{tiny_dir} seed=" in row["text"] for row in result["candidates"])  # written by the fake server
    assert result["answer"] in [row["text"] for row in result["candidates"]]
    paths = [path for path, _ in fake.requests]
    assert "/v1/completions" in paths
    assert any(body.get("max_tokens") == 1 for _, body in fake.requests)  # ranking and selection scored there


def test_the_demo_without_its_vllm_server_ends_in_one_sentence(tiny_dir):
    done = subprocess.run([sys.executable, "app.py", "--base-model", str(tiny_dir), "--backend", "vllm",
                           "--vllm-url", "http://127.0.0.1:9"], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: The vLLM server at http://127.0.0.1:9 cannot be reached" in done.stderr
