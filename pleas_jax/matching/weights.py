"""Weight matching (Git Re-Basin): align B's units with A's from weights alone.

For a group g, the score of A's unit i against B's unit j is the inner product
of everything the two units own: the slices at index i (in A) and j (in B) of
every tensor axis in the group, with B's *other* axes already moved by the
current permutations of their groups. Coordinate descent re-solves one group at
a time, in a seeded random order, until a whole sweep improves nothing.

Scores are kept in B's original coordinates: ``costs[g][i, j]`` compares A's
unit i with B's unit j as stored in B, so ``costs[g][i, perm[g][i]]`` is the
score of the pair that was matched.

Example: B is A with every group's units shuffled; matching finds the shuffle
(run by ``tests/test_docstrings.py``).

>>> import jax, jax.numpy as jnp, numpy as np
>>> from pleas_jax import models, derive_spec, apply_permutation, invert, permutation
>>> model = models.resnet("resnet20", num_classes=10, width=4)
>>> x = jnp.zeros((1, 8, 8, 3))
>>> variables_a = model.init(jax.random.key(0), x)
>>> spec = derive_spec(model, variables_a, x)
>>> shuffle = permutation.random(spec, seed=1)
>>> variables_b = apply_permutation(variables_a, spec, shuffle)
>>> perm, costs = weight_matching(spec, variables_a, variables_b)
>>> all(np.array_equal(perm[g], invert(shuffle)[g]) for g in spec)
True
>>> aligned = apply_permutation(variables_b, spec, perm)   # B's units in A's order
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.matching import lap
from pleas_jax.tree import check_same_structure, flatten, path_str


def _leaf_axes(spec) -> dict[tuple, dict[int, str]]:
    """path -> {axis: group} over every grouped axis of the spec."""
    axes: dict[tuple, dict[int, str]] = defaultdict(dict)
    for g, group in spec.items():
        for path, axis in group.axes:
            axes[tuple(path)][axis] = g
    return axes


@functools.partial(jax.jit, static_argnames=("axis", "other_axes"))
def _contribution(a, b, perms, *, axis, other_axes):
    """One tensor's share of its group's scores, ``[n, n]`` float32: A's slices
    along ``axis`` against B's, B's ``other_axes`` moved by ``perms``."""
    for ax, p in zip(other_axes, perms, strict=True):
        b = jnp.take(b, p, axis=ax)
    n = a.shape[axis]
    a2 = jnp.moveaxis(a, axis, 0).reshape(n, -1).astype(jnp.float32)
    b2 = jnp.moveaxis(b, axis, 0).reshape(n, -1).astype(jnp.float32)
    return jnp.matmul(a2, b2.T, precision=jax.lax.Precision.HIGHEST)


class _GroupScores:
    """A group's scores as the sum of its tensors' contributions, each kept
    until a permutation it reads changes.

    A sweep re-solves a group after any neighbour moved, but the move usually
    touches one of its tensors (one block's conv): recomputing only that one
    saves most of the cost on a CPU, where the widest groups' products take
    seconds.
    """

    def __init__(self, group, leaf_axes, collections, flat_a, flat_b):
        self.entries = []
        for path, axis in group.axes:
            path = tuple(path)
            if path[0] not in collections:
                continue
            others = tuple((ax, og) for ax, og in leaf_axes[path].items() if ax != axis)
            self.entries.append((flat_a[path], flat_b[path], axis, others))
        self.needed = sorted({og for *_, others in self.entries for _, og in others})
        self.cache: dict[int, tuple[tuple, jax.Array]] = {}
        self.size = group.size

    def __call__(self, perm, version) -> np.ndarray:
        total = jnp.zeros((self.size, self.size), jnp.float32)
        for k, (a, b, axis, others) in enumerate(self.entries):
            seen = tuple(version[og] for _, og in others)
            hit = self.cache.get(k)
            if hit is None or hit[0] != seen:
                value = _contribution(
                    a,
                    b,
                    tuple(perm[og] for _, og in others),
                    axis=axis,
                    other_axes=tuple(ax for ax, _ in others),
                )
                hit = self.cache[k] = (seen, value)
            total = total + hit[1]
        return np.asarray(total, np.float64)


def _after(deps, fn, *args):
    for d in deps:
        d.result()  # re-raises a failed step's error
    return fn(*args)


def weight_matching(
    spec: Mapping[str, Any],
    variables_a: Mapping[str, Any],
    variables_b: Mapping[str, Any],
    max_iter: int = 100,
    seed: int = 0,
    *,
    solver: lap.Solver | None = None,
    collections: tuple[str, ...] = ("params",),
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Permutations of B's groups that maximise the weight inner product with A.

    Args:
      spec: permutation spec (group key -> ``Group(size, axes)``).
      variables_a, variables_b: variables pytrees of the same structure.
      max_iter: most coordinate-descent sweeps over all groups.
      seed: seeds the random group order of every sweep.
      solver: linear assignment solver (:func:`pleas_jax.matching.lap.scipy_solver`);
        with ``threads > 1`` it is called from several threads at once.
      collections: which variable collections contribute to the scores.
      threads: most groups solved at once (groups sharing no tensor are
        independent within a sweep); default: the CPU count, at most 8. The
        result does not depend on it.

    Returns:
      ``(perm, costs)``: ``perm[g]`` int64 ``[n_g]`` (A's unit i is matched with
      B's unit ``perm[g][i]``; apply it to B to align B with A) and ``costs[g]``
      float64 ``[n_g, n_g]`` in B's original coordinates.
    """
    check_same_structure(variables_a, variables_b)
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    workers = lap.thread_count(threads)
    flat_a, flat_b = flatten(variables_a), flatten(variables_b)
    leaf_axes = _leaf_axes(spec)
    for path in leaf_axes:
        if path not in flat_a:
            raise ValueError(f"the spec names {path_str(path)}, which the variables lack")

    fns = {
        g: _GroupScores(group, leaf_axes, collections, flat_a, flat_b) for g, group in spec.items()
    }
    perm = {g: np.arange(group.size) for g, group in spec.items()}
    version = dict.fromkeys(spec, 0)

    def scores(g):
        return fns[g](perm, version)

    rng = np.random.default_rng(seed)
    groups = list(spec)
    # A group's scores depend only on the permutations of the groups it
    # shares a tensor with. If none has changed since the group was last
    # solved, its scores are the same and re-solving cannot gain (the
    # assignment is exact), so it is skipped: late sweeps touch only the
    # neighbourhood of what still moves. On a resnet50 pair this cut the
    # assignments from 925 to 323 (the widest group's, ~0.1 s each on a
    # CPU, are most of weight matching's time on a GPU host).
    solved_at: dict[str, tuple] = {}

    def step(g) -> bool:
        seen = tuple(version[og] for og in fns[g].needed)
        if solved_at.get(g) == seen:
            return False
        solved_at[g] = seen
        s = scores(g)
        new = lap.solve(s, solver, name=g)
        rows = np.arange(len(new))
        now = s[rows, perm[g]].sum()
        gain = s[rows, new].sum() - now
        # Relative tolerance (float32 scores may tie up to rounding), and only
        # relative: weights of any scale must match alike.
        if gain > 1e-9 * max(abs(now), len(new) * float(np.abs(s).max())):
            perm[g] = new
            version[g] += 1
            return True
        return False

    # Groups that share no tensor are solved concurrently (the assignments
    # release the GIL), each after the groups before it in the sweep's order
    # that it shares a tensor with: a step reads and writes only its own and
    # its neighbours' permutations, and neighbourhood is symmetric, so every
    # step sees what the sequential sweep would and the result is the same.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in range(max_iter):
            last: dict[str, concurrent.futures.Future] = {}
            sweep = []
            for i in rng.permutation(len(groups)):
                g = groups[i]
                deps = [last[h] for h in (g, *fns[g].needed) if h in last]
                last[g] = pool.submit(_after, deps, step, g)
                sweep.append(last[g])
            if not any([f.result() for f in sweep]):
                break
    return perm, {g: scores(g) for g in groups}
