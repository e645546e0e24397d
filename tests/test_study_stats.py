"""The user study's statistics against values computed by hand (or published)."""

import math

import numpy as np
import pytest

from personalize.study.stats import (
    agreement,
    binomial_p_value,
    bradley_terry,
    cluster_bootstrap,
    connected,
    wilson,
    win_rate,
)


@pytest.mark.parametrize("k,n,expected", [
    # By hand with z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width
    # z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n). 8 of 10: centre 0.71674, half 0.22658.
    (8, 10, (0.4902, 0.9433)),
    (5, 10, (0.2366, 0.7634)),
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (50, 100, (0.4038, 0.5962)),
    (1, 1, (0.2065, 1.0)),
])
def test_wilson_on_known_counts(k, n, expected):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(expected[0], abs=5e-5) and hi == pytest.approx(expected[1], abs=5e-5)


def test_wilson_without_answers_is_undefined():
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_win_rate_counts_ties_as_half():
    assert win_rate(6, 2, 2) == pytest.approx(0.7)
    assert win_rate(0, 0, 4) == 0.5
    assert math.isnan(win_rate(0, 0, 0))


def test_binomial_p_value_by_hand():
    # 9 of 10 under p = 1/2: P(X >= 9) = 11/1024, two-sided doubles it
    assert binomial_p_value(9, 10) == pytest.approx(22 / 1024)
    assert binomial_p_value(5, 10) == pytest.approx(1.0)


def test_bradley_terry_recovers_designed_strengths():
    # Counts made from strengths 4 : 2 : 1 exactly (A-B 20 of 30, B-C 20 of 30, A-C 20 of
    # 25), so these are the maximum-likelihood strengths: 4/7, 2/7, 1/7.
    wins = np.array([[0, 20, 20],
                     [10, 0, 20],
                     [5, 10, 0]])
    s = bradley_terry(wins)
    assert s == pytest.approx([4 / 7, 2 / 7, 1 / 7], rel=1e-8)


def test_bradley_terry_two_methods_is_the_win_share():
    s = bradley_terry(np.array([[0, 7], [3, 0]]))
    assert s[0] / s[1] == pytest.approx(7 / 3, rel=1e-9)


def test_bradley_terry_order_on_a_designed_tournament():
    # Every method beats every later one 7 to 3 (ties split): the order is A > B > C > D.
    n = 4
    wins = np.where(np.triu(np.ones((n, n)), 1) > 0, 7.0, 0.0)
    wins = wins + np.where(np.tril(np.ones((n, n)), -1) > 0, 3.0, 0.0)
    s = bradley_terry(wins)
    assert list(np.argsort(-s)) == [0, 1, 2, 3]
    assert s.sum() == pytest.approx(1.0)


def test_bradley_terry_prior_keeps_a_winless_method_finite_and_last():
    wins = np.array([[0, 5, 4], [0, 0, 6], [0, 0, 0.0]])    # C never wins, A never loses
    s = bradley_terry(wins, prior=0.1)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    assert list(np.argsort(-s)) == [0, 1, 2]
    lonely = bradley_terry(np.array([[0, 3, 0], [2, 0, 0], [0, 0, 0.0]]))
    assert math.isnan(lonely[2]) and lonely[0] / lonely[1] == pytest.approx(1.5)


def test_connected():
    assert connected(np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]]))
    assert not connected(np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]))


def test_cluster_bootstrap_is_deterministic_and_clustered():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, size=(30, 3))
    a = cluster_bootstrap(counts, resamples=500, seed=7)
    assert a == cluster_bootstrap(counts, resamples=500, seed=7)
    assert a != cluster_bootstrap(counts, resamples=500, seed=8)
    w, l, t = counts.sum(axis=0)
    assert a[0] < win_rate(w, l, t) < a[1]
    # One participant always picks A, another always B: 100 answers, but only two
    # independent people. Resampling people gives the honest answer: anything from 0 to 1.
    assert cluster_bootstrap([[50, 0, 0], [0, 50, 0]], resamples=2000, seed=0) == (0.0, 1.0)
    # a single participant: no spread to resample
    assert cluster_bootstrap([[3, 1, 0]], resamples=100, seed=0) == (0.75, 0.75)
    assert all(math.isnan(x) for x in cluster_bootstrap(np.zeros((0, 3))))


def test_agreement():
    assert agreement(["a", "b", None, "a"], ["a", "a", None, "b"]) == (2, 4)
