"""The demo over HTTP: every endpoint driven with gradio_client against the app on the tiny model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import make_adapter
from ui_helpers import EXAMPLES, app_process, running_demo, tab_inputs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # app.py lives at the top, outside the package
CAT = EXAMPLES / "cat.jpg"
call = tab_inputs


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
    with running_demo(tiny_dir, tmp_path_factory.mktemp("app-adapters")) as (engine, url):
        yield engine, Client(url, verbose=False)


@pytest.fixture(scope="module")
def client(app):
    return app[1]


def check_result(result: dict, n: int, mode: str) -> None:
    rows = result["candidates"]
    assert len(rows) == n
    assert [r["rank"] for r in rows] == list(range(1, n + 1))
    scores = [r["rank_score"] for r in rows]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert math.isclose(sum(scores), 1.0, rel_tol=1e-4)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1
    assert result["answer"] == chosen[0]["text"]
    assert result["mode"] == mode
    if mode == "sample" or n == 1:  # sample mode: the model's top-ranked answer is the pick
        assert rows[0]["chosen"] and all(r["select_score"] is None for r in rows)
    else:  # CLoT: the pick is one of the two best-ranked, chosen by the selection question
        finalists = [r for r in rows if r["select_score"] is not None]
        assert [r["rank"] for r in finalists] == [1, 2]
        assert math.isclose(sum(r["select_score"] for r in finalists), 1.0, rel_tol=1e-4)
        assert chosen[0]["select_score"] == max(r["select_score"] for r in finalists)


def check_meme(path: str, size: tuple[int, int]) -> None:
    with Image.open(path) as meme:
        assert meme.format == "PNG"
        assert meme.size == size
        assert meme.mode == "RGB"


def test_endpoints_have_stable_names_and_inputs(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    shared = ["language", "conditions", "num_candidates", "mode", "adapter", "temperature", "top_p", "top_k",
              "max_new_tokens", "repetition_penalty", "seed"]
    params = {name: [p["parameter_name"] for p in spec["parameters"]] for name, spec in api.items()}
    assert params["/image_to_text"] == ["image"] + shared
    assert params["/image_text_to_text"] == ["image", "text"] + shared
    assert params["/text_to_text"] == ["text"] + shared
    assert params["/draw_conditions"] == ["language", "num_candidates", "text"]
    assert params["/refresh_adapters"] == ["current"]
    assert params["/switch_adapter"] == ["adapter"]
    assert len(api["/image_to_text"]["returns"]) == 3 and len(api["/text_to_text"]["returns"]) == 1
    assert not (ROOT / "clot" / "ui.pyi").exists()  # no gradio stub written into the source tree


def test_image_to_text_clot_mode(client):
    result, meme, download = client.predict(*call(handle_file(CAT), conditions="cat, umbrella", n=3, seed=11),
                                            api_name="/image_to_text")
    check_result(result, 3, "CLoT")
    assert result["task"] == "I2T" and result["language"] == "en" and result["seed"] == 11
    assert sorted(r["condition"] for r in result["candidates"]) == ["", "cat", "umbrella"]
    with Image.open(CAT) as cat:
        check_meme(meme, cat.size)
        check_meme(download, cat.size)


def test_image_text_to_text_sample_mode_detects_chinese(client):
    image = EXAMPLES / "blank_zh.jpg"
    result, meme, _ = client.predict(*call(handle_file(image), "这只猫为什么一脸严肃？", n=2, mode="sample"),
                                     api_name="/image_text_to_text")
    check_result(result, 2, "sample")
    assert result["task"] == "IT2T" and result["language"] == "zh"
    assert result["question"] == "这只猫为什么一脸严肃？"
    check_meme(meme, Image.open(image).size)


def test_text_to_text_is_reproducible_with_a_seed(client):
    args = call("こんな美容院は嫌だ。どんな美容院？", n=4, seed=123)
    first = client.predict(*args, api_name="/text_to_text")
    check_result(first, 4, "CLoT")
    assert first["language"] == "ja" and first["task"] == "T2T"
    # CLoT mode with no words draws weak conditions itself (about half of them empty, seeded)
    assert first == client.predict(*args, api_name="/text_to_text")
    single = client.predict(*call("Why is the sky blue?", n=1, mode="sample", seed=None), api_name="/text_to_text")
    check_result(single, 1, "sample")
    assert isinstance(single["seed"], int)  # a random seed is still reported, so it can be replayed


def test_draw_conditions_gives_one_noun_per_candidate(client):
    from clot.nouns import load_nouns

    words = client.predict("auto", 5, "宇宙人が地球に来て最初にがっかりしたことは？", api_name="/draw_conditions")
    words = words.split(", ")
    assert len(words) == 5 and set(words) <= set(load_nouns("ja"))
    assert set(client.predict("en", 2, "", api_name="/draw_conditions").split(", ")) <= set(load_nouns("en"))


@pytest.mark.parametrize("endpoint, args, message", [
    ("/image_to_text", call(None), "This tab needs an image: please upload one."),
    ("/image_to_text", call(handle_file(ROOT / "pyproject.toml")), "The file is not an image that can be read"),
    ("/text_to_text", call("   "), "Task T2T needs a question: please type one."),
    ("/text_to_text", call("x" * 2001), "The text is 2001 characters long; the limit is 2000."),
    ("/text_to_text", call("Why?", conditions="a, b, c", n=2), "3 condition words for 2 candidates"),
    ("/text_to_text", call("Why?", n=9), "Candidates: Value 9 is greater than maximum value 8."),
    ("/text_to_text", call("Why?", n=2.5), "num_candidates must be a whole number, got 2.5."),
    ("/text_to_text", call("Why?", temperature=3.0), "Temperature: Value 3.0 is greater than maximum value 2.0."),
    ("/text_to_text", call("Why?", temperature="hot"), "Temperature: must be a number."),
    ("/text_to_text", call("Why?", top_k=2.5), "top_k must be a whole number, got 2.5."),
    ("/text_to_text", call("Why?", seed=-1), "Seed: -1 is out of range; use a whole number from 0 to 4294967295"),
    ("/text_to_text", call("Why?", seed=1.5), "Seed: '1.5' is not a whole number; leave it empty for a random seed."),
    ("/text_to_text", call("Why?", language="fr"), "Language: Value: 'fr'"),
    ("/text_to_text", call("Why?", mode="best"), "Mode: Value: 'best'"),
    ("/text_to_text", call("Why?", adapter="../etc"), "Invalid adapter name '../etc'"),
    ("/text_to_text", call("Why?", adapter="missing"), "Unknown adapter 'missing'."),
    ("/draw_conditions", ["xx", 2, ""], "Language: Value: 'xx'"),
    ("/switch_adapter", ["missing"], "Unknown adapter 'missing'."),
])
def test_bad_input_gets_a_clear_error(client, endpoint, args, message):
    with pytest.raises(AppError) as err:
        client.predict(*args, api_name=endpoint)
    assert message in str(err.value)


def test_values_json_cannot_carry_are_checked_too(app):
    """NaN and infinity cannot travel in JSON, but Python callers of the handlers can pass them."""
    from clot.ui import Studio

    studio = Studio(app[0])
    for name, value in [("temperature", float("nan")), ("seed", float("inf"))]:
        args = call("Why?", **{name: value}) if name != "seed" else call("Why?", seed=value)
        with pytest.raises(gr.Error, match=f"{name} must be a finite number"):
            studio.text_to_text(*args)


def test_one_users_error_does_not_break_anothers_request(client):
    bad = client.submit(*call(None), api_name="/image_to_text")
    good = client.submit(*call("Why?", n=2, seed=5), api_name="/text_to_text")
    with pytest.raises(AppError):
        bad.result(timeout=60)
    check_result(good.result(timeout=60), 2, "CLoT")


def test_adapter_published_while_running_appears_and_changes_output(app):
    engine, client = app
    _, table = client.predict("base", api_name="/refresh_adapters")
    assert [row[0] for row in table["data"]] == ["base"]

    make_adapter(engine, "punchline", seed=3, stage=2, round=1)
    picker, table = client.predict("base", api_name="/refresh_adapters")
    assert picker["value"] == "base"  # the picker keeps the current choice and lists the new adapter
    assert [value for _, value in picker["choices"]] == ["base", "punchline"]
    rows = {row[0]: row for row in table["data"]}
    assert set(rows) == {"base", "punchline"}
    assert rows["punchline"][1:3] == ["2", "1"]  # stage, round from the card

    card = client.predict("punchline", api_name="/switch_adapter")
    assert card.startswith("**punchline**: stage 2 · round 1")

    args = dict(n=3, mode="sample", seed=99)
    base = client.predict(*call("Why did the chicken cross the road?", **args), api_name="/text_to_text")
    tuned = client.predict(*call("Why did the chicken cross the road?", adapter="punchline", **args),
                           api_name="/text_to_text")
    again = client.predict(*call("Why did the chicken cross the road?", **args), api_name="/text_to_text")
    texts = lambda r: [c["text"] for c in r["candidates"]]  # noqa: E731
    assert tuned["adapter"] == "punchline" and base["adapter"] == "base"
    assert texts(tuned) != texts(base)
    assert texts(again) == texts(base)  # each request names its adapter: switching back is exact


def test_app_help_documents_every_setting():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    for flag in ("--base-model", "CLOT_BASE_MODEL", "--adapters-dir", "CLOT_ADAPTERS_DIR", "--device",
                 "CLOT_DEVICE", "--host", "--port", "--share", "--tiny", "--compile", "CLOT_COMPILE"):
        assert flag in out


def test_app_settings_fall_back_on_environment_variables(monkeypatch):
    import app
    from clot.engine import DEFAULT_BASE_MODEL

    assert app.parse_args([]).base_model == DEFAULT_BASE_MODEL
    monkeypatch.setenv("CLOT_BASE_MODEL", "/models/vlm")
    monkeypatch.setenv("CLOT_ADAPTERS_DIR", "/data/adapters")
    monkeypatch.setenv("CLOT_DEVICE", "cpu")
    monkeypatch.setenv("CLOT_PORT", "9000")
    args = app.parse_args([])
    assert (args.base_model, args.adapters_dir, args.device, args.port) == ("/models/vlm", "/data/adapters", "cpu", 9000)
    assert app.parse_args(["--device", "cuda:1"]).device == "cuda:1"  # a flag beats its variable
    assert app.parse_args([]).compile is False
    monkeypatch.setenv("CLOT_COMPILE", "1")
    assert app.parse_args([]).compile is True


def test_unreachable_base_model_ends_in_one_sentence(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "app.py", "--base-model", "no-such-org/no-such-model",
                           "--adapters-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=180)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "error: Could not load 'no-such-org/no-such-model'" in done.stderr
    assert "--tiny" in done.stderr


def test_readme_demo_command_serves_offline(tmp_path):
    """`python app.py --tiny` as README shows it: builds the tiny model, serves, answers over HTTP."""
    with app_process(["--tiny", "--adapters-dir", str(tmp_path / "adapters")], tmp_path / "app.log",
                     CLOT_TINY_DIR=str(tmp_path / "tiny")) as client:
        result = client.predict(*call("Why?", n=2), api_name="/text_to_text")
    check_result(result, 2, "CLoT")


def test_degenerate_images_are_refused_clearly(client, tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (600, 4), "white").save(strip)
    with pytest.raises(AppError, match="The image is 600×4 pixels: use one at least 8 pixels on each side"):
        client.predict(*call(handle_file(strip)), api_name="/image_to_text")


def test_api_page_examples_work_as_copied(app):
    """The values the API page's snippet shows are sent as they stand: a local image file, no fixed seed."""
    engine, client = app
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/image_to_text", "/image_text_to_text", "/text_to_text"):
        params = {p["parameter_name"]: p for p in api[name]["parameters"]}
        assert params["seed"]["example_input"] == "" and params["conditions"]["example_input"] == ""
        assert "random" in api[name]["description"]
    image = api["/image_to_text"]["parameters"][0]["example_input"]
    assert image["url"] == "cat.jpg" and image["meta"]["_type"] == "gradio.FileData"  # handle_file('cat.jpg')
    text_params = api["/text_to_text"]["parameters"]
    copied = [handle_file(CAT) if p["parameter_name"] == "image" else p["example_input"]
              for p in api["/image_to_text"]["parameters"]]
    copied[[p["parameter_name"] for p in api["/image_to_text"]["parameters"]].index("max_new_tokens")] = 6
    first, _, _ = client.predict(*copied, api_name="/image_to_text")
    second, _, _ = client.predict(*copied, api_name="/image_to_text")
    assert len(first["candidates"]) == 1 and first["seed"] != second["seed"]  # "" is a random seed each time
    assert text_params[0]["example_input"].endswith("?")


