"""Partial merging: which units to merge, and the merged variables.

For every group, the matched pairs (A's unit i with B's unit ``perm[i]``) are
ranked by their matching score; the best ``n - n_sep`` pairs are merged and the
rest stay separate, with ``n_sep = floor(r * n + 1/2)`` for the group's ratio r
(round half up, so r = 0 merges everything and r = 1 keeps everything
separate). A merged layer's channels are ordered ``[merged | A-only | B-only]``.

Merged variables follow what each unit computes. A merged unit is the average
of its pair, so it reads ``[avg(A, B) | A / 2 | B / 2]`` of its inputs; an
A-only unit is A's unit, reading ``[A | A | 0]``; a B-only unit reads
``[B | 0 | B]``. Axes outside every group (the image channels, a shared
classifier's classes) count as merged with the identity matching. The last
axis of a tensor with two grouped axes is its output axis (Flax kernels are
``[..., C_in, C_out]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from pleas_jax.tree import flatten, path_str, unflatten


@dataclasses.dataclass(frozen=True)
class GroupBlocks:
    """The units of one group in the merged model.

    Attributes:
      merged_a: ``[n_m]`` A's units that are merged, best-aligned first.
      merged_b: ``[n_m]`` their matched B units.
      only_a: ``[n_s]`` A's units kept separate (ascending).
      only_b: ``[n_s]`` B's units kept separate (matched to ``only_a``).
    """

    merged_a: np.ndarray
    merged_b: np.ndarray
    only_a: np.ndarray
    only_b: np.ndarray

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(n_merged, n_a_only, n_b_only)``."""
        return len(self.merged_a), len(self.only_a), len(self.only_b)

    @property
    def width(self) -> int:
        """Channels of the group in the merged model."""
        return sum(self.sizes)


Blocks = dict[str, GroupBlocks]


def n_separate(size: int, ratio: float) -> int:
    """Units of each model kept separate in a group of ``size`` at ``ratio``:
    ``ratio * size`` rounded half up (``0.7 * 45 = 31.5 -> 32``; the tolerance
    keeps float error, 31.499999999999996 here, from rounding a tie down)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"a ratio must lie in [0, 1], got {ratio}")
    return int(np.floor(ratio * size + 0.5 + 1e-9))


def make_blocks(
    spec: Mapping[str, Any],
    perm: Mapping[str, Any],
    costs: Mapping[str, Any],
    ratios: Mapping[str, float] | float,
) -> Blocks:
    """Choose merged and separate units for every group.

    Args:
      spec: permutation spec (group -> ``Group``).
      perm: ``perm[g][i]`` is B's unit matched with A's unit i.
      costs: ``costs[g] [n, n]`` matching scores (higher is better) in B's
        original coordinates; ``costs[g][i, perm[g][i]]`` ranks pair i.
      ratios: per-group ratio r in [0, 1] (or one for all): the fraction of
        units kept separate.

    Returns:
      group -> :class:`GroupBlocks`.
    """
    blocks: Blocks = {}
    for g, group in spec.items():
        r = ratios.get(g) if isinstance(ratios, Mapping) else ratios
        if r is None:
            raise ValueError(f"no ratio for group {g}")
        p = np.asarray(perm[g], np.int64)
        if p.shape != (group.size,) or not np.array_equal(np.sort(p), np.arange(group.size)):
            raise ValueError(f"perm[{g}] is not a permutation of {group.size} units")
        cost = np.asarray(costs[g], np.float64)
        if cost.shape != (group.size, group.size):
            raise ValueError(
                f"costs[{g}] has shape {cost.shape}, expected {(group.size, group.size)}"
            )
        score = cost[np.arange(group.size), p]
        # Stable sort: ties keep A's order, so blocks are deterministic.
        order = np.argsort(-score, kind="stable")
        n_m = group.size - n_separate(group.size, float(r))
        merged_a = order[:n_m]
        only_a = np.sort(order[n_m:])
        blocks[g] = GroupBlocks(merged_a, p[merged_a], only_a, p[only_a])
    return blocks


def full_blocks(spec: Mapping[str, Any], perm: Mapping[str, Any], ratio: float) -> Blocks:
    """Blocks without scores: pairs in A's order (for ratio 0 or 1, any order is best)."""
    return make_blocks(
        spec, perm, {g: np.zeros((grp.size, grp.size)) for g, grp in spec.items()}, ratio
    )


def combine(xa, xb, blocks: GroupBlocks | None, axis: int = -1):
    """Features of the merged model's channels from the two source models.

    ``[avg(xa[merged_a], xb[merged_b]) | xa[only_a] | xb[only_b]]`` along
    ``axis``; with ``blocks=None`` (an axis outside every group) the average.
    Shapes: ``xa, xb [..., n, ...] -> [..., width, ...]``.
    """
    if blocks is None:
        return 0.5 * (xa + xb)
    take = lambda x, i: jnp.take(x, jnp.asarray(i), axis=axis)  # noqa: E731
    return jnp.concatenate(
        [
            0.5 * (take(xa, blocks.merged_a) + take(xb, blocks.merged_b)),
            take(xa, blocks.only_a),
            take(xb, blocks.only_b),
        ],
        axis=axis,
    )


def _axis_groups(spec) -> dict[tuple, dict[int, str]]:
    out: dict[tuple, dict[int, str]] = {}
    for g, group in spec.items():
        for path, axis in group.axes:
            out.setdefault(tuple(path), {})[axis] = g
    return out


