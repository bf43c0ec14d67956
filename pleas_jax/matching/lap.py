"""Linear assignment: the one host-side step of permutation matching.

A solver is any callable ``solver(scores [n, n]) -> perm [n]`` that returns the
permutation maximising ``sum_i scores[i, perm[i]]``. :func:`solve` validates
the input and calls the solver, so a GPU or approximate solver can be plugged in
without repeating the checks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.optimize

Solver = Callable[[np.ndarray], np.ndarray]


def scipy_solver(scores: np.ndarray) -> np.ndarray:
    """Exact maximising assignment with scipy's Jonker-Volgenant solver."""
    rows, cols = scipy.optimize.linear_sum_assignment(scores, maximize=True)
    perm = np.empty(scores.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def solve(scores, solver: Solver | None = None, *, name: str = "scores") -> np.ndarray:
    """Permutation maximising ``sum_i scores[i, perm[i]]``.

    Args:
      scores: ``[n, n]`` finite array (anything ``np.asarray`` takes).
      solver: a :data:`Solver`; :func:`scipy_solver` by default.
      name: how errors refer to the matrix (e.g. the group key).

    Returns:
      ``perm`` of shape ``[n]``, int64, a permutation of ``range(n)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{name}: linear assignment needs a square matrix, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        bad = int(np.size(scores) - np.count_nonzero(np.isfinite(scores)))
        raise ValueError(f"{name}: {bad} non-finite entries (NaN or inf) in the assignment scores")
    perm = np.asarray((solver or scipy_solver)(scores))
    n = scores.shape[0]
    if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
        raise ValueError(f"{name}: the solver did not return a permutation of {n} elements")
    return perm.astype(np.int64)
