"""The statistics of the pairwise user study, as pure functions over counts.

Outcomes are from the point of view of method A of a pair (A, B): a win when A's image
was chosen, a loss when B's was, a tie for "Can't decide".

- `win_rate`: (wins + ties / 2) / answers, the study's Table 1 number.
- `wilson`: the Wilson score interval of a binomial share (Wilson 1927), used on the
  decisive answers (wins / (wins + losses)) and on the position-bias share.
- `cluster_bootstrap`: a percentile interval of the win rate that resamples whole
  participants, so a participant's answers, which are not independent, move together.
- `bradley_terry`: strengths of all methods from every pairwise count, by the MM
  algorithm of Hunter (2004), "MM algorithms for generalized Bradley-Terry models".
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest

Z95 = 1.959963984540054  # the standard normal quantile at 0.975


def win_rate(wins: float, losses: float, ties: float) -> float:
    """Ties count as half a win; nan when there are no answers."""
    n = wins + losses + ties
    return (wins + 0.5 * ties) / n if n else math.nan


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the share k / n; (nan, nan) when n is 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_p_value(k: int, n: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test of k successes in n trials; nan when n is 0."""
    if n <= 0:
        return math.nan

    return float(binomtest(int(k), int(n), p).pvalue)


def cluster_bootstrap(counts: np.ndarray, *, resamples: int = 2000, seed: int | np.random.Generator = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the win rate (ties as half) when participants are resampled
    with replacement. `counts` has one row per participant: wins, losses, ties."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 3)
    if len(counts) == 0 or counts.sum() == 0:
        return math.nan, math.nan
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    picks = rng.integers(0, len(counts), size=(resamples, len(counts)))
    totals = counts[picks].sum(axis=1)                     # (resamples, 3)
    n = totals.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = (totals[:, 0] + 0.5 * totals[:, 2]) / n    # nan where a resample drew no answers
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(rates, [tail, 100 - tail])
    return float(lo), float(hi)


def bradley_terry(wins: np.ndarray, *, prior: float = 0.0, tol: float = 1e-10,
                  max_iter: int = 100_000) -> np.ndarray:
    """Bradley-Terry strengths (P(i beats j) = s_i / (s_i + s_j)), normalised to sum 1.

    `wins[i, j]` is how often i beat j (a tie counted as half a win for each side).
    `prior` adds that many wins in each direction to every pair that met, which keeps a
    method that never won (or never lost) finite. Methods that never met anyone get nan.
    """
    w = np.array(wins, dtype=np.float64)
    np.fill_diagonal(w, 0.0)
    met = (w + w.T) > 0
    w = w + prior * met
    games = w + w.T
    active = games.sum(axis=1) > 0
    s = np.where(active, 1.0, np.nan)
    total_wins = w.sum(axis=1)
    idx = np.flatnonzero(active)
    if len(idx) == 0:
        return s
    g, tw = games[np.ix_(idx, idx)], total_wins[idx]
    x = np.ones(len(idx))
    for _ in range(max_iter):
        denom = (g / (x[:, None] + x[None, :])).sum(axis=1)
        new = tw / denom
        new = new / new.sum()
        done = np.max(np.abs(new - x) / np.maximum(x, 1e-300)) < tol
        x = new
        if done:
            break
    s[idx] = x
    return s


def connected(met: np.ndarray) -> bool:
    """Whether the methods that met anyone form one comparison graph (otherwise their
    Bradley-Terry strengths are on separate, incomparable scales)."""
    met = np.asarray(met, dtype=bool)
    met = met | met.T
    nodes = np.flatnonzero(met.any(axis=1))
    if len(nodes) == 0:
        return True
    seen, stack = {int(nodes[0])}, [int(nodes[0])]
    while stack:
        i = stack.pop()
        for j in np.flatnonzero(met[i]):
            if int(j) not in seen:
                seen.add(int(j))
                stack.append(int(j))
    return len(seen) == len(nodes)


def agreement(first: list, second: list) -> tuple[int, int]:
    """Self-consistency: how many of the paired outcomes are equal, out of how many."""
    pairs = list(zip(first, second))
    return sum(a == b for a, b in pairs), len(pairs)
