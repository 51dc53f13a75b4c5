"""Elo over random orderings: the update rule against a plain re-implementation, and its symmetries."""

import itertools

import numpy as np
import pytest

from qlora.eval.elo import elo_after_orderings, elo_table


def game(a, b, winner):
    return {"model_a": a, "model_b": b, "winner": winner}


def elo_in_order(games, initial=1000.0, k=32.0):
    """The textbook update, one game at a time, in the given order."""
    r = {}
    for g in games:
        ra, rb = r.setdefault(g["model_a"], initial), r.setdefault(g["model_b"], initial)
        ea = 1 / (1 + 10 ** ((rb - ra) / 400))
        sa = {g["model_a"]: 1.0, g["model_b"]: 0.0}.get(g["winner"], 0.5)
        r[g["model_a"]], r[g["model_b"]] = ra + k * (sa - ea), rb - k * (sa - ea)
    return r


GAMES = [game("x", "y", "x"), game("y", "z", "tie"), game("z", "x", "z"), game("x", "z", "x"), game("y", "x", "y")]


def test_every_ordering_equals_the_textbook_update():
    perms = np.array(list(itertools.permutations(range(len(GAMES)))))
    models, ratings = elo_after_orderings(GAMES, perms, initial=1000, k=32)
    for perm, row in zip(perms, ratings, strict=True):
        expected = elo_in_order([GAMES[i] for i in perm])
        assert row == pytest.approx([expected[m] for m in models], abs=1e-9)
    assert ratings.sum(axis=1) == pytest.approx(3000.0)  # zero-sum updates


def test_one_win_moves_k_over_two():
    table = elo_table([game("a", "b", "a")], orderings=10)
    assert table["a"]["elo"] == pytest.approx(1016.0) and table["b"]["elo"] == pytest.approx(984.0)
    assert list(table) == ["a", "b"] and table["a"]["wins"] == 1 and table["b"]["losses"] == 1


def test_balanced_results_average_to_equal_ratings_and_order_matters_per_ordering():
    games = [game("a", "b", "a"), game("b", "a", "b")] * 5
    table = elo_table(games, orderings=10_000, seed=1)
    # by symmetry the mean over orderings is 1000 for both; 10,000 orderings leave MC noise below 1 point
    assert table["a"]["elo"] == pytest.approx(1000.0, abs=1.0)
    lo, hi = table["a"]["ci95"]
    assert lo < 995 < 1005 < hi  # single orderings do end far apart: that is why the paper averages


def test_stronger_model_rates_higher_and_arguments_are_checked():
    games = [game("good", "bad", "good")] * 8 + [game("bad", "good", "bad")] * 2
    table = elo_table(games, orderings=2000)
    assert list(table) == ["good", "bad"] and table["good"]["elo"] > 1030
    with pytest.raises(ValueError, match="no games"):
        elo_table([])
    with pytest.raises(ValueError, match="perms must be"):
        elo_after_orderings(games, np.zeros((3, 4), dtype=int))
