"""Memory of the least-squares statistics: the bound, the chunks, the estimate.

Every layer's statistics (:func:`pleas_jax.ls_layers.statistics_bytes`) can
together exceed a device. A bound on one chunk's sums splits the layers, in
forward order, into chunks that take one pass over the data each
(:func:`memory_chunks`, :func:`memory_report`; used by
:func:`pleas_jax.ls_statistics.layer_statistics` and
:func:`pleas_jax.least_squares.least_squares`); :func:`statistics_memory`
gives the same numbers per budget from shapes alone, without running the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.ls_layers import Layer, find_layers, statistics_bytes
from pleas_jax.partial import GroupBlocks

# ------------------------------------------------------------- memory bound
# The bound is on one chunk's running sums. While a batch is added, its own
# sums for the chunk are live too, so a pass peaks at about twice the chunk,
# plus the two models' activations and recorded features for one batch.
# Per-merge statistics at 224 px take 2.95 GiB for a budget-2.0 ResNet-50 and
# 5.43 GiB for a ResNet-101 (pair statistics: 2.65 and 4.85 GiB; see
# :func:`statistics_memory`). A 6 GiB bound keeps both in one pass (as fast as
# without a bound) at a peak of ~11 GiB, leaving ~5 GiB of a 16 GB device for
# the models and activations; a 12 GiB bound would let a larger model's pass
# peak at ~24 GiB. Larger models, widths or images take several passes.
DEFAULT_MAX_MEMORY_BYTES = 6 << 30


class StatisticsOverBound(ValueError):
    """One layer's statistics alone exceed the memory bound.

    Attributes: ``layer`` (its name), ``nbytes`` (its statistics' bytes),
    ``bound`` (the bound).
    """

    def __init__(self, layer: str, nbytes: int, bound: int):
        super().__init__(
            f"layer {layer}: its least-squares statistics take {nbytes} bytes, over "
            f"max_memory_bytes={bound}; fit it by gradient descent or raise the bound"
        )
        self.layer, self.nbytes, self.bound = layer, nbytes, bound


def _chunk_sizes(sizes: Sequence[int], bound: int | None) -> list[list[int]]:
    """Greedy consecutive partition of ``sizes`` into runs summing to at most
    ``bound`` (the fewest runs for consecutive ones); an item over the bound
    is a run of its own. Returns item indices per run."""
    runs: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if runs and (bound is None or total + n <= bound):
            runs[-1].append(i)
            total += n
        else:
            runs.append([i])
            total = n
    return runs


def memory_chunks(
    layers: Mapping[str, Layer],
    max_memory_bytes: int | None,
    *,
    init: bool = True,
    target_gram: bool = False,
) -> list[list[str]]:
    """Split layers, in their order, into consecutive chunks whose statistics
    fit ``max_memory_bytes`` (:func:`pleas_jax.ls_layers.statistics_bytes`; ``None``: one chunk).

    Returns layer names per chunk (no chunk for no layers).

    Raises:
      StatisticsOverBound: a layer alone exceeds the bound.
    """
    names = list(layers)
    sizes = [statistics_bytes(layers[n], init=init, target_gram=target_gram) for n in names]
    if max_memory_bytes is not None:
        if max_memory_bytes <= 0:
            raise ValueError(f"max_memory_bytes must be positive or None, got {max_memory_bytes}")
        for n, b in zip(names, sizes, strict=True):
            if b > max_memory_bytes:
                raise StatisticsOverBound(n, b, int(max_memory_bytes))
    return [[names[i] for i in run] for run in _chunk_sizes(sizes, max_memory_bytes)]


def memory_report(
    layers: Mapping[str, Layer],
    chunks: Sequence[Sequence[str]],
    max_memory_bytes: int | None,
    *,
    init: bool = True,
    target_gram: bool = False,
) -> dict[str, Any]:
    """What a chunked statistics pass holds: ``{"chunks", "passes",
    "peak_statistics_bytes" (the largest chunk), "total_statistics_bytes",
    "chunk_bytes": [per chunk], "bound"}``."""
    per = [
        sum(statistics_bytes(layers[n], init=init, target_gram=target_gram) for n in c)
        for c in chunks
    ]
    return {
        "chunks": len(chunks),
        "passes": len(chunks),
        "peak_statistics_bytes": max(per, default=0),
        "total_statistics_bytes": sum(per),
        "chunk_bytes": per,
        "bound": max_memory_bytes,
    }


def _one_shot_error(what: str, n_chunks: int, total: int, bound: int | None) -> ValueError:
    return ValueError(
        f"{what}: the statistics ({total} bytes) exceed max_memory_bytes={bound} and take "
        f"{n_chunks} passes over the data, which a one-shot iterator cannot give; pass the "
        "batches as a list or as a callable returning a fresh iterator, or raise max_memory_bytes"
    )


# ------------------------------------------------------- memory, analytically
MEMORY_BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)


def _with_splits(layer: Layer, separate: Mapping[str, int], full: bool) -> Layer:
    """``layer`` sized for ``separate[g]`` units per model kept separate in
    each group (``full``: the pair statistics' layout, every unit separate)."""

    def splits(group, n):
        if group is None:
            return (n, 0, 0)
        if full:
            return (0, n, n)
        s = separate[group]
        return (n - s, s, s)

    return dataclasses.replace(
        layer,
        in_splits=splits(layer.in_group, layer.in_splits[0]),
        out_splits=splits(layer.out_group, layer.out_splits[0]),
    )


def _memory_row(layers: Mapping[str, Layer], bound: int | None, **kw) -> dict[str, Any]:
    sizes = {n: statistics_bytes(lay, **kw) for n, lay in layers.items()}
    largest = max(sizes, key=lambda n: sizes[n])
    return {
        "total_bytes": sum(sizes.values()),
        "gram_bytes": sum(lay.gram_bytes for lay in layers.values()),
        "largest_bytes": sizes[largest],
        "largest_layer": largest,
        "chunks": len(_chunk_sizes(list(sizes.values()), bound)),
        "over_bound": [n for n, b in sizes.items() if bound is not None and b > bound],
    }


def statistics_memory(
    module,
    variables: Mapping[str, Any],
    spec: Mapping[str, Any],
    input_shape: Sequence[int],
    *,
    budgets: Sequence[float] = MEMORY_BUDGETS,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
) -> dict[str, Any]:
    """Least-squares statistics memory of a merge per budget, without running the model.

    For each budget, uniform ratios (:func:`pleas_jax.budget.uniform_ratios`)
    give the merged widths, and each layer's statistics take
    :func:`pleas_jax.ls_layers.statistics_bytes` (per-merge, with the ``init`` terms, as
    :func:`pleas_jax.least_squares.least_squares` accumulates them). The pair statistics
    (:func:`pleas_jax.pair_least_squares.pair_statistics`) are the same at
    every budget: the budget-2 layout without ``init`` terms, with a target
    Gram. Only shapes are read, and the forward pass is traced, not run.

    Args:
      module, variables: a source model; ``jax.ShapeDtypeStruct`` leaves do
        (``jax.eval_shape(module.init, ...)``).
      spec: its permutation spec.
      input_shape: one image ``(H, W, C)`` or a batch ``(N, H, W, C)``; the
        statistics do not depend on the batch size.
      budgets: budgets in ``[1, 2]``.
      max_memory_bytes: the bound the chunk counts are taken for.

    Returns:
      ``{"input_shape": (H, W, C), "bound": max_memory_bytes, "budgets": [{"budget",
      "ratio", "total_bytes", "gram_bytes", "largest_bytes", "largest_layer",
      "chunks", "over_bound"}, ...], "pair": {the same keys but budget and
      ratio}}``: total bytes of every layer's statistics (what one pass
      without a bound holds), the Grams' share, the largest layer, the number
      of chunks (passes) under the bound, and the layers over it (per-merge:
      fitted by gradient descent; pair: an error).
    """
    from pleas_jax import budget as budget_lib  # budget never imports this module

    shape = tuple(int(d) for d in input_shape)
    shape = shape[1:] if len(shape) == 4 else shape
    example = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    table = budget_lib.layer_table(module, variables, spec, shape)
    # Geometry once, at budget 1 (every unit merged); widths per budget below.
    none = np.arange(0)
    merged_all = {
        g: GroupBlocks(np.arange(grp.size), np.arange(grp.size), none, none)
        for g, grp in spec.items()
    }
    base = find_layers(module, variables, spec, merged_all, example)
    rows = []
    for b in budgets:
        ratios = budget_lib.uniform_ratios(table, spec, float(b))
        separate = budget_lib.separate_units(spec, ratios)
        sized = {n: _with_splits(lay, separate, False) for n, lay in base.items()}
        rows.append(
            {
                "budget": float(b),
                "ratio": float(next(iter(ratios.values()), 0.0)),
                **_memory_row(sized, max_memory_bytes, init=True),
            }
        )
    full = {n: _with_splits(lay, {}, True) for n, lay in base.items()}
    return {
        "input_shape": shape,
        "bound": max_memory_bytes,
        "budgets": rows,
        "pair": _memory_row(full, max_memory_bytes, init=False, target_gram=True),
    }
