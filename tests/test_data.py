"""The Oogiri-GO loader on the bundled sample: counts, image resolution, validation, split, stats."""

from __future__ import annotations

import json
import random
import shutil
import zipfile

import pytest
from PIL import Image

from clot import data
from clot.tasks import ClotError, Language, Task

SAMPLE = data.SAMPLE_DIR


@pytest.fixture(scope="module")
def sample():
    return data.load(SAMPLE)


def test_sample_has_every_language_and_type_and_ranking_data(sample):
    assert sample.report.kept == len(sample.samples) == 134
    assert not sample.report.skipped
    prompts = sample.prompts()
    assert len(prompts) == 33
    assert {(p.lang, p.task) for p in prompts} == {(lang, task) for lang in Language for task in Task}
    rankable = [p for p in prompts if len(p.rankable) >= 5]
    assert len(rankable) >= 6
    for p in prompts:  # answers sorted by likes, star-less ones last
        stars = [a.star or 0 for a in p.answers]
        assert stars == sorted(stars, reverse=True)
        assert len({(a.lang, a.task, a.image, a.question if not a.image else None) for a in p.answers}) == 1


def test_missing_null_and_zero_star_all_mean_no_star(sample):
    rows = {}
    for stem in data.FILES:
        for line in (SAMPLE / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rows[row["text"]] = "missing" if "star" not in row else row["star"]
    starless = {s.text for s in sample.samples if s.star is None}
    assert starless == {text for text, star in rows.items() if star in ("missing", None, 0)}
    assert {rows[t] for t in starless} == {"missing", None, 0}


def test_images_resolve_by_id_whatever_folder_or_extension(sample):
    members = zipfile.ZipFile(SAMPLE / "images.zip").namelist()
    suffixes = {m.rsplit(".", 1)[1] for m in members}
    folders = {m.rsplit("/", 1)[0] for m in members}
    assert len(suffixes) >= 3 and len(folders) >= 3
    for image_id in {s.image for s in sample.samples if s.image}:
        image = sample.images.open(image_id)
        assert image.mode == "RGB" and 64 <= image.width <= 160


def test_extracted_folder_works_like_the_zip(tmp_path):
    for stem in data.FILES:
        shutil.copy(SAMPLE / f"{stem}.jsonl", tmp_path)
    zipfile.ZipFile(SAMPLE / "images.zip").extractall(tmp_path / "images")
    loaded = data.load(tmp_path)
    assert loaded.report.kept == 134 and not loaded.report.skipped
    assert loaded.images.open("700100").size == (160, 100)


def corrupted_copy(tmp_path):
    """The sample plus one bad row per reason, appended to en.jsonl (lines 47 onwards)."""
    for name in ("en.jsonl", "cn.jsonl", "jp.jsonl", "images.zip"):
        shutil.copy(SAMPLE / name, tmp_path)
    bad = [
        '{"type": "I2T", "question": null, "image": "500100", "text": "cut off',  # malformed JSON
        '["not", "an", "object"]',  # malformed too: not a row
        json.dumps({"type": "X2Y", "question": None, "image": "500100", "text": "a", "star": 1}),
        json.dumps({"type": "I2T", "question": None, "image": "500100", "text": "  ", "star": 1}),
        json.dumps({"type": "I2T", "question": None, "image": "500100", "star": 1}),
        json.dumps({"type": "I2T", "question": None, "image": None, "text": "a", "star": 1}),
        json.dumps({"type": "T2T", "question": None, "image": None, "text": "a", "star": 1}),
        json.dumps({"type": "I2T", "question": None, "image": "424242", "text": "a", "star": 1}),
        json.dumps({"type": "I2T", "question": None, "image": "500100", "text": "a", "star": -3}),
        json.dumps({"type": "I2T", "question": None, "image": "500100", "text": "a", "star": "lots"}),
    ]
    with open(tmp_path / "en.jsonl", "a", encoding="utf-8") as f:
        f.write("\n".join(bad) + "\n")
    return tmp_path


def test_corrupted_copy_is_loaded_with_a_count_per_reason(tmp_path):
    loaded = data.load(corrupted_copy(tmp_path))
    assert loaded.report.kept == 134
    assert dict(loaded.report.skipped) == {"malformed_json": 2, "unknown_type": 1, "missing_text": 2,
                                           "missing_image": 1, "missing_question": 1,
                                           "missing_image_file": 1, "bad_star": 2}
    assert loaded.report.examples["malformed_json"] == "en.jsonl:47"
    assert data.stats(loaded)["skipped"]["missing_text"] == 2


def test_strict_stops_at_the_first_bad_row_with_file_and_line(tmp_path):
    with pytest.raises(ClotError, match=r"en\.jsonl:47: bad row \(malformed json\)"):
        data.load(corrupted_copy(tmp_path), strict=True)


def test_require_star_skips_rows_without_likes(sample):
    loaded = data.load(SAMPLE, require_star=True)
    starless = sum(s.star is None for s in sample.samples)
    assert starless > 0
    assert loaded.report.skipped == {"no_star": starless}
    assert loaded.report.kept == 134 - starless


def test_split_is_by_prompt_seeded_stable_and_saved(sample, tmp_path):
    prompts = sample.prompts()
    split = data.make_split(prompts, test_ratio=0.2, seed=3)
    assert not set(split.train) & set(split.test)
    assert set(split.train) | set(split.test) == {p.id for p in prompts}
    assert len(split.test) == round(33 * 0.2)
    shuffled = prompts[:]
    random.Random(1).shuffle(shuffled)
    assert data.make_split(shuffled, test_ratio=0.2, seed=3) == split  # order of rows does not matter
    assert data.make_split(prompts, test_ratio=0.2, seed=4).test != split.test
    path = split.save(tmp_path / "split.json")
    assert data.Split.load(path) == split
    again = data.load_or_make_split(path, prompts, test_ratio=0.5, seed=9)  # the saved one wins
    assert again == split
    for p in split.part(prompts, "test"):  # every answer of a test prompt is in the test part
        assert p.id not in split.train
    saved = json.loads(path.read_text())
    saved["test"] = saved["test"][1:]
    path.write_text(json.dumps(saved))
    with pytest.raises(ClotError, match="edited"):
        data.Split.load(path)


def test_split_command_and_stats_command(tmp_path, capsys):
    assert data.main(["split", "--data", str(SAMPLE), "--out", str(tmp_path / "s.json"), "--test-ratio", "0.2"]) == 0
    assert data.Split.load(tmp_path / "s.json").test
    assert data.main(["stats", "--data", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "ja   IT2T" in out and "star coverage: 88.8%" in out and "ranking data): 10" in out
    assert data.main(["stats", "--data", str(tmp_path / "nowhere")]) == 2
    assert "No dataset folder" in capsys.readouterr().err


def test_unreachable_hub_gives_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClotError, match="pass its local folder with --data"):
        data.load("hub")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    huge = tmp_path / "images"
    huge.mkdir()
    Image.new("1", (8000, 6000)).save(huge / "1.png")  # 48 Mpx, a few kB on disk
    store = data.ImageStore(huge)
    with pytest.raises(ClotError, match="8000x6000"):
        store.open("1")
