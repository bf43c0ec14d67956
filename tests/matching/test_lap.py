"""Linear assignment against brute force and against planted permutations."""

import itertools

import numpy as np
import pytest

from pleas_jax.matching import lap


def test_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.normal(size=(5, 5))
        best = max(itertools.permutations(range(5)), key=lambda p: s[np.arange(5), p].sum())
        np.testing.assert_array_equal(lap.solve(s), best)


def test_recovers_planted_permutation():
    rng = np.random.default_rng(1)
    perm = rng.permutation(64)
    s = rng.normal(scale=0.1, size=(64, 64))
    s[np.arange(64), perm] += 1.0
    np.testing.assert_array_equal(lap.solve(s), perm)


def test_pluggable_solver_is_called_and_checked():
    calls = []

    def reverse(scores):
        calls.append(scores.shape)
        return np.arange(scores.shape[0])[::-1]

    np.testing.assert_array_equal(lap.solve(np.eye(3), solver=reverse), [2, 1, 0])
    assert calls == [(3, 3)]
    with pytest.raises(ValueError, match="did not return a permutation"):
        lap.solve(np.eye(3), solver=lambda s: np.zeros(3, int))


@pytest.mark.parametrize("bad", [np.zeros((3, 4)), np.zeros(3), np.zeros((2, 2, 2))])
def test_rejects_non_square(bad):
    with pytest.raises(ValueError, match="square"):
        lap.solve(bad, name="params/conv1/kernel:3")


def test_rejects_non_finite_and_names_the_group():
    s = np.eye(4)
    s[1, 2] = np.nan
    s[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"grp: 2 non-finite"):
        lap.solve(s, name="grp")
