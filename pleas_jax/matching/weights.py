"""Weight matching (Git Re-Basin): align B's units with A's from weights alone.

For a group g, the score of A's unit i against B's unit j is the inner product
of everything the two units own: the slices at index i (in A) and j (in B) of
every tensor axis in the group, with B's *other* axes already moved by the
current permutations of their groups. Coordinate descent re-solves one group at
a time, in a seeded random order, until a whole sweep improves nothing.

Scores are kept in B's original coordinates: ``costs[g][i, j]`` compares A's
unit i with B's unit j as stored in B, so ``costs[g][i, perm[g][i]]`` is the
score of the pair that was matched.
"""

from __future__ import annotations

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


def _group_cost_fn(g: str, group, leaf_axes, collections):
    """A jitted ``(leaves_a, leaves_b, perms) -> scores [n, n]`` for group ``g``."""
    entries = []
    for path, axis in group.axes:
        path = tuple(path)
        if path[0] not in collections:
            continue
        others = tuple((ax, og) for ax, og in leaf_axes[path].items() if ax != axis)
        entries.append((path, axis, others))
    n = group.size

    @jax.jit
    def cost(leaves_a, leaves_b, perms):
        total = jnp.zeros((n, n), jnp.float32)
        for (_, axis, others), a, b in zip(entries, leaves_a, leaves_b, strict=True):
            for ax, og in others:
                b = jnp.take(b, perms[og], axis=ax)
            a2 = jnp.moveaxis(a, axis, 0).reshape(n, -1).astype(jnp.float32)
            b2 = jnp.moveaxis(b, axis, 0).reshape(n, -1).astype(jnp.float32)
            total = total + jnp.matmul(a2, b2.T, precision=jax.lax.Precision.HIGHEST)
        return total

    needed = sorted({og for _, _, others in entries for _, og in others})
    return cost, [e[0] for e in entries], needed


def weight_matching(
    spec: Mapping[str, Any],
    variables_a: Mapping[str, Any],
    variables_b: Mapping[str, Any],
    max_iter: int = 100,
    seed: int = 0,
    *,
    solver: lap.Solver | None = None,
    collections: tuple[str, ...] = ("params",),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Permutations of B's groups that maximise the weight inner product with A.

    Args:
      spec: permutation spec (group key -> ``Group(size, axes)``).
      variables_a, variables_b: variables pytrees of the same structure.
      max_iter: most coordinate-descent sweeps over all groups.
      seed: seeds the random group order of every sweep.
      solver: linear assignment solver (:func:`pleas_jax.matching.lap.scipy_solver`).
      collections: which variable collections contribute to the scores.

    Returns:
      ``(perm, costs)``: ``perm[g]`` int64 ``[n_g]`` (A's unit i is matched with
      B's unit ``perm[g][i]``; apply it to B to align B with A) and ``costs[g]``
      float64 ``[n_g, n_g]`` in B's original coordinates.
    """
    check_same_structure(variables_a, variables_b)
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    flat_a, flat_b = flatten(variables_a), flatten(variables_b)
    leaf_axes = _leaf_axes(spec)
    for path in leaf_axes:
        if path not in flat_a:
            raise ValueError(f"the spec names {path_str(path)}, which the variables lack")

    fns = {}
    for g, group in spec.items():
        cost, paths, needed = _group_cost_fn(g, group, leaf_axes, collections)
        fns[g] = (cost, [flat_a[p] for p in paths], [flat_b[p] for p in paths], needed)

    perm = {g: np.arange(group.size) for g, group in spec.items()}

    def scores(g):
        cost, leaves_a, leaves_b, needed = fns[g]
        return np.asarray(cost(leaves_a, leaves_b, {og: perm[og] for og in needed}), np.float64)

    rng = np.random.default_rng(seed)
    groups = list(spec)
    for _ in range(max_iter):
        improved = False
        for i in rng.permutation(len(groups)):
            g = groups[i]
            s = scores(g)
            new = lap.solve(s, solver, name=g)
            rows = np.arange(len(new))
            gain = s[rows, new].sum() - s[rows, perm[g]].sum()
            # Relative tolerance: float32 scores may tie up to rounding.
            if gain > 1e-9 * max(1.0, abs(s[rows, perm[g]].sum())):
                perm[g] = new
                improved = True
        if not improved:
            break
    return perm, {g: scores(g) for g in groups}
