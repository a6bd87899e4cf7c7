"""The vLLM backend against a real vLLM server on the tiny-vllm model, side by side with the in-process
engine. Run with `pytest -m vllm` after scripts/setup_vllm.sh; skipped when the vLLM environment is absent."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from PIL import Image

from clot.engine import Choice, Engine, Turn
from clot.tasks import ClotError, Language, Sampling, Task
from clot.vllm_backend import VllmBackend, serve, vllm_python
from tests.conftest import make_adapter

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not vllm_python().exists(), reason="no vLLM environment: scripts/setup_vllm.sh")]

GREEDY = Sampling(max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from clot import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny-vllm") / "model", size="tiny-vllm")


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-adapters")


@pytest.fixture(scope="module")
def local(model_dir, adapters_dir):
    return Engine.load(str(model_dir), adapters_dir=adapters_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with serve(str(model_dir), log_path=tmp_path_factory.mktemp("vllm-log") / "server.log", memory_fraction=0.1,
               dtype="float32") as url:
        yield url


@pytest.fixture(scope="module")
def remote(server, model_dir, adapters_dir):
    return VllmBackend(server, str(model_dir), adapters_dir=adapters_dir)


def picture(seed: int) -> Image.Image:
    """The same noise picture for the same seed (PIL's effect_noise draws from an unseeded generator)."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, size=(84, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def turns() -> list[Turn]:
    return [Turn("Why was the cat late?", Language.EN), Turn("猫はなぜ遅れた？", Language.JA),
            Turn("Caption this picture.", Language.EN, picture(1))]


def test_greedy_answers_equal_the_engines_for_text_image_and_an_adapter_published_during_the_run(
        local, remote, adapters_dir):
    from clot.engine import RowStreamer

    answers = remote.sample(turns(), GREEDY, greedy=True)
    assert answers == local.sample(turns(), GREEDY, greedy=True)
    streamer = RowStreamer(remote.tokenizer)  # the demo's live view: streamed, the same answers
    assert remote.sample(turns(), GREEDY, greedy=True, streamer=streamer) == answers
    assert not streamer.updates.empty()
    make_adapter(local, "late-comer", seed=3, folder=adapters_dir)  # published after the server started
    with_adapter = remote.sample(turns(), GREEDY, adapter="late-comer", greedy=True)
    assert with_adapter == local.sample(turns(), GREEDY, adapter="late-comer", greedy=True)
    assert with_adapter != remote.sample(turns(), GREEDY, adapter="base", greedy=True)


def test_nine_samples_are_distinct_and_a_seed_repeats_them(remote):
    rows = [Turn("Why was the cat late?", Language.EN)] * 9
    first = remote.sample(rows, Sampling(seed=11, max_new_tokens=16))
    assert len(set(first)) == 9
    assert remote.sample(rows, Sampling(seed=11, max_new_tokens=16)) == first
    assert remote.sample(rows, Sampling(seed=12, max_new_tokens=16)) != first


def test_letter_scores_equal_the_engines(local, remote):
    questions = [Choice("select", Task.T2T, Language.EN, ["a cat", "a dog", "a very late train"]),
                 Choice("rank", Task.I2T, Language.EN, ["one", "two", "three", "four"], picture(2)),
                 Choice("select", Task.T2T, Language.ZH, ["一", "二"])]
    for mine, theirs in zip(local.score(questions, adapter="base"), remote.score(questions, adapter="base")):
        assert theirs == pytest.approx(mine, abs=1e-3)


def prefix_cache_hits(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def test_a_repeated_image_prompt_hits_the_prefix_cache(remote, server):
    # long enough to fill whole cache blocks, the unit vLLM caches
    turn = Turn("Describe this picture of a cat who is late for the train. " * 30, Language.EN, picture(3))
    remote.sample([turn], GREEDY, greedy=True)
    before = prefix_cache_hits(server)
    remote.sample([turn], GREEDY, greedy=True)
    assert prefix_cache_hits(server) - before >= 256


def test_unknown_adapter_and_model_mismatch_are_one_sentence(remote, server):
    with pytest.raises(ClotError, match="Unknown adapter 'missing'"):
        remote.sample(turns()[:1], GREEDY, adapter="missing")
    with pytest.raises(ClotError, match="not someone/else"):
        VllmBackend(server, remote.base_model, served_model="someone/else")


def test_exploration_on_vllm_writes_the_engines_record_schema(model_dir, local, remote, adapters_dir, tmp_path):
    from training import explore as ex
    from training import instructions as ins

    ins.build(ins.InstructionSettings(base_model=str(model_dir), run_dir=str(tmp_path), test_ratio=0.2,
                                      literal_model="none"))
    make_adapter(local, "explorer", seed=5, folder=adapters_dir)
    common = dict(base_model=str(model_dir), run_dir=str(tmp_path), adapter="explorer", adapters_dir=str(adapters_dir),
                  max_new_tokens=12, prompts_per_batch=4, max_prompts=4, device="cpu")
    ex.explore(ex.ExploreSettings(**common, out=str(tmp_path / "engine")), engine=local)
    summary = ex.explore(ex.ExploreSettings(**common, out=str(tmp_path / "vllm"), backend="vllm",
                                            vllm_url=remote.url))
    assert summary["prompts"] == 4 and summary["settings"]["backend"] == "vllm"

    def read(name):
        return [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value[:1]]
        return type(value).__name__ if value is not None else None

    on_engine, on_vllm = read("engine"), read("vllm")
    assert [s["prompt_id"] for s in on_vllm] == [s["prompt_id"] for s in on_engine]
    for mine, theirs in zip(on_engine, on_vllm):
        assert set(theirs) == set(mine) and theirs["adapter"] == "explorer" and theirs["adapter_created"]
        assert shape(theirs["candidates"]) == shape(mine["candidates"])
        assert [c["condition"] for c in theirs["candidates"]] == [c["condition"] for c in mine["candidates"]]
