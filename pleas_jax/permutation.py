"""Permutations of a model's hidden units, one index array per group of a spec.

A permutation is ``{group key: int array of length size}``. Applying it takes,
for every ``(path, axis)`` of group ``g``, ``jnp.take(leaf, perm[g], axis)``:
new unit ``i`` is old unit ``perm[g][i]``. After matching model B to model A,
``apply_permutation(variables_b, spec, perm)`` aligns B with A, and A's unit
``i`` is matched with B's unit ``perm[g][i]``.

Every function is pure and works on numpy arrays, jax arrays and tracers, so it
can run inside ``jax.jit`` with the index arrays as traced arguments.

Example (run by ``tests/test_docstrings.py``):

>>> import jax, jax.numpy as jnp, numpy as np
>>> from pleas_jax import models, derive_spec
>>> model = models.resnet("resnet20", num_classes=10, width=4)
>>> x = jnp.ones((2, 8, 8, 3))
>>> variables = model.init(jax.random.key(0), x)
>>> spec = derive_spec(model, variables, x[:1])
>>> perm = random(spec, seed=0)
>>> permuted = apply_permutation(variables, spec, perm)
>>> bool(jnp.allclose(model.apply(permuted, x), model.apply(variables, x), atol=1e-5))
True
>>> back = apply_permutation(permuted, spec, invert(perm))
>>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)))
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.tree import flatten, path_str, unflatten

if TYPE_CHECKING:
    from pleas_jax.spec import Group

Permutation = dict[str, Any]  # group key -> int index array [size]

__all__ = ["Permutation", "apply_permutation", "compose", "identity", "invert", "random"]


def _xp(a):
    return jnp if isinstance(a, jax.Array) else np


def identity(spec: Mapping[str, Group]) -> Permutation:
    """``{g: arange(size)}`` (numpy) for every group."""
    return {k: np.arange(g.size) for k, g in spec.items()}


def random(spec: Mapping[str, Group], seed: int | jax.Array = 0) -> Permutation:
    """A uniformly random permutation per group.

    Args:
      spec: the groups.
      seed: an int (numpy arrays come back, drawn in spec order) or a jax PRNG
        key (jax arrays come back, one folded-in key per group position).
    """
    if isinstance(seed, jax.Array):
        return {
            k: jax.random.permutation(jax.random.fold_in(seed, i), g.size)
            for i, (k, g) in enumerate(spec.items())
        }
    rng = np.random.default_rng(seed)
    return {k: rng.permutation(g.size) for k, g in spec.items()}


def invert(perm: Mapping[str, Any]) -> Permutation:
    """The inverse: ``compose(perm, invert(perm))`` is the identity, per group."""
    return {k: _xp(p).argsort(p) for k, p in perm.items()}


def compose(p: Mapping[str, Any], q: Mapping[str, Any]) -> Permutation:
    """The permutation that applies ``q`` first, then ``p``.

    ``apply_permutation(apply_permutation(v, spec, q), spec, p)
    == apply_permutation(v, spec, compose(p, q))``; per group that is ``q[p]``.
    A group in only one of them is taken as is (the other is the identity there).
    """
    out: Permutation = {}
    for k in dict.fromkeys([*p, *q]):
        if k in p and k in q:
            out[k] = q[k][p[k]]
        else:
            out[k] = p[k] if k in p else q[k]
    return out


def apply_permutation(
    variables: Mapping[str, Any],
    spec: Mapping[str, Group],
    perm: Mapping[str, Any],
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Permute every axis of every group of ``spec`` in a variables pytree.

    Args:
      variables: nested mappings, e.g. ``{"params": ..., "batch_stats": ...}``.
      spec: the groups to permute; ``perm`` must hold each of them (extra
        entries of ``perm`` are ignored, so a sub-spec permutes a subset).
      perm: ``{key: int array [size]}``, numpy, jax or traced.
      strict: raise on a spec path missing from ``variables``; with ``False``
        such paths are skipped (e.g. to permute only ``{"batch_stats": ...}``).

    Returns:
      Plain nested dicts of the same structure; leaves outside the spec are the
      same objects as in ``variables``. A numpy leaf permuted by a numpy index
      stays numpy; anything else becomes a jax array.
    """
    flat = flatten(variables)
    for key, group in spec.items():
        if key not in perm:
            raise KeyError(f"the permutation has no entry for group {key!r}")
        index = perm[key]
        if np.shape(index) != (group.size,):
            raise ValueError(
                f"group {key!r} has size {group.size}, its permutation has shape {np.shape(index)}"
            )
        for path, axis in group.axes:
            if path not in flat:
                if strict:
                    raise KeyError(f"group {key!r}: {path_str(path)} is not in the variables")
                continue
            leaf = flat[path]
            # Host arrays stay on the host (exact, no per-shape compilation).
            host = isinstance(leaf, np.ndarray) and isinstance(index, np.ndarray)
            flat[path] = (np if host else jnp).take(leaf, index, axis=axis)
    return unflatten(flat)
