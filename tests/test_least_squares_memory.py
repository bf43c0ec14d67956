"""Least-squares statistics under a memory bound: layers streamed in chunks, one
pass over the data each, give the same sums and solution as one pass; the
analytic memory report matches the arrays a real pass returns."""

import importlib

import jax
import numpy as np
import pytest

from pleas_jax import budget, partial
from pleas_jax.least_squares import (
    StatisticsOverBound,
    find_layers,
    layer_statistics,
    least_squares,
    memory_chunks,
    statistics_bytes,
    statistics_memory,
    weights_of,
)
from pleas_jax.merge import merge
from pleas_jax.pair_least_squares import pair_statistics
from pleas_jax.permutation import identity
from pleas_jax.tree import flatten
from tests.helpers import resnet20_pair

# The package re-exports the function least_squares under the module's name.
ls_module = importlib.import_module("pleas_jax.least_squares")

SIZE = 16


@pytest.fixture(scope="module")
def pair():
    m, va, vb, spec, batches = resnet20_pair(width=4, size=SIZE, batches=2, batch_size=16)
    blocks = partial.full_blocks(spec, identity(spec), 0.5)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    layers = find_layers(m, va, spec, blocks, batches[0][:1])
    return m, va, vb, spec, batches, blocks, mm, vm, layers


