"""Noun extraction per language, the noun set S, and condition sampling."""

from __future__ import annotations

import json
import random

from clot import data, nouns


def test_nouns_per_language():
    assert {"蔬菜", "老板"} <= set(nouns.extract_nouns("我妈说多吃蔬菜，老板画的饼挂在那上面。", "zh"))
    assert "说" not in nouns.extract_nouns("我妈说多吃蔬菜", "zh")
    ja = nouns.extract_nouns("河童の使いが来た。野菜も食べなさい。", "ja")
    assert {"河童", "野菜"} <= set(ja) and "来" not in ja and "の" not in ja
    en = nouns.extract_nouns("The cucumber quickly refuses to explain itself to the king's therapist.", "en")
    assert {"cucumber", "king", "therapist"} <= set(en)
    assert not {"the", "quickly", "itself", "to"} & set(en)
    assert len(en) == len(set(en))


def test_english_fallback_is_used_without_nltk_data():
    if nouns._nltk_tagger() is None:
        assert nouns.tagger_name("en") == "english_nouns_fallback"
    assert nouns.english_nouns_fallback("He was walking happily with a wonderful goat.") == ["goat"]


def test_noun_set_is_built_saved_with_provenance_and_loadable(tmp_path):
    prompts = data.load(data.SAMPLE_DIR).prompts()
    path = tmp_path / "nouns.json"
    result = nouns.build_noun_set(prompts, path, data_hash="abc", split_hash="def")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["nouns"] == result["nouns"]
    assert set(saved["nouns"]) == {"en", "zh", "ja"}
    assert "黄瓜" in saved["nouns"]["zh"] and "cucumber" in saved["nouns"]["en"]
    assert saved["provenance"]["taggers"] == {"en": nouns.tagger_name("en"), "ja": "janome", "zh": "jieba.posseg"}
    assert saved["provenance"]["split_hash"] == "def" and saved["provenance"]["answers"]["ja"] == 43
    for lang, words in saved["nouns"].items():
        assert words == sorted(set(words))
        assert nouns.load_nouns(lang, path) == words


def test_conditions_are_empty_with_probability_rho():
    rng = random.Random(0)
    drawn = nouns.draw_conditions(["a", "b"], 2000, rho=0.3, rng=rng)
    assert 0.25 < drawn.count("") / 2000 < 0.35 and set(drawn) == {"", "a", "b"}
    answer = "My therapist said to face my fears."
    picked = [nouns.answer_condition(answer, "en", 0.0, rng) for _ in range(20)]
    assert all(word and word in answer.lower() for word in picked)
    assert nouns.answer_condition(answer, "en", 1.0, rng) == ""
