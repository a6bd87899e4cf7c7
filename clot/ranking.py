"""The arena leaderboard: Bradley–Terry ratings from blind battles, with bootstrap intervals.

The fit is order-independent maximum likelihood (no online Elo): P(i beats j) = σ(r_i − r_j), a tie
(and a "both unfunny" vote) counts as half a win for each side, as Chatbot Arena counts them. Ratings
are shown on the Elo-like scale 400·log10 odds, centred on 1000.

A one-sided record (10 wins to 0) has no finite maximum, so the log-likelihood gets a tiny Gaussian
prior, −PRIOR/2·Σ r² in natural units (a standard deviation of 10, i.e. ±1700 points): it keeps every
rating finite and moves a balanced fit by well under a point (30 wins to 10 comes out at 190.7 instead
of 400·log10 3 = 190.8). The 95% intervals come from a seeded multinomial bootstrap over the battles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

SCALE = 400 / math.log(10)  # natural log-odds -> Elo-like points
CENTRE = 1000.0
PRIOR = 0.01
MIN_BATTLES = 5  # an adapter needs this many blind battles to be ranked
BOOTSTRAP_ROUNDS = 200
OUTCOMES = ("A", "B", "tie", "bad")


def win_matrix(battles: list[tuple[str, str, str]], names: list[str]) -> np.ndarray:
    """W[i, j] = how often names[i] beat names[j]; ties and "bad" give half a win to each side."""
    index = {name: i for i, name in enumerate(names)}
    wins = np.zeros((len(names), len(names)))
    for a, b, outcome in battles:
        i, j = index[a], index[b]
        if outcome == "A":
            wins[i, j] += 1
        elif outcome == "B":
            wins[j, i] += 1
        elif outcome in ("tie", "bad"):
            wins[i, j] += 0.5
            wins[j, i] += 0.5
        else:
            raise ValueError(f"Unknown battle outcome {outcome!r}; expected one of {OUTCOMES}.")
    return wins


def fit(wins: np.ndarray, prior: float = PRIOR, start: np.ndarray | None = None) -> np.ndarray:
    """Bradley–Terry ratings (natural log-odds units, mean 0) maximising the penalised likelihood of `wins`.

    Newton-CG with the exact gradient and Hessian: the problem is smooth and convex, so a few steps
    suffice, fewer still from a nearby `start` (the bootstrap starts from the full fit)."""
    games = wins + wins.T

    def loss_and_grad(r):
        diff = r[:, None] - r[None, :]
        loss = -(wins * log_expit(diff)).sum() + prior / 2 * (r @ r)
        pull = wins * expit(-diff)  # d loss / d diff_ij = -W_ij σ(-diff_ij)
        return loss, -pull.sum(axis=1) + pull.sum(axis=0) + prior * r

    def hessian(r):
        diff = r[:, None] - r[None, :]
        weight = games * expit(diff) * expit(-diff)
        return np.diag(weight.sum(axis=1)) - weight + prior * np.eye(len(r))

    begin = np.zeros(len(wins)) if start is None else start
    result = minimize(loss_and_grad, begin, jac=True, hess=hessian, method="Newton-CG")
    return result.x - result.x.mean()


def to_points(ratings: np.ndarray) -> np.ndarray:
    return CENTRE + SCALE * ratings


@dataclass
class Standing:
    name: str
    rating: float  # Elo-like points
    low: float  # 95% bootstrap interval
    high: float
    battles: int
    win_rate: float  # (wins + ties/2) / battles


@dataclass
class Leaderboard:
    standings: list[Standing]  # ranked adapters, best first
    names: list[str]  # the order of win_rates' rows and columns (the standings' order)
    win_rates: np.ndarray  # row's share of wins against column (NaN where they never met)
    unranked: dict[str, int]  # adapters below MIN_BATTLES: their battle counts


def leaderboard(battles: list[tuple[str, str, str]], *, min_battles: int = MIN_BATTLES,
                rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> Leaderboard:
    """Rank the adapters of `battles` (adapter A, adapter B, outcome): fit, bootstrap, win matrix.

    Adapters with fewer than `min_battles` battles are left out of the fit (with their battles), so
    a handful of lucky votes cannot put a new adapter on top."""
    counts: dict[str, int] = {}
    for a, b, _ in battles:
        counts[a] = counts.get(a, 0) + 1
        counts[b] = counts.get(b, 0) + 1
    ranked = sorted(name for name, count in counts.items() if count >= min_battles)
    kept = [battle for battle in battles if battle[0] in ranked and battle[1] in ranked]
    unranked = {name: count for name, count in counts.items() if count < min_battles}
    if len(ranked) < 2 or not kept:
        return Leaderboard([], [], np.zeros((0, 0)), dict(counts))

    wins = win_matrix(kept, ranked)
    points = to_points(fit(wins))
    low, high = bootstrap(kept, ranked, rounds=rounds, seed=seed)
    games = wins + wins.T
    played = games.sum(axis=1)
    order = sorted(range(len(ranked)), key=lambda i: -points[i])
    standings = [Standing(ranked[i], float(points[i]), float(low[i]), float(high[i]), int(round(played[i])),
                          float(wins[i].sum() / played[i])) for i in order]
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(games > 0, wins / games, np.nan)
    return Leaderboard(standings, [ranked[i] for i in order], rates[np.ix_(order, order)], unranked)


def bootstrap(battles: list[tuple[str, str, str]], names: list[str], *, rounds: int = BOOTSTRAP_ROUNDS,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2.5% and 97.5% percentiles of the ratings (points) over `rounds` multinomial resamples of the battles.

    Identical battles are grouped first, so one resample is one multinomial draw over the groups."""
    kinds: dict[tuple[str, str, str], int] = {}
    for battle in battles:
        kinds[battle] = kinds.get(battle, 0) + 1
    groups = list(kinds)
    weights = np.array([kinds[g] for g in groups], dtype=float)
    per_group = np.stack([win_matrix([g], names) for g in groups])
    rng = np.random.default_rng(seed)
    centre = fit(win_matrix(battles, names))
    samples = np.empty((rounds, len(names)))
    for k in range(rounds):
        draw = rng.multinomial(len(battles), weights / weights.sum())
        samples[k] = to_points(fit(np.tensordot(draw, per_group, axes=1), start=centre))
    return np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0)
