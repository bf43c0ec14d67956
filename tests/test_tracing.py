"""Trace results kept per abstract signature (pleas_jax.tracing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models, tracing
from pleas_jax import spec as spec_lib


def _model(width=4, seed=0):
    m = models.resnet20(10, width=width)
    return m, m.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))


def test_signature_reads_shapes_not_values():
    m, va = _model(seed=0)
    _, vb = _model(seed=1)
    x = np.zeros((1, 8, 8, 3), np.float32)
    key = tracing.signature(m, va, x)
    assert key == tracing.signature(m, vb, x + 1.0)
    assert key != tracing.signature(m, va, np.zeros((2, 8, 8, 3), np.float32))
    assert key != tracing.signature(m, va, x.astype(np.float16))
    assert key != tracing.signature(m, va, x, free_output=True)
    wide, vw = _model(width=8)
    assert key != tracing.signature(wide, vw, x)
    assert tracing.signature(m, va, x, kwargs=["unhashable"]) is None


def test_cached_builds_once_per_key_and_keeps_no_errors(monkeypatch):
    tracing.clear()
    monkeypatch.setattr(tracing, "MAX_ENTRIES", 2)
    calls = []

    def build(v):
        calls.append(v)
        return v

    assert tracing.cached("k", 1, lambda: build("a")) == "a"
    assert tracing.cached("k", 1, lambda: build("b")) == "a"  # kept
    assert tracing.cached("other", 1, lambda: build("c")) == "c"  # kinds are separate
    assert tracing.cached("k", None, lambda: build("d")) == "d"  # None: never kept
    assert tracing.cached("k", None, lambda: build("e")) == "e"
    tracing.cached("k", 2, lambda: build("f"))  # two kept: the least recently used, ("k", 1), goes
    assert tracing.cached("k", 1, lambda: build("g")) == "g"
    assert calls == ["a", "c", "d", "e", "f", "g"]

    def fail():
        calls.append("fail")
        raise RuntimeError("no")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            tracing.cached("k", 3, fail)
    assert calls.count("fail") == 2
    tracing.clear()


def test_derive_spec_traces_once_per_signature(monkeypatch):
    tracing.clear()
    traces = []
    real = spec_lib._trace

    def counted(*a):
        traces.append(1)
        return real(*a)

    monkeypatch.setattr(spec_lib, "_trace", counted)
    m, va = _model(seed=0)
    _, vb = _model(seed=1)
    x = np.zeros((1, 8, 8, 3), np.float32)
    first = spec_lib.derive_spec(m, va, x)
    second = spec_lib.derive_spec(m, vb, x)
    assert len(traces) == 1
    assert first == second and first is not second
    first.clear()  # editing a returned spec leaves the kept one alone
    assert spec_lib.derive_spec(m, va, x) == second
    free = spec_lib.derive_spec(m, va, x, free_output=True)
    assert len(traces) == 2 and len(free) == len(second) + 1
    tracing.clear()
    assert spec_lib.derive_spec(m, va, x) == second  # a fresh trace agrees
    assert len(traces) == 3
