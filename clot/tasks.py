"""The vocabulary of the game: task types, languages, requests and candidates."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


class ClotError(ValueError):
    """An error a user can cause and fix: the message says what to do."""


class Task(str, enum.Enum):
    I2T = "I2T"  # an ordinary image -> a funny caption
    IT2T = "IT2T"  # an image containing text with a blank -> what fills the blank
    T2T = "T2T"  # a question -> a funny answer

    @property
    def needs_image(self) -> bool:
        return self is not Task.T2T

    @classmethod
    def parse(cls, value: "Task | str") -> "Task":
        try:
            return cls(str(value.value if isinstance(value, Task) else value).upper())
        except ValueError:
            raise ClotError(f"Unknown task type {value!r}: use one of I2T, IT2T, T2T.") from None


class Language(str, enum.Enum):
    EN = "en"
    ZH = "zh"
    JA = "ja"

    @classmethod
    def parse(cls, value: "Language | str | None", text: str = "") -> "Language":
        """A language code, or None/"auto" to detect it from the text."""
        if value is None or str(value).lower() in ("", "auto"):
            return detect_language(text)
        code = str(value.value if isinstance(value, Language) else value).lower()
        code = {"cn": "zh", "jp": "ja"}.get(code, code)  # the dataset's file names
        try:
            return cls(code)
        except ValueError:
            raise ClotError(f"Unknown language {value!r}: use auto, en, zh or ja.") from None


_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def detect_language(text: str) -> Language:
    """Kana means Japanese, Han characters without kana mean Chinese, anything else English."""
    if _KANA.search(text or ""):
        return Language.JA
    if _HAN.search(text or ""):
        return Language.ZH
    return Language.EN


@dataclass
class Sampling:
    """Sampling settings of one request. Defaults follow the released CLoT demo where it had one."""

    temperature: float = 0.9
    top_p: float = 0.9
    top_k: int = 50  # 0 turns top-k off
    max_new_tokens: int = 64
    repetition_penalty: float = 1.05
    seed: int | None = None

    LIMITS = {
        "temperature": (0.01, 2.0),
        "top_p": (0.01, 1.0),
        "top_k": (0, 1000),
        "max_new_tokens": (1, 512),
        "repetition_penalty": (1.0, 2.0),
    }

    # What transformers 4.x, the stack the authors' checkpoints were served on, used for a setting
    # that a generation_config leaves unset (transformers 5 leaves it None).
    UNSET_GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}

    @classmethod
    def from_generation_config(cls, config, seed: int | None = None) -> "Sampling":
        """A checkpoint's own sampling settings (its generation_config), clipped to our limits;
        max_new_tokens stays ours when the checkpoint does not set it."""
        sampling = cls(seed=seed)
        for name, (low, high) in cls.LIMITS.items():
            value = getattr(config, name, None)
            if value is None:
                value = cls.UNSET_GENERATION_DEFAULTS.get(name, getattr(sampling, name))
            setattr(sampling, name, type(getattr(sampling, name))(min(max(value, low), high)))
        return sampling

    def validate(self) -> "Sampling":
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            want_int = name in ("top_k", "max_new_tokens")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ClotError(f"{name} must be a number, got {value!r}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise ClotError(f"{name} must be a finite number, got {value!r}.")
            if want_int:
                if float(value) != int(value):
                    raise ClotError(f"{name} must be a whole number, got {value!r}.")
                setattr(self, name, int(value))
            if not low <= value <= high:
                raise ClotError(f"{name} must be between {low} and {high}, got {value!r}.")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, (int, float)) \
                    or (isinstance(self.seed, float) and not math.isfinite(self.seed)) or float(self.seed) != int(self.seed):
                raise ClotError(f"seed must be a whole number or empty, got {self.seed!r}.")
            self.seed = int(self.seed)
            if not 0 <= self.seed < 2**32:
                raise ClotError(f"seed must be between 0 and {2**32 - 1}, got {self.seed}.")
        return self


MAX_CANDIDATES = 16
MAX_TEXT_CHARS = 2000
MAX_CONDITION_CHARS = 40


@dataclass
class Request:
    """One player's turn: what to answer, how many answers, and how to sample them.

    `conditions` holds one word per candidate ("" = no condition). When fewer words than
    candidates are given, the remaining candidates get no condition.
    """

    task: Task | str
    image: Image.Image | None = None
    text: str = ""
    language: Language | str | None = None
    conditions: list[str] = field(default_factory=list)
    num_candidates: int = 3
    sampling: Sampling = field(default_factory=Sampling)
    wording: int = 0

    def validate(self) -> "Request":
        self.task = Task.parse(self.task)
        self.text = clean_text(self.text or "")
        if len(self.text) > MAX_TEXT_CHARS:
            raise ClotError(f"The text is {len(self.text)} characters long; the limit is {MAX_TEXT_CHARS}.")
        if self.task.needs_image and self.image is None:
            raise ClotError(f"Task {self.task.value} needs an image: please upload one.")
        if self.task is Task.T2T and not self.text:
            raise ClotError("Task T2T needs a question: please type one.")
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise ClotError("The image must be a PIL image.")
        self.language = Language.parse(self.language, self.text)
        if isinstance(self.num_candidates, bool) or not isinstance(self.num_candidates, (int, float)) \
                or float(self.num_candidates) != int(self.num_candidates):
            raise ClotError(f"The number of candidates must be a whole number, got {self.num_candidates!r}.")
        self.num_candidates = int(self.num_candidates)
        if not 1 <= self.num_candidates <= MAX_CANDIDATES:
            raise ClotError(f"The number of candidates must be between 1 and {MAX_CANDIDATES}, got {self.num_candidates}.")
        words = [clean_text(str(w)) for w in (self.conditions or [])]
        if len(words) > self.num_candidates:
            raise ClotError(f"{len(words)} condition words for {self.num_candidates} candidates: give at most one per candidate.")
        for word in words:
            if len(word) > MAX_CONDITION_CHARS:
                raise ClotError(f"The condition word {word[:20]!r}… is too long (limit {MAX_CONDITION_CHARS} characters).")
        self.conditions = words + [""] * (self.num_candidates - len(words))
        if not isinstance(self.sampling, Sampling):
            raise ClotError("sampling must be a Sampling object.")
        self.sampling.validate()
        return self


# Control characters (C0 but tab and new line, DEL, C1) and lone surrogates, which are not encodable text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# Zero-width and direction marks (and the BOM) are ordinary text inside a sentence and kept there
# (emoji sequences need the zero-width joiner), but trimmed at both ends like spaces, so a text
# made only of them counts as empty.
_EDGES = re.compile(r"^[\s\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]+"
                    r"|[\s\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]+$")


def clean_text(text: str) -> str:
    """Strip control characters (never meaningful in a joke), and surrounding space and invisible marks."""
    if not isinstance(text, str):
        raise ClotError(f"Expected text, got {type(text).__name__}.")
    return _EDGES.sub("", _CONTROL.sub("", text))


@dataclass
class Candidate:
    """One generated answer, with the condition that produced it and the model's scores."""

    text: str
    condition: str = ""
    rank_score: float | None = None  # probability of being ranked first (CLoT mode)
    select_score: float | None = None  # probability of being picked in the final selection
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "condition": self.condition,
            "rank_score": self.rank_score,
            "select_score": self.select_score,
            "chosen": self.chosen,
        }
