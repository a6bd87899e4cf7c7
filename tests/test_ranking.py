"""Bradley–Terry leaderboard: closed forms, symmetry, finiteness, the seeded bootstrap and its coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clot import ranking


def record(wins_a: int, wins_b: int, ties: int = 0, a: str = "x", b: str = "y") -> list[tuple[str, str, str]]:
    return [(a, b, "A")] * wins_a + [(a, b, "B")] * wins_b + [(a, b, "tie")] * ties


def points(board: ranking.Leaderboard) -> dict[str, float]:
    return {s.name: s.rating for s in board.standings}


def test_two_adapters_match_the_closed_form():
    board = ranking.leaderboard(record(30, 10), rounds=20)
    gap = points(board)["x"] - points(board)["y"]
    assert gap == pytest.approx(400 * math.log10(3), abs=0.5)  # 190.8 points; the tiny prior costs < 0.5
    assert [s.name for s in board.standings] == ["x", "y"]
    assert np.mean([s.rating for s in board.standings]) == pytest.approx(ranking.CENTRE)
    x = board.standings[0]
    assert (x.battles, x.win_rate) == (40, 0.75)
    assert x.low < x.rating < x.high


def test_a_tie_is_half_a_win():
    # 20 wins, 10 losses, 20 ties = 30 : 20 in half-wins -> log-odds ln 1.5
    gap = np.diff(ranking.fit(ranking.win_matrix(record(20, 10, ties=20), ["y", "x"])))[0]
    assert gap * ranking.SCALE == pytest.approx(400 * math.log10(1.5), abs=0.5)
    assert ranking.win_matrix([("x", "y", "bad")], ["x", "y"]).tolist() == [[0, 0.5], [0.5, 0]]


def test_swapping_a_and_b_changes_nothing():
    battles = record(12, 5, ties=3) + record(4, 9, a="y", b="z") + record(7, 7, a="z", b="x")
    swapped = [(b, a, {"A": "B", "B": "A"}.get(outcome, outcome)) for a, b, outcome in battles]
    one, two = ranking.leaderboard(battles, rounds=30), ranking.leaderboard(swapped[::-1], rounds=30)
    for s, t in zip(one.standings, two.standings):
        assert s.name == t.name
        assert s.rating == pytest.approx(t.rating, abs=1e-6)
        assert s.win_rate == t.win_rate
    np.testing.assert_allclose(one.win_rates, two.win_rates)


def test_one_sided_records_stay_finite():
    board = ranking.leaderboard(record(10, 0), rounds=20)
    ratings = [s.rating for s in board.standings]
    assert all(math.isfinite(r) for r in ratings + [s.low for s in board.standings] + [s.high for s in board.standings])
    assert 500 < ratings[0] - ratings[1] < 3000


def test_adapters_need_a_minimum_of_battles():
    battles = record(6, 4) + record(1, 1, a="x", b="new")
    board = ranking.leaderboard(battles, min_battles=5, rounds=10)
    assert [s.name for s in board.standings] == ["x", "y"]
    assert board.unranked == {"new": 2}
    assert ranking.leaderboard(record(1, 1), min_battles=5).standings == []
    with pytest.raises(ValueError, match="outcome"):
        ranking.win_matrix([("x", "y", "C")], ["x", "y"])


def test_the_win_matrix_follows_the_standings():
    board = ranking.leaderboard(record(8, 2) + record(3, 6, a="y", b="z"), min_battles=1, rounds=10)
    assert board.names == [s.name for s in board.standings]
    rates = dict(zip(board.names, board.win_rates))
    assert rates["x"][board.names.index("y")] == pytest.approx(0.8)
    assert math.isnan(rates["x"][board.names.index("z")])  # never met


def test_the_bootstrap_is_seeded():
    battles = record(14, 9, ties=2) + record(5, 8, a="y", b="z")
    assert ranking.bootstrap(battles, ["x", "y", "z"], rounds=20, seed=3)[0].tolist() == \
        ranking.bootstrap(battles, ["x", "y", "z"], rounds=20, seed=3)[0].tolist()
    assert ranking.bootstrap(battles, ["x", "y", "z"], rounds=20, seed=3)[0].tolist() != \
        ranking.bootstrap(battles, ["x", "y", "z"], rounds=20, seed=4)[0].tolist()


def test_bootstrap_intervals_cover_the_truth():
    """50 simulated leagues of four adapters with known strengths: ≥ 90% of the 95% intervals hold the truth."""
    truth = np.array([0.0, 0.4, -0.3, 0.8])
    names = ["a", "b", "c", "d"]
    want = ranking.to_points(truth - truth.mean())
    rng = np.random.default_rng(1)
    hits = 0
    for league in range(50):
        battles = []
        for _ in range(150):
            i, j = rng.choice(4, 2, replace=False)
            beats = rng.random() < 1 / (1 + math.exp(truth[j] - truth[i]))
            battles.append((names[i], names[j], "A" if beats else "B"))
        low, high = ranking.bootstrap(battles, names, rounds=50, seed=league)
        hits += int(((low <= want) & (want <= high)).sum())
    assert hits / (50 * 4) >= 0.90