@pytest.mark.parametrize("seed, expected", [("", None), ("  ", None), (None, None), ("42", 42), (" 7 ", 7), (0, 0),
                                            (2**32 - 1, 2**32 - 1)])
def test_seed_accepts_empty_text_or_a_whole_number(seed, expected):
    from clot.ui import parse_seed

    assert parse_seed(seed) == expected


@pytest.mark.parametrize("header, language", [
    ("ja,en-US;q=0.9", "ja"), ("fr-FR,fr;q=0.9,zh-CN;q=0.5,en;q=0.6", "en"), ("de-DE,de", None), (None, None),
    ("en;q=0,ja;q=0.1", "ja"), ("zh-TW;q=x,ja", "ja"),
])
def test_browser_language_is_the_best_weighted_one_we_speak(header, language):
    from clot.ui import browser_language

    assert browser_language(header) == language


def test_auto_language_without_text_follows_the_browser(app, tiny_dir):
    _, client = app
    japanese = Client(client.src, verbose=False, headers={"Accept-Language": "ja-JP,ja;q=0.9,en;q=0.8"})
    blank = handle_file(EXAMPLES / "blank_ja.jpg")
    result, _, _ = japanese.predict(*call(blank, "", n=1, mode="sample", max_new_tokens=4),
                                    api_name="/image_text_to_text")
    assert result["language"] == "ja"
    typed, _, _ = japanese.predict(*call(blank, "What now?", n=1, mode="sample", max_new_tokens=4),
                                   api_name="/image_text_to_text")
    assert typed["language"] == "en"  # text decides when there is some
    plain, _, _ = client.predict(*call(blank, "", n=1, mode="sample", max_new_tokens=4),
                                 api_name="/image_text_to_text")
    assert plain["language"] == "en"


def test_tiny_model_is_recognised_for_the_banner(tiny_dir, tmp_path):
    from clot.ui import tiny_model_name

    assert tiny_model_name(str(tiny_dir)).startswith("clot-tiny-qwen2.5-vl")
    assert tiny_model_name("Qwen/Qwen2.5-VL-3B-Instruct") is None
    (tmp_path / "clot_tiny.json").write_text("{not json")
    assert tiny_model_name(str(tmp_path)) is None
