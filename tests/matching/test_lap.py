"""Linear assignment against brute force and against planted permutations."""

import itertools

import numpy as np
import pytest
import scipy.optimize

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


def _structured(rng, n, noise=0.05):
    """Scores dominated by row/column offsets and a positive rank-1 product (as
    BatchNorm scales give weight matching), plus noise."""
    u, v = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, n)
    return (
        np.outer(u, v)
        + rng.normal(size=(n, 1))
        + rng.normal(size=(1, n))
        + noise * rng.normal(size=(n, n))
    )


def _total(s, perm):
    return s[np.arange(len(perm)), perm].sum()


def test_structured_scores_match_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(20):
        s = _structured(rng, 6)
        best = max(itertools.permutations(range(6)), key=lambda p: _total(s, p))
        np.testing.assert_array_equal(lap.solve(s), best)


@pytest.mark.parametrize("kind", ["structured", "uniform", "constant"])
def test_reduced_costs_shift_every_permutation_by_one_constant(kind):
    rng = np.random.default_rng(3)
    n = 50
    s = {
        "structured": _structured(rng, n),
        "uniform": rng.uniform(size=(n, n)),
        "constant": np.full((n, n), 2.5),
    }[kind]
    c = lap.reduced_costs(s)
    # Maximising s is minimising c: score + cost is the same for every permutation.
    sums = [_total(s, p) + _total(c, p) for p in (rng.permutation(n) for _ in range(50))]
    np.testing.assert_allclose(sums, sums[0], rtol=0, atol=1e-9 * np.abs(s).sum())
    assert np.all(c >= 0) and np.all(c.min(axis=0) == 0)


def test_same_optimum_as_plain_scipy_on_wide_structured_scores():
    """Second implementation: scipy on the untransformed matrix."""
    rng = np.random.default_rng(4)
    for n in (300, 700):
        s = _structured(rng, n, noise=0.01)
        rows, cols = scipy.optimize.linear_sum_assignment(s, maximize=True)
        plain = _total(s, cols[np.argsort(rows)])
        np.testing.assert_allclose(_total(s, lap.solve(s)), plain, rtol=1e-12)


def test_empty_and_single_unit_problems():
    np.testing.assert_array_equal(lap.solve(np.zeros((0, 0))), np.zeros(0, np.int64))
    np.testing.assert_array_equal(lap.solve(np.array([[3.0]])), [0])


def test_solve_all_equals_one_by_one():
    rng = np.random.default_rng(5)
    scores = {f"g{n}": _structured(rng, n) for n in (3, 40, 200, 90, 1)}
    one_by_one = {g: lap.solve(s, name=g) for g, s in scores.items()}
    for threads in (1, 4, None):
        out = lap.solve_all(scores, threads=threads)
        assert list(out) == list(scores)
        for g in scores:
            np.testing.assert_array_equal(out[g], one_by_one[g])
    with pytest.raises(ValueError, match="threads"):
        lap.solve_all(scores, threads=0)
    bad = {**scores, "nan": np.full((2, 2), np.nan)}
    with pytest.raises(ValueError, match="nan: 4 non-finite"):
        lap.solve_all(bad, threads=2)


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
