"""Elo ratings from pairwise games, averaged over random orderings of the games (the paper's Table 7).

Elo updates after each game: with expected score E_a = 1 / (1 + 10^((R_b - R_a) / 400)), the
winner's actual score is 1 (tie 0.5), and R_a += K (S_a - E_a), R_b -= the same amount (zero-sum).
Unlike a fitted Bradley-Terry model the result depends on the order of the games, so the paper
plays the same set of games in many random orders and reports the mean rating (and its spread).
Defaults are the paper's, as we recall its Section 5 (not checked against the text here): initial
rating 1,000, K = 32, 10,000 random orderings.

All orderings are played at once: ratings are a [orderings, models] array and step t applies game
`perm[:, t]` of every ordering, so 10,000 orderings cost one vectorised update per game.
"""

from __future__ import annotations

import numpy as np


def _encode(games: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    models = sorted({g["model_a"] for g in games} | {g["model_b"] for g in games})
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[g["model_a"]] for g in games])
    b = np.array([index[g["model_b"]] for g in games])
    score_a = np.array([1.0 if g["winner"] == g["model_a"] else 0.0 if g["winner"] == g["model_b"] else 0.5
                        for g in games])  # fmt: skip
    return models, a, b, score_a


def elo_after_orderings(games: list[dict], perms: np.ndarray, *, initial: float = 1000.0, k: float = 32.0):
    """(models, ratings [len(perms), models]) after playing `games` in each order of `perms` [n, games]."""
    models, a, b, s = _encode(games)
    perms = np.asarray(perms)
    if perms.ndim != 2 or perms.shape[1] != len(games):
        raise ValueError(f"perms must be [orderings, {len(games)}], got {perms.shape}")
    ratings = np.full((perms.shape[0], len(models)), float(initial))
    rows = np.arange(perms.shape[0])
    for t in range(perms.shape[1]):
        g = perms[:, t]
        ra, rb = ratings[rows, a[g]], ratings[rows, b[g]]
        expected_a = 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))
        delta = k * (s[g] - expected_a)
        ratings[rows, a[g]] += delta
        ratings[rows, b[g]] -= delta
    return models, ratings


def elo_table(
    games: list[dict], *, initial: float = 1000.0, k: float = 32.0, orderings: int = 10_000, seed: int = 0
) -> dict[str, dict]:
    """{model: {elo, ci95, wins, losses, ties}} sorted by mean Elo, best first."""
    if not games:
        raise ValueError("no games to rate")
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((orderings, len(games))), axis=1)  # one uniform random order per row
    models, ratings = elo_after_orderings(games, perms, initial=initial, k=k)
    table = {}
    for i, m in enumerate(models):
        lo, hi = np.percentile(ratings[:, i], [2.5, 97.5])
        table[m] = {
            "elo": float(ratings[:, i].mean()),
            "ci95": [float(lo), float(hi)],
            "wins": sum(g["winner"] == m for g in games),
            "losses": sum(g["winner"] not in (m, "tie") and m in (g["model_a"], g["model_b"]) for g in games),
            "ties": sum(g["winner"] == "tie" and m in (g["model_a"], g["model_b"]) for g in games),
        }
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["elo"]))


def format_elo_table(table: dict[str, dict]) -> str:
    lines = ["| model | Elo | 95% of orderings | wins | losses | ties |", "|---|---|---|---|---|---|"]
    for m, r in table.items():
        lines.append(f"| {m} | {r['elo']:.0f} | {r['ci95'][0]:.0f}-{r['ci95'][1]:.0f} | {r['wins']} | "
                     f"{r['losses']} | {r['ties']} |")  # fmt: skip
    return "\n".join(lines)
