"""The noun set S and weak-condition sampling (METHOD.md §4).

A noun drawn uniformly from a large, diverse set is usually unrelated to a given prompt: a weak,
remote association that pushes the model to leap. The bundled lists in assets/nouns/ are a
fallback; training builds S from the training answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from clot.tasks import Language

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "nouns"


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
    """n conditions: each empty with probability rho, else a uniform noun of the set."""
    rng = rng or random.Random()
    return ["" if not nouns or rng.random() < rho else rng.choice(nouns) for _ in range(n)]
