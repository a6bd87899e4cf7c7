"""Templates: complete, distinct wordings, and targets that parse back."""

import pytest

from clot import prompts
from clot.tasks import ClotError, Language, Request, Sampling, Task, detect_language

ALL = [(task, lang) for task in Task for lang in Language]


@pytest.mark.parametrize("task,lang", ALL)
def test_three_distinct_wordings_for_every_kind(task, lang):
    options = ["one", "two", "three"]
    makers = [
        lambda w: prompts.generation_prompt(task, lang, "Q?", "", w),
        lambda w: prompts.generation_prompt(task, lang, "Q?", "penguin", w),
        lambda w: prompts.masked_prompt(task, lang, "a [MASK] walks in", "Q?", w),
        lambda w: prompts.selection_prompt(task, lang, options, 1, "Q?", w),
        lambda w: prompts.selection_prompt(task, lang, options, 2, "Q?", w),
        lambda w: prompts.ranking_prompt(task, lang, options, "Q?", w),
    ]
    for make in makers:
        texts = [make(w) for w in range(prompts.NUM_WORDINGS)]
        assert len(set(texts)) == prompts.NUM_WORDINGS
        for w, text in enumerate(texts):
            assert text.startswith(prompts.OPENER[lang][w])  # "think outside the box" first
            assert text.endswith(prompts.LEAD_IN[lang][w])  # "a satisfying answer is" last
            assert "Q?" in text


def test_condition_and_options_appear_in_prompt():
    text = prompts.generation_prompt(Task.T2T, Language.EN, "Why?", "walrus")
    assert "“walrus”" in text
    assert "walrus" not in prompts.generation_prompt(Task.T2T, Language.EN, "Why?", "")
    ranking = prompts.ranking_prompt(Task.I2T, Language.ZH, ["甲", "乙\n丙"])
    assert "A. 甲" in ranking and "B. 乙 丙" in ranking  # an option's line breaks never start a new option


def test_targets_round_trip_through_parsers():
    options = ["alpha", "beta", "gamma", "delta", "epsilon"]
    order = [2, 0, 4, 1, 3]
    target = prompts.ranking_target(options, order)
    assert target.splitlines()[0] == "1. C. gamma"
    assert prompts.parse_ranking(target, 5) == order
    assert prompts.selection_target(options, [3]) == "D. delta"
    assert prompts.parse_selection("D. delta", 5) == [3]
    assert prompts.parse_selection(prompts.selection_target(options, [4, 1]), 5, 2) == [1, 4]
    assert prompts.parse_selection("no letter here", 5) is None
    assert prompts.parse_ranking("1. A. x\n2. A. y", 2) is None
    with pytest.raises(ClotError):
        prompts.ranking_target(options, [0, 1])


def test_language_detection():
    assert detect_language("Why did the chicken cross?") is Language.EN
    assert detect_language("为什么猫不喜欢洗澡？") is Language.ZH
    assert detect_language("猫はなぜお風呂が嫌い？") is Language.JA
    assert detect_language("") is Language.EN
    assert Language.parse("cn") is Language.ZH and Language.parse("jp") is Language.JA
    assert Language.parse("auto", "ラーメン") is Language.JA


@pytest.mark.parametrize("request_kwargs,message", [
    (dict(task="I2T"), "needs an image"),
    (dict(task="IT2T"), "needs an image"),
    (dict(task="T2T", text="   "), "needs a question"),
    (dict(task="X2T", text="q"), "Unknown task type"),
    (dict(task="T2T", text="q", language="fr"), "Unknown language"),
    (dict(task="T2T", text="q", num_candidates=0), "between 1 and 16"),
    (dict(task="T2T", text="q", num_candidates=2.5), "whole number"),
    (dict(task="T2T", text="q", num_candidates=1, conditions=["a", "b"]), "at most one per candidate"),
    (dict(task="T2T", text="x" * 3000), "limit is 2000"),
    (dict(task="T2T", text="q", sampling=Sampling(temperature=0)), "temperature must be between"),
    (dict(task="T2T", text="q", sampling=Sampling(top_p=float("nan"))), "finite"),
    (dict(task="T2T", text="q", sampling=Sampling(top_k="5")), "top_k must be a number"),
    (dict(task="T2T", text="q", sampling=Sampling(max_new_tokens=100000)), "max_new_tokens must be between"),
    (dict(task="T2T", text="q", sampling=Sampling(repetition_penalty=0.5)), "repetition_penalty"),
    (dict(task="T2T", text="q", sampling=Sampling(seed=-1)), "seed must be between"),
])
def test_bad_requests_get_specific_errors(request_kwargs, message):
    with pytest.raises(ClotError, match=message):
        Request(**request_kwargs).validate()


def test_request_fills_missing_conditions_and_cleans_text():
    request = Request(task="T2T", text="  Why?\x00\x07 ", num_candidates=3, conditions=["cat"]).validate()
    assert request.text == "Why?"
    assert request.conditions == ["cat", "", ""]
    assert request.language is Language.EN
