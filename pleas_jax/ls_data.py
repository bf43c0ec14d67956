"""What both least-squares modes read from the data, batch by batch.

Per batch, both source models run with their features recorded
(:func:`_features`); a layer's regression input X̃ and target Ỹ are the merged
combination of the A and B features at the layer's input and output
(:func:`_layer_data`, :func:`pleas_jax.partial.combine`). The closed-form
statistics (:mod:`pleas_jax.ls_statistics`) and gradient descent
(:mod:`pleas_jax.ls_descent`) both build on these, and on the helpers kept
beside them for passing over the data: one-shot iterators, re-iterables and
callables as batches (:func:`_data_passes`), layers picked by name, compiled
per-batch functions cached across calls, and one batch's sums added to a
running total.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.ls_layers import Layer
from pleas_jax.models.layers import FEATURES
from pleas_jax.partial import GroupBlocks, combine
from pleas_jax.tree import flatten

# What the least-squares passes accept as data: a re-iterable, a one-shot
# iterator, or a callable returning a fresh iterator per pass.
Batches = Iterable[Any] | Callable[[], Iterable[Any]]


# ------------------------------------------------------------------- features
def _features(module, variables, x) -> dict[tuple[str, ...], Any]:
    _, state = module.apply(variables, x, mutable=[FEATURES])
    return flatten(state[FEATURES])


def _layer_data(layer: Layer, blocks, fa, fb):
    """Merged input ``[N, ..., C_in]`` and target ``[N, ..., C_out]`` (fp32)."""
    pieces = []
    for end, group in (("in", layer.in_group), ("out", layer.out_group)):
        a, b = fa.get((*layer.path, end)), fb.get((*layer.path, end))
        if a is None or b is None:
            raise ValueError(
                f"layer {layer.name}: the models record no {end!r} features; build them from "
                "pleas_jax.models layers"
            )
        bl = None if group is None else blocks[group]
        pieces.append(combine(a.astype(jnp.float32), b.astype(jnp.float32), bl))
    return pieces


# ------------------------------------------------------- passes over the data
def _peek(batches: Iterable[Any], what: str):
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{what} needs at least one batch of data")
    return first, itertools.chain([first], it)


class _SizedPass:
    """One pass over batches whose number is known: an iterator with a length,
    so that a progress bar can show the total."""

    def __init__(self, it: Iterator[Any], n: int):
        self._it, self._n = it, n

    def __iter__(self) -> _SizedPass:
        return self  # one-shot, as the iterator it wraps

    def __next__(self) -> Any:
        return next(self._it)

    def __len__(self) -> int:
        return self._n


def _data_passes(batches: Batches, what: str):
    """The first batch, and a function that returns the data for one more pass.

    ``batches``: a re-iterable collection (a list: every pass iterates it
    again), a callable returning a fresh iterator (called once per pass after
    the first), or a one-shot iterator (one pass only). The first pass reuses
    the iterator the first batch was read from, so nothing is read twice.

    Returns ``(first, next_pass, one_shot)``; ``next_pass()`` raises
    ``ValueError`` when a one-shot iterator is asked for a second pass.
    """
    source = batches() if callable(batches) else batches
    size = len(source) if isinstance(source, Sized) else None
    it = iter(source)
    one_shot = not callable(batches) and it is batches
    first = next(it, None)
    if first is None:
        raise ValueError(f"{what} needs at least one batch of data")
    rest = itertools.chain([first], it)
    pending: list[Iterator[Any]] = [rest if size is None else _SizedPass(rest, size)]

    def next_pass():
        if pending:
            return pending.pop()
        if callable(batches):
            return batches()
        if one_shot:
            raise ValueError(f"{what}: a one-shot iterator of batches cannot feed a second pass")
        return batches

    return first, next_pass, one_shot


def _images(batch) -> np.ndarray:
    x = batch[0] if isinstance(batch, tuple | list) else batch
    return np.asarray(x)


def _select(layers: Mapping[str, Layer], names: Iterable[str] | None) -> dict[str, Layer]:
    if names is None:
        return dict(layers)
    names = list(names)
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"no conv/dense layers {unknown}; the model has {list(layers)}")
    return {n: layers[n] for n in names}


# Compiled per-batch functions, reused across calls on the same models, layers
# and blocks (a new closure would otherwise recompile every call).
_COMPILED: dict[tuple, Any] = {}
_COMPILED_MAX = 16


def _blocks_key(blocks: Mapping[str, GroupBlocks], layers: Mapping[str, Layer]) -> tuple:
    groups = sorted({g for lay in layers.values() for g in (lay.in_group, lay.out_group) if g})
    return tuple(
        (
            g,
            *(
                np.asarray(a, np.int64).tobytes()
                for a in (
                    blocks[g].merged_a,
                    blocks[g].merged_b,
                    blocks[g].only_a,
                    blocks[g].only_b,
                )
            ),
        )
        for g in groups
    )


def _cached(key: tuple, build):
    fn = _COMPILED.get(key)
    if fn is None:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        fn = _COMPILED[key] = build()
    return fn


@functools.partial(jax.jit, donate_argnums=0)
def _add(acc, new):
    return jax.tree.map(jnp.add, acc, new)