def _bound(layers):
    """Every layer fits, and about three chunks follow (each compiles its own
    pass, which is what a test pays for here)."""
    sizes = [statistics_bytes(lay) for lay in layers.values()]
    return max(max(sizes), sum(sizes) // 3 + 1)


class _Counting:
    """A callable source of batches that counts the passes it starts."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def __call__(self):
        self.calls += 1
        return iter(self.batches)


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(np.max(np.abs(b)), 1e-30))


def test_chunked_statistics_equal_one_pass(pair):
    m, va, vb, spec, batches, blocks, _, vm, layers = pair
    w0 = weights_of(vm, layers)
    bound = _bound(layers)
    chunks = memory_chunks(layers, bound)
    assert len(chunks) > 1 and [n for c in chunks for n in c] == list(layers)
    for c in chunks:
        assert sum(statistics_bytes(layers[n]) for n in c) <= bound
    one = layer_statistics(m, va, m, vb, spec, blocks, batches, init=w0, max_memory_bytes=None)
    source = _Counting(batches)
    many = layer_statistics(m, va, m, vb, spec, blocks, source, init=w0, max_memory_bytes=bound)
    assert source.calls == len(chunks)
    assert list(many) == list(one)
    for n, s in one.items():
        assert set(many[n]) == set(s)
        # Several chunks: the finished ones wait in host memory.
        assert isinstance(many[n]["gram"], np.ndarray)
        for k, v in s.items():
            if k != "layer":
                _close(many[n][k], v)


def test_chunked_least_squares_equals_one_pass(pair):
    m, va, vb, spec, batches, blocks, mm, vm, layers = pair
    bound = _bound(layers)
    one, r1 = least_squares(m, va, m, vb, spec, blocks, mm, vm, batches, max_memory_bytes=None)
    source = _Counting(batches)
    many, rk = least_squares(m, va, m, vb, spec, blocks, mm, vm, source, max_memory_bytes=bound)
    mem = rk["memory"]
    assert mem["chunks"] == mem["passes"] == source.calls == len(memory_chunks(layers, bound)) > 1
    assert all(b <= bound for b in mem["chunk_bytes"]) and mem["peak_statistics_bytes"] <= bound
    assert mem["bound"] == bound and mem["total_statistics_bytes"] == sum(mem["chunk_bytes"])
    assert r1["memory"]["chunks"] == 1
    assert r1["memory"]["peak_statistics_bytes"] == mem["total_statistics_bytes"]
    assert all(v["method"] == "closed_form" for v in rk["layers"].values())
    flat_one, flat_many = flatten(one["params"]), flatten(many["params"])
    for n in layers:
        for leaf in ("kernel", "bias"):
            path = (*n.split("/"), leaf)
            if path in flat_one:
                _close(flat_many[path], flat_one[path])
        assert abs(rk["layers"][n]["after"] - r1["layers"][n]["after"]) <= 1e-5 * max(
            r1["layers"][n]["before"], 1e-12
        )


def test_one_shot_iterator_with_several_chunks_is_refused(pair):
    m, va, vb, spec, batches, blocks, mm, vm, layers = pair
    bound = _bound(layers)
    with pytest.raises(ValueError, match="one-shot iterator"):
        layer_statistics(m, va, m, vb, spec, blocks, iter(batches), max_memory_bytes=bound)
    with pytest.raises(ValueError, match="one-shot iterator"):
        least_squares(m, va, m, vb, spec, blocks, mm, vm, iter(batches), max_memory_bytes=bound)
    # One chunk: a one-shot iterator is enough.
    stats = layer_statistics(m, va, m, vb, spec, blocks, iter(batches), layers=["conv1"])
    assert float(stats["conv1"]["count"]) == 32 * SIZE * SIZE


def test_layer_over_the_bound(pair, monkeypatch):
    m, va, vb, spec, batches, blocks, mm, vm, layers = pair
    sizes = {n: statistics_bytes(lay) for n, lay in layers.items()}
    big = max(sizes, key=sizes.__getitem__)
    bound = sorted(set(sizes.values()))[-2]  # only the largest layer(s) exceed it
    with pytest.raises(StatisticsOverBound, match=f"layer {big}: .* {sizes[big]} bytes"):
        layer_statistics(
            m, va, m, vb, spec, blocks, batches, init=weights_of(vm, layers), max_memory_bytes=bound
        )
    # Per-merge least squares fits a layer over either bound by gradient
    # descent (the tighter bound wins). The descent itself is tested in
    # test_least_squares.py; here it only records which layers it was given.
    given = {}

    def descent(*args, **kwargs):
        given.update(args[6])  # the initial weights of the layers to fit
        return dict(args[6]), np.zeros(1)

    monkeypatch.setattr(ls_module, "gradient_descent", descent)
    monkeypatch.setattr(ls_module, "feature_residuals", lambda *a, **k: dict.fromkeys(a[6], 0.0))
    max_gram = min(lay.gram_bytes for lay in layers.values())  # one closed chunk: cheap
    _, report = least_squares(
        m, va, m, vb, spec, blocks, mm, vm, batches, max_memory_bytes=bound, max_gram_bytes=max_gram
    )
    over = {n for n, lay in layers.items() if lay.gram_bytes > max_gram or sizes[n] > bound}
    assert big in over and set(given) == over
    assert {n for n, r in report["layers"].items() if r["method"] == "gd"} == over
    assert report["memory"]["chunks"] == 1
    assert report["memory"]["peak_statistics_bytes"] == sum(
        b for n, b in sizes.items() if n not in over
    )
    # Pair statistics cannot: a clear error before any pass over the data.
    full = find_layers(m, va, spec, partial.full_blocks(spec, identity(spec), 1.0), batches[0][:1])
    full_sizes = {n: statistics_bytes(lay, init=False, target_gram=True) for n, lay in full.items()}
    big = max(full_sizes, key=full_sizes.__getitem__)
    source = _Counting(batches)
    with pytest.raises(ValueError, match=f"layer {big} needs {full_sizes[big]} bytes.*per-merge"):
        pair_statistics(m, va, m, vb, spec, source, max_memory_bytes=full_sizes[big] - 1)
    assert source.calls == 1  # only the first batch was read, to trace the layers


@pytest.mark.parametrize("b", [1.0, 2.0])
def test_memory_report_matches_real_statistics(pair, b):
    m, va, vb, spec, batches, *_ = pair
    shapes = jax.eval_shape(lambda: va)
    report = statistics_memory(m, shapes, spec, (SIZE, SIZE, 3), budgets=[b])
    (row,) = report["budgets"]
    table = budget.layer_table(m, va, spec, (SIZE, SIZE, 3))
    assert set(budget.uniform_ratios(table, spec, b).values()) == {row["ratio"]}
    blocks = partial.full_blocks(spec, identity(spec), row["ratio"])
    _, vm = partial.partial_merge(m, spec, blocks, va, vb)
    layers = find_layers(m, va, spec, blocks, batches[0][:1])
    stats = layer_statistics(m, va, m, vb, spec, blocks, batches[:1], init=weights_of(vm, layers))
    nbytes = {n: sum(int(v.nbytes) for k, v in s.items() if k != "layer") for n, s in stats.items()}
    assert row["total_bytes"] == sum(nbytes.values())
    assert row["largest_bytes"] == max(nbytes.values()) == nbytes[row["largest_layer"]]
    assert row["gram_bytes"] == sum(int(s["gram"].nbytes) for s in stats.values())
    assert row["chunks"] == 1 and row["over_bound"] == []
    if b == 2.0:
        ps = pair_statistics(m, va, m, vb, spec, batches[:1])
        # The pass also sums Σ Ỹ² per output, which the pair statistics drop.
        dropped = 4 * sum(lay.c_out for lay in ps.layers.values())
        assert ps.memory is not None
        assert report["pair"]["total_bytes"] == ps.memory["total_statistics_bytes"]
        assert ps.nbytes == ps.memory["total_statistics_bytes"] - dropped
        assert ps.memory["chunks"] == 1


def test_merge_reports_the_chunks(pair):
    m, va, vb, spec, batches, *_, layers = pair
    bound = _bound(layers)
    # The fixture's blocks (identity matching, ratio 0.5): compiled passes are reused.
    res = merge(
        (m, va),
        (m, vb),
        batches,
        1.5,
        matching="identity",
        ratios=dict.fromkeys(spec, 0.5),
        batch_norm=False,
        count_xla_flops=False,
        progress=False,
        max_memory_bytes=bound,
    )
    mem = res.report["least_squares_report"]["memory"]
    assert mem["chunks"] == len(memory_chunks(layers, bound)) > 1
    assert mem["peak_statistics_bytes"] <= mem["bound"] == bound
