"""Nouns per language, the noun set S, and condition sampling (the paper's stages 1 and 2).

Taggers: Chinese jieba.posseg, Japanese Janome, English nltk.pos_tag when nltk and its tagger data
are installed. Without them English uses a documented fallback (`english_nouns_fallback`).

A noun drawn uniformly from a large, diverse set is usually unrelated to a given prompt: a weak,
remote association that pushes the model to leap. The bundled lists in assets/nouns/ are a
fallback; training builds S from the training answers with `build_noun_set`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import random
import re
from pathlib import Path

from clot.tasks import Language

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "nouns"

# jieba flags that name things: common nouns, names of people, places, organisations, other proper nouns.
ZH_NOUN_FLAGS = {"n", "nr", "nrfg", "nrt", "ns", "nt", "nz", "ng"}
# Janome sub-types of 名詞 that are real content nouns (not pronouns, numbers, suffixes or dependent nouns).
JA_NOUN_KINDS = {"一般", "固有名詞", "サ変接続", "形容動詞語幹"}

# The English fallback: words that are (almost) never nouns in short jokes, and non-noun endings.
EN_STOPWORDS = set("""
a about above after again against all almost also always am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during
each even ever every few for from further get gets got had hadn't has hasn't have haven't having he he'd he'll he's
her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself
just let's like made make makes me more most much must mustn't my myself never new no nor not now of off often old
on once one only or other ought our ours ourselves out over own really said same say says see seen shan't she she'd
she'll she's should shouldn't so some still such than that that's the their theirs them themselves then there
there's these they they'd they'll they're they've this those though through to too two under until up upon us very
was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's whom
why why's will with won't would wouldn't yes yet you you'd you'll you're you've your yours yourself yourselves
go goes going gone went come comes came take takes took give gives gave know knows knew think thinks thought
want wants wanted tell tells told ask asks asked keep keeps kept find found put puts call calls look looks looked
seem seems feel feels felt try tries tried leave left mean means started start use used need needs
good bad great big small little long short high low right wrong last first next best worst better worse sure
exactly honestly already away back instead maybe nobody somebody everyone everything nothing something anything
someone anyone via per whose whatever whenever
""".split())
EN_NON_NOUN_ENDINGS = ("ly", "ous", "ful", "ive", "able", "ible", "less", "ish")
_EN_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")

log = logging.getLogger(__name__)


def english_nouns_fallback(text: str) -> list[str]:
    """English nouns without a tagger: a heuristic, not a parser.

    Lower-cased words of three or more letters, possessive 's removed, that are not in a list of
    function words, common verbs, adjectives and adverbs, and do not end like an adverb or adjective
    (-ly, -ous, -ful, -ive, -able, -ible, -less, -ish). Long words ending in -ed or -ing are taken as
    verbs. It keeps most nouns of a short joke and lets some verbs through, which is acceptable
    for drawing remote associations; install nltk with its tagger data for real tagging."""
    nouns = []
    for word in _EN_WORD.findall(text):
        word = word.lower()
        word = word[:-2] if word.endswith("'s") else word
        if len(word) < 3 or word in EN_STOPWORDS or "'" in word or word.endswith(EN_NON_NOUN_ENDINGS):
            continue
        if len(word) > 5 and word.endswith(("ed", "ing")):
            continue
        nouns.append(word)
    return nouns


@functools.lru_cache(maxsize=1)
def _nltk_tagger():
    """nltk.pos_tag if nltk and its tagger data are installed, else None (then the fallback is used)."""
    try:
        import nltk

        nltk.pos_tag(["test"])
        return nltk.pos_tag
    except (ImportError, LookupError, OSError):
        return None


@functools.lru_cache(maxsize=1)
def _janome():
    from janome.tokenizer import Tokenizer

    return Tokenizer()


@functools.lru_cache(maxsize=1)
def _jieba():
    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)
    return jieba.posseg


def tagger_name(lang: Language | str) -> str:
    """Which tagger extracts nouns of this language here (recorded in the noun set's provenance)."""
    lang = Language.parse(lang)
    if lang is Language.ZH:
        return "jieba.posseg"
    if lang is Language.JA:
        return "janome"
    return "nltk.pos_tag" if _nltk_tagger() else "english_nouns_fallback"


def extract_nouns(text: str, lang: Language | str) -> list[str]:
    """The nouns of one text, in order of appearance, each once."""
    lang = Language.parse(lang)
    if lang is Language.ZH:
        found = [w.word for w in _jieba().cut(text) if w.flag in ZH_NOUN_FLAGS]
    elif lang is Language.JA:
        found = []
        for token in _janome().tokenize(text):
            kind = token.part_of_speech.split(",")
            if kind[0] == "名詞" and kind[1] in JA_NOUN_KINDS:
                found.append(token.surface)
    elif _nltk_tagger():
        words = _EN_WORD.findall(text)
        found = [w.lower() for w, tag in _nltk_tagger()(words) if tag in ("NN", "NNS")]
    else:
        found = english_nouns_fallback(text)
    clean = [w.strip() for w in found if w.strip() and not w.strip().isdigit()]
    return list(dict.fromkeys(clean))


def build_noun_set(prompts, path: str | Path | None = None, **provenance) -> dict:
    """S: every noun of every answer of the given (training) prompts, per language, deduplicated.

    Saved atomically as {"nouns": {lang: [...]}, "provenance": {...}} when `path` is given;
    `provenance` adds facts such as the data and split hashes."""
    from tqdm import tqdm

    from clot.adapters import write_json_atomic

    nouns: dict[str, set[str]] = {}
    answers: dict[str, int] = {}
    for prompt in tqdm(prompts, desc="noun set", unit="prompt"):
        lang = prompt.lang.value
        for answer in prompt.answers:
            nouns.setdefault(lang, set()).update(extract_nouns(answer.text, prompt.lang))
            answers[lang] = answers.get(lang, 0) + 1
    result = {
        "nouns": {lang: sorted(words) for lang, words in sorted(nouns.items())},
        "provenance": {
            "taggers": {lang: tagger_name(lang) for lang in sorted(nouns)},
            "prompts": len(prompts),
            "answers": answers,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **provenance,
        },
    }
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), result)
    return result


def load_nouns(lang: Language | str, path: str | Path | None = None) -> list[str]:
    """Nouns of one language from a noun-set JSON ({"nouns": {lang: [...]}}) or the bundled list."""
    lang = Language.parse(lang)
    if path is not None and Path(path).is_file():
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        nouns = data.get("nouns", {}).get(lang.value, [])
        if nouns:
            return list(nouns)
    lines = (BUNDLED / f"{lang.value}.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def draw_conditions(nouns: list[str], n: int, rho: float = 0.5, rng: random.Random | None = None) -> list[str]:
    """Stage 2 and CLoT inference: n conditions, each empty with probability rho, else a uniform noun of S."""
    rng = rng or random.Random()
    return ["" if not nouns or rng.random() < rho else rng.choice(nouns) for _ in range(n)]


def answer_condition(answer: str, lang: Language | str, rho: float = 0.5, rng: random.Random | None = None) -> str:
    """Stage 1: a noun of the human answer itself (so the answer satisfies it), or "" with probability rho."""
    rng = rng or random.Random()
    if rng.random() < rho:
        return ""
    nouns = extract_nouns(answer, lang)
    return rng.choice(nouns) if nouns else ""
