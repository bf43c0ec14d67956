"""One merge's layers as padded regressions in the pair's full coordinates.

:mod:`pleas_jax.pair_least_squares` takes a pair's sums once, in full
coordinates (``F = [A's n | B's n]`` per grouped axis). For a given merge
(blocks from any matching and ratios), this module builds, on the host, what
its compiled kernels need per layer: the selection ``S`` that maps full
coordinates to the merged channels (row and column indices with weights), the
partial merge's weights W0, and per output block either its own allowed rows
and columns (closed form) or masks of them (gradient mode), all padded to a
few sizes so that the kernels compile for few shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from pleas_jax.ls_layers import Layer, matrix_mask, weights_of
from pleas_jax.partial import GroupBlocks


def _axis_selection(group: str | None, blocks: Mapping[str, GroupBlocks], n: int):
    """Full-coordinate sources of each merged channel of one axis.

    Returns ``(ia, ib, wa, wb)``, each ``[width]``: channel j is
    ``wa[j] * F[ia[j]] + wb[j] * F[ib[j]]``, and ``(m, a, b)`` splits.
    """
    if group is None:
        idx = np.arange(n)
        return (idx, idx, np.ones(n), np.zeros(n)), (n, 0, 0)
    bl = blocks[group]
    m, a, b = bl.sizes
    ia = np.concatenate([bl.merged_a, bl.only_a, n + np.asarray(bl.only_b)]).astype(np.int64)
    ib = np.concatenate([n + np.asarray(bl.merged_b), bl.only_a, n + np.asarray(bl.only_b)])
    wa = np.concatenate([np.full(m, 0.5), np.ones(a + b)])
    wb = np.concatenate([np.full(m, 0.5), np.zeros(a + b)])
    return (ia, ib.astype(np.int64), wa, wb), (m, a, b)


def _rows(sel, taps: int, bias: bool, full_dim: int, pad_to: int):
    """Channel selection expanded to patch rows (channel-major), the bias row
    right after them, padded with weight-0 rows to ``pad_to``."""
    ia, ib, wa, wb = sel
    t = np.arange(taps)
    out = [
        (ia[:, None] * taps + t).ravel(),
        (ib[:, None] * taps + t).ravel(),
        np.repeat(wa, taps),
        np.repeat(wb, taps),
    ]
    if bias:
        out = [
            np.append(out[0], full_dim - 1),
            np.append(out[1], full_dim - 1),
            np.append(out[2], 1.0),
            np.append(out[3], 0.0),
        ]
    n = len(out[0])
    return [
        np.pad(v, (0, pad_to - n)).astype(np.int32 if i < 2 else np.float32)
        for i, v in enumerate(out)
    ], n


def _allowed(layer: Layer, dp: int, kp: int):
    """Per output block (merged, A-only, B-only): allowed rows ``[3, dp]`` and
    member columns ``[3, kp]``, zero-padded."""
    mask = matrix_mask(layer)
    mo, ao, bo = layer.out_splits
    rows = np.zeros((3, dp), np.float32)
    cols = np.zeros((3, kp), np.float32)
    for k, (lo, n) in enumerate(((0, mo), (mo, ao), (mo + ao, bo))):
        if n:
            rows[k, : layer.dim] = mask[:, lo]
            cols[k, lo : lo + n] = 1.0
    return rows, cols


def _block_selections(layer: Layer, full: Layer) -> tuple[dict[str, np.ndarray], ...]:
    """Per non-empty output block (merged, A-only, B-only): its allowed rows
    ``r`` and its columns ``c`` in the layer's matrix, each padded (index 0,
    validity ``rv``/``cv`` 0) to a bucket of the full size, so a block solves
    at about its own size rather than the whole layer's."""
    mask = matrix_mask(layer)
    mo, ao, bo = layer.out_splits
    out = []
    for lo, n in ((0, mo), (mo, ao), (mo + ao, bo)):
        rows = np.flatnonzero(mask[:, lo]) if n else np.zeros(0, np.int64)
        if not n or not len(rows):
            continue  # no outputs, or outputs no input may feed: they stay 0
        rp, cp = _bucket(len(rows), full.dim), _bucket(n, full.c_out)
        out.append(
            {
                "r": np.pad(rows, (0, rp - len(rows))).astype(np.int32),
                "rv": np.pad(np.ones(len(rows), np.float32), (0, rp - len(rows))),
                "c": np.pad(np.arange(lo, lo + n), (0, cp - n)).astype(np.int32),
                "cv": np.pad(np.ones(n, np.float32), (0, cp - n)),
            }
        )
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """One merged layer's padded regression: arrays for the compiled kernels."""

    layer: Layer
    args: dict[str, Any]


