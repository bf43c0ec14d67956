"""Results of tracing a model, kept per abstract signature.

Deriving the spec, the accounting's layer table and the least-squares layers
each trace the model's forward pass, and a merge traces the same source model
for all three (a resnet50 takes ~0.16 s per trace on a 2-core CPU, ~0.8 s per
merge in all); a sweep over budgets repeats every one of them. What a trace
yields depends only on the module (its fields), the variables' paths, shapes
and dtypes and the input's, so :func:`cached` keeps the last few results per
:func:`signature`, never the values of any array. Errors are not kept: a
failing trace fails again.

    key = signature(module, variables, x, free_output=True)
    spec = cached("spec", key, lambda: build_spec(...))
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.tree import flatten, to_dict

T = TypeVar("T")

MAX_ENTRIES = 32
_cache: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_lock = threading.Lock()


def _abstract(x) -> tuple[tuple[int, ...], str]:
    dtype = getattr(x, "dtype", None)  # arrays and ShapeDtypeStructs: no type promotion needed
    return tuple(int(d) for d in np.shape(x)), str(
        dtype if dtype is not None else jnp.result_type(x)
    )


def signature(module, variables: Mapping[str, Any], example_input: Any, **options: Any):
    """A hashable key for tracing ``module.apply(variables, example_input)``
    under ``options``, or ``None`` when one part cannot be hashed (a module
    with a list field, say): then nothing is cached."""
    flat = flatten(to_dict(variables))
    key = (
        module,
        tuple((p, *_abstract(v)) for p, v in flat.items()),
        jax.tree.structure(example_input),
        tuple(_abstract(x) for x in jax.tree.leaves(example_input)),
        tuple(sorted(options.items())),
        bool(jax.config.read("jax_enable_x64")),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def cached(kind: str, key: Hashable | None, build: Callable[[], T]) -> T:
    """``build()``, or what it returned for the same ``kind`` and ``key``
    before (the last :data:`MAX_ENTRIES` are kept). Callers must not mutate
    what is returned."""
    if key is None:
        return build()
    full = (kind, key)
    with _lock:
        if full in _cache:
            _cache.move_to_end(full)
            return _cache[full]
    value = build()
    with _lock:
        _cache[full] = value
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return value


def clear() -> None:
    """Forget every kept result."""
    with _lock:
        _cache.clear()