def _merge_leaf(a: np.ndarray, b: np.ndarray, axes: dict[int, GroupBlocks]) -> np.ndarray:
    """Merge one tensor whose grouped axes are ``axes`` (axis -> blocks)."""
    if not axes:
        return 0.5 * (a + b)
    if len(axes) > 2:
        raise ValueError("a tensor with more than two grouped axes cannot be merged")
    ax_list = sorted(axes)
    # Per axis, three pieces: (A's indices, B's indices, kind m / a / b).
    pieces = {
        ax: [(bl.merged_a, bl.merged_b, "m"), (bl.only_a, None, "a"), (None, bl.only_b, "b")]
        for ax, bl in axes.items()
    }
    grid = np.empty([3] * len(axes), dtype=object)
    for idx in np.ndindex(*grid.shape):
        chosen = {ax: pieces[ax][i] for ax, i in zip(ax_list, idx, strict=True)}
        kinds = {ax: c[2] for ax, c in chosen.items()}
        ia = {ax: c[0] for ax, c in chosen.items()}
        ib = {ax: c[1] for ax, c in chosen.items()}
        kset = set(kinds.values())
        if {"a", "b"} <= kset:
            # A-only and B-only units never read each other.
            shape = list(a.shape)
            for ax in ax_list:
                shape[ax] = len(ia[ax] if ia[ax] is not None else ib[ax])
            block = np.zeros(shape, a.dtype)
        elif kset == {"m"}:
            block = 0.5 * (_take(a, ia) + _take(b, ib))
        else:
            # The output axis is the last one (a 1-D tensor's only axis); an
            # ungrouped output counts as merged. A merged output reading a
            # separate input carries half of it.
            merged_out = kinds.get(a.ndim - 1, "m") == "m"
            src, ind = (a, ia) if "a" in kset else (b, ib)
            block = (0.5 if merged_out else 1.0) * _take(src, ind)
        grid[idx] = block
    return _assemble(grid, ax_list)


def _take(x, indices: dict[int, np.ndarray]):
    for ax, i in indices.items():
        x = np.take(x, i, axis=ax)
    return x


def _assemble(grid, ax_list):
    if len(ax_list) == 1:
        return np.concatenate(list(grid), axis=ax_list[0])
    rows = [np.concatenate(list(grid[i]), axis=ax_list[1]) for i in range(3)]
    return np.concatenate(rows, axis=ax_list[0])


def merge_variables(
    spec: Mapping[str, Any],
    blocks: Blocks,
    variables_a: Mapping[str, Any],
    variables_b: Mapping[str, Any],
) -> dict[str, Any]:
    """The partially merged variables (float32 numpy leaves).

    Every leaf of ``variables_a`` appears with each grouped axis resized to its
    group's merged width; see the module docstring for the values.
    """
    axis_groups = _axis_groups(spec)
    fa, fb = flatten(variables_a), flatten(variables_b)
    out = {}
    for path, a in fa.items():
        if path not in fb:
            raise ValueError(f"{path_str(path)} exists in model A but not in model B")
        a, b = np.asarray(a), np.asarray(fb[path])
        axes = {ax: blocks[g] for ax, g in axis_groups.get(path, {}).items()}
        for ax, g in axis_groups.get(path, {}).items():
            if a.shape[ax] != b.shape[ax]:
                raise ValueError(
                    f"{path_str(path)} has {a.shape[ax]} units on axis {ax} (group {g}) in A "
                    f"but {b.shape[ax]} in B: different widths"
                )
        if not axes and a.shape != b.shape:
            raise ValueError(f"{path_str(path)} has shape {a.shape} in A but {b.shape} in B")
        out[path] = _merge_leaf(a, b, axes)
    return unflatten(out)


def layer_splits(spec: Mapping[str, Any], blocks: Blocks, variables: Mapping[str, Any]) -> tuple:
    """``(layer path, ((m, a, b) inputs, (m, a, b) outputs))`` for every
    conv/dense kernel of the merged model; an ungrouped axis is all merged."""
    axis_groups = _axis_groups(spec)
    out = []
    for path, leaf in flatten(variables).items():
        if path[0] != "params" or path[-1] != "kernel":
            continue
        nd = np.ndim(leaf)
        groups = axis_groups.get(path, {})
        sizes = []
        for ax in (nd - 2, nd - 1):
            g = groups.get(ax)
            sizes.append(blocks[g].sizes if g is not None else (int(np.shape(leaf)[ax]), 0, 0))
        out.append(("/".join(path[1:-1]), (tuple(sizes[0]), tuple(sizes[1]))))
    return tuple(out)


def partial_merge(module, spec, blocks: Blocks, variables_a, variables_b):
    """The partially merged model as ``(module, variables)``.

    ``module`` is a :class:`pleas_jax.models.ResNet`; the result has the merged
    widths and computes only the blocks that can be non-zero.
    """
    from pleas_jax.models import with_widths_of

    merged = merge_variables(spec, blocks, variables_a, variables_b)
    merged = {k: {p: jnp.asarray(v) for p, v in flatten(t).items()} for k, t in merged.items()}
    merged = {k: unflatten(t) for k, t in merged.items()}
    splits = layer_splits(spec, blocks, variables_a)
    return with_widths_of(module, merged["params"], splits), merged