def _source_units(full: Layer) -> tuple[int, int]:
    """Units of each source model on the layer's input and output axes."""
    n_in = full.c_in if full.in_group is None else full.c_in // 2
    n_out = full.c_out if full.out_group is None else full.c_out // 2
    return n_in, n_out


# Host-side twins of least_squares.weights_to_matrix / matrix_to_weights: as
# eager jnp ops they would compile once per layer shape and budget.
def _to_matrix(layer: Layer, w: Mapping[str, Any]) -> np.ndarray:
    k = np.asarray(w["kernel"], np.float32)
    m = np.moveaxis(k, -2, 0).reshape(layer.c_in * layer.taps, layer.c_out)
    if layer.bias:
        m = np.concatenate([m, np.asarray(w["bias"], np.float32)[None]], axis=0)
    return m


def _from_matrix(layer: Layer, m: np.ndarray) -> dict[str, np.ndarray]:
    n = layer.c_in * layer.taps
    out = {"kernel": np.moveaxis(m[:n].reshape(layer.c_in, *layer.kernel_size, layer.c_out), 0, -2)}
    if layer.bias:
        out["bias"] = m[n]
    return out


# At most this many padded shapes per layer; why eighths, with timings: the
# docstring of pleas_jax.pair_least_squares.
_BUCKETS = 8


def _bucket(n: int, full: int, buckets: int = _BUCKETS) -> int:
    """``n`` rounded up to a multiple of ``ceil(full / buckets)``, at most ``full``."""
    step = -(-full // buckets)
    return min(full, -(-n // step) * step)


def _problem(
    name: str, full: Layer, blocks: Mapping[str, GroupBlocks], merged_variables, mode: str
):
    """This merge's layer and its padded arrays: row and column selections,
    W0, and per output block either its own rows and columns (closed form) or
    masks of its allowed rows and member columns (gradient mode)."""
    n_in, n_out = _source_units(full)
    sel_in, in_splits = _axis_selection(full.in_group, blocks, n_in)
    sel_out, out_splits = _axis_selection(full.out_group, blocks, n_out)
    layer = dataclasses.replace(full, in_splits=in_splits, out_splits=out_splits)
    w0 = weights_of(merged_variables, {name: layer})[name]
    # The gradient mode compiles one scan over every layer: padded to the full
    # size it compiles once for a whole grid of budgets.
    buckets = 1 if mode == "gd" else _BUCKETS
    dp, kp = _bucket(layer.dim, full.dim, buckets), _bucket(layer.c_out, full.c_out, buckets)
    rows, _ = _rows(sel_in, full.taps, full.bias, full.dim, dp)
    cols, _ = _rows(sel_out, 1, False, full.c_out, kp)
    init = np.zeros((dp, kp), np.float32)
    # Forbidden entries of W0 are zero by construction; masking keeps a
    # hand-made W0 consistent with the masked solution.
    init[: layer.dim, : layer.c_out] = _to_matrix(layer, w0) * matrix_mask(layer)
    args = {"rows": rows, "cols": cols, "init": init}
    if mode == "gd":
        args["allowed"], args["members"] = _allowed(layer, dp, kp)
    else:
        args["blocks"] = _block_selections(layer, full)
    return _Problem(layer, args)
