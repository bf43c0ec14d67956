"""Least squares: exact on planted problems, block mask respected, no worse than
gradient descent, keeps the ensemble at budget 2; the names of the ls_* modules
are re-exported. (Statistics kernels and sharding: test_ls_statistics.py;
layer geometry: test_ls_layers.py.)"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models, partial

# The package re-exports the function least_squares under the module's name.
from pleas_jax.least_squares import (
    Layer,
    feature_residuals,
    find_layers,
    gradient_descent,
    layer_rows,
    layer_statistics,
    least_squares,
    matrix_mask,
    residuals,
    solve,
    weights_of,
    weights_to_matrix,
)
from pleas_jax.matching.activations import activation_matching
from pleas_jax.permutation import identity
from pleas_jax.spec import derive_spec
from tests.helpers import images, init, randomize_norms, resnet20_pair

SIZE = 16


# ------------------------------------------------------------ planted problems
def _stats_from_arrays(layer, x, y, w0=None):
    """What layer_statistics accumulates, from one batch of merged features."""
    rows = layer_rows(layer, jnp.asarray(x))
    y = jnp.asarray(y).reshape(-1, layer.c_out)
    hi = jax.lax.Precision.HIGHEST
    s = {
        "layer": layer,
        "gram": jnp.matmul(rows.T, rows, precision=hi),
        "cross": jnp.matmul(rows.T, y, precision=hi),
        "target_sq": jnp.sum(y * y, 0),
        "count": jnp.asarray(rows.shape[0], jnp.float32),
    }
    if w0 is not None:
        err = jnp.matmul(rows, w0, precision=hi) - y
        s.update(
            init=w0, init_grad=jnp.matmul(rows.T, err, precision=hi), init_sq=jnp.sum(err * err, 0)
        )
    return s


def _layer(kind, in_splits, out_splits, bias, k=(), stride=(), pad=()):
    return Layer(
        name="planted",
        kind=kind,
        kernel_size=k,
        strides=stride,
        padding=pad,
        dilation=(1,) * len(k),
        bias=bias,
        in_group="gi",
        out_group="go",
        in_splits=in_splits,
        out_splits=out_splits,
    )


@pytest.mark.parametrize("centre", ["zero", "init"])
@pytest.mark.parametrize(
    "layer",
    [
        _layer("dense", (4, 3, 3), (5, 2, 2), True),
        _layer("dense", (0, 4, 4), (0, 3, 3), False),
        _layer("conv", (3, 2, 2), (4, 2, 2), True, (3, 3), (2, 2), ((1, 1), (1, 1))),
    ],
    ids=["dense", "dense-all-separate", "conv"],
)
def test_planted_weights_are_recovered(layer, centre):
    rng = np.random.default_rng(0)
    shape = (400, layer.c_in) if layer.kind == "dense" else (12, 9, 9, layer.c_in)
    x = rng.normal(size=shape).astype(np.float32)
    mask = matrix_mask(layer)
    planted = (rng.normal(size=mask.shape) * mask).astype(np.float32)
    rows = layer_rows(layer, jnp.asarray(x))
    y = jnp.matmul(rows, planted, precision=jax.lax.Precision.HIGHEST)
    w0 = None
    if centre == "init":
        w0 = jnp.asarray(rng.normal(size=mask.shape) * mask, jnp.float32)
    sol = solve({"planted": _stats_from_arrays(layer, x, y, w0)}, ridge=1e-9, ridge_centre=centre)
    got = weights_to_matrix(layer, sol["planted"]["kernel"], sol["planted"].get("bias"))
    np.testing.assert_allclose(got, planted, atol=1e-5)
    assert not sol["planted"]["fallback"]
    # Forbidden weights are exactly zero, not merely small.
    assert np.all(np.asarray(got)[~mask] == 0.0)


def test_rank_deficient_gram_falls_back_to_pseudo_inverse():
    layer = _layer("dense", (3, 0, 0), (2, 0, 0), False)
    x = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    x[:, 2] = x[:, 0]  # two equal columns: singular Gram
    w = np.array([[1.0, 2.0], [0.5, -1.0], [1.0, 0.0]], np.float32)
    s = _stats_from_arrays(layer, x, x @ w)
    sol = solve({"planted": s}, ridge=0.0)["planted"]
    assert sol["fallback"]
    # Minimum-norm solution: the duplicated column's weight is shared equally.
    np.testing.assert_allclose(sol["kernel"], [[1.0, 1.0], [0.5, -1.0], [1.0, 1.0]], atol=1e-4)


def test_dead_inputs_keep_the_centre():
    # All-zero inputs (dead units) give a zero Gram: the solve returns the
    # ridge's centre instead of failing.
    layer = _layer("dense", (3, 1, 1), (2, 1, 1), False)
    x = np.zeros((20, 5), np.float32)
    w0 = jnp.asarray(
        np.random.default_rng(2).normal(size=matrix_mask(layer).shape) * matrix_mask(layer),
        jnp.float32,
    )
    s = _stats_from_arrays(layer, x, np.zeros((20, 4), np.float32), w0)
    for centre, want in (("init", w0), ("zero", jnp.zeros_like(w0))):
        sol = solve({"planted": s}, ridge_centre=centre)["planted"]
        assert not sol["fallback"]
        np.testing.assert_allclose(weights_to_matrix(layer, sol["kernel"]), want, atol=1e-6)


# ------------------------------------------------------------------ conv path
class _OneConv(nn.Module):
    k: int
    stride: int
    padding: int | str
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        conv = models.Conv(
            6,
            (self.k, self.k),
            (self.stride, self.stride),
            padding=self.padding,
            use_bias=self.bias,
            name="conv",
        )
        return conv(x)


@pytest.mark.parametrize(
    "k,stride,padding,bias",
    [(3, 2, 1, False), (7, 2, 3, False), (1, 2, 0, False), (3, 2, "SAME", True)],
    ids=["3x3/2", "stem-7x7/2", "downsample-1x1/2", "same-bias"],
)
def test_single_conv_layer_recovers_the_planted_kernel(k, stride, padding, bias):
    # Targets are the average of two convs: the planted kernel is their mean.
    m = _OneConv(k, stride, padding, bias)
    x0 = jnp.zeros((1, SIZE, SIZE, 3))
    va, vb = m.init(jax.random.key(1), x0), m.init(jax.random.key(2), x0)
    if bias:
        va = jax.tree.map(lambda v: v + 0.1, va)
    spec = derive_spec(m, va, np.zeros((1, SIZE, SIZE, 3), np.float32))
    assert spec == {}  # input and output axes are fixed: one merged layer
    batches = [images(4, SIZE, seed=s) for s in range(3)]
    stats = layer_statistics(m, va, m, vb, spec, {}, batches)
    layer = stats["conv"]["layer"]
    assert layer.kernel_size == (k, k) and layer.strides == (stride, stride) and layer.bias == bias
    sol = solve(stats, ridge=1e-9)["conv"]
    planted = 0.5 * (va["params"]["conv"]["kernel"] + vb["params"]["conv"]["kernel"])
    np.testing.assert_allclose(sol["kernel"], planted, atol=1e-5)
    if bias:
        np.testing.assert_allclose(sol["bias"], 0.05 * np.ones(6), atol=1e-5)
    assert stats["conv"]["count"] == 12 * (-(-SIZE // stride)) ** 2


# ---------------------------------------------------------------- resnet pairs
@pytest.fixture(scope="module")
def pair():
    return resnet20_pair(width=8, size=SIZE, batches=4, batch_size=32)


def _blocks(pair, budget):
    m, va, vb, spec, batches = pair
    if budget == 1.0:
        return partial.full_blocks(spec, identity(spec), 0.0)
    # (1 + r)^2 = 1.5: inner convs scale with both widths.
    perm, costs = activation_matching(m, va, m, vb, spec, batches[:1])
    return partial.make_blocks(spec, perm, costs, 0.225)


def _assert_mask(layers, weights):
    for n, lay in layers.items():
        k = np.asarray(weights[n]["kernel"])
        mi, ai, bi = lay.in_splits
        mo, ao, bo = lay.out_splits
        assert np.all(k[..., mi + ai :, mo : mo + ao] == 0.0), n  # A-only outputs, B-only inputs
        assert np.all(k[..., mi : mi + ai, mo + ao :] == 0.0), n  # B-only outputs, A-only inputs


@pytest.mark.parametrize("budget", [1.0, 1.5])
def test_closed_form_is_no_worse_than_gradient_descent(pair, budget):
    m, va, vb, spec, batches = pair
    blocks = _blocks(pair, budget)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    layers = find_layers(m, va, spec, blocks, batches[0][:1])
    w0 = weights_of(vm, layers)
    stats = layer_statistics(m, va, m, vb, spec, blocks, batches, init=w0)
    closed = solve(stats)
    descent, losses = gradient_descent(m, va, m, vb, spec, blocks, w0, batches, steps=400)
    assert losses[-1] < losses[0]
    before, r_cf, r_gd = (residuals(stats, w) for w in (w0, closed, descent))
    worst = 0.0
    for n, s in stats.items():
        energy = float(jnp.sum(s["target_sq"])) / (float(s["count"]) * s["layer"].c_out)
        # Layers the merge already solves exactly (the stem, reading the image)
        # sit at fp32 round-off (~1e-14 of the target energy) in both modes;
        # below 1e-9 of the energy a ratio compares noise.
        assert r_cf[n] <= 1.001 * r_gd[n] + 1e-9 * energy, (n, r_cf[n], r_gd[n])
        assert r_cf[n] <= before[n] + 1e-9 * energy, n
        if r_gd[n] > 1e-9 * energy:
            worst = max(worst, r_cf[n] / r_gd[n])
    print(
        f"budget {budget}: worst closed-form / gradient residual ratio {worst:.4f}; "
        f"mean {np.mean([r_cf[n] for n in stats]):.4g} vs {np.mean([r_gd[n] for n in stats]):.4g}"
    )
    _assert_mask(layers, closed)
    _assert_mask(layers, descent)
    if budget == 1.5:
        assert any(lay.in_splits[1] and lay.out_splits[1] for lay in layers.values())
    if budget != 1.5:
        return
    # Residuals from the sums agree with residuals measured on the features.
    direct = feature_residuals(m, va, m, vb, spec, blocks, closed, batches)
    for n in stats:
        energy = float(jnp.sum(stats[n]["target_sq"])) / (
            float(stats[n]["count"]) * stats[n]["layer"].c_out
        )
        assert abs(direct[n] - r_cf[n]) <= 1e-4 * direct[n] + 1e-9 * energy, (n, direct[n], r_cf[n])


def test_budget_two_keeps_the_ensemble(pair):
    m, va, vb, spec, batches = pair
    blocks = partial.full_blocks(spec, identity(spec), 1.0)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    new, report = least_squares(m, va, m, vb, spec, blocks, mm, vm, batches)
    assert set(report["layers"]) == set(find_layers(m, va, spec, blocks, batches[0][:1]))
    assert all(r["method"] == "closed_form" for r in report["layers"].values())
    x = np.concatenate(batches)
    ens = 0.5 * (m.apply(va, x) + m.apply(vb, x))
    err = float(jnp.max(jnp.abs(mm.apply(new, x) - ens)))
    scale = float(jnp.max(jnp.abs(ens)))
    print(f"budget 2: max |merged - ensemble| / max |logit| = {err / scale:.2e}")
    assert err <= 1e-3 * scale
    # Batch norm statistics are left alone.
    np.testing.assert_array_equal(
        new["batch_stats"]["bn1"]["mean"], vm["batch_stats"]["bn1"]["mean"]
    )


def test_oversized_grams_fall_back_to_gradient_descent(pair):
    m, va, vb, spec, batches = pair
    blocks = _blocks(pair, 1.0)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    layers = find_layers(m, va, spec, blocks, batches[0][:1])
    bound = sorted(lay.gram_bytes for lay in layers.values())[len(layers) // 2]
    new, report = least_squares(
        m, va, m, vb, spec, blocks, mm, vm, batches[:2], max_gram_bytes=bound, steps=20
    )
    methods = {n: r["method"] for n, r in report["layers"].items()}
    assert {n for n, k in methods.items() if k == "gd"} == {
        n for n, lay in layers.items() if lay.gram_bytes > bound
    }
    assert "gradient" in report["seconds"] and "solve" in report["seconds"]
    for r in report["layers"].values():
        assert r["after"] <= r["before"] * (1 + 1e-6) + 1e-12
    out = mm.apply(new, batches[0])
    assert out.shape == (32, 10) and np.all(np.isfinite(out))


def test_gradient_mode_end_to_end():
    m = models.resnet20(num_classes=3, width=4)
    va, vb = randomize_norms(init(m, 8), 1), randomize_norms(init(m, 8, seed=2), 3)
    spec = derive_spec(m, va, np.zeros((1, 8, 8, 3), np.float32))
    blocks = partial.full_blocks(spec, identity(spec), 0.5)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    batches = (images(6, 8, seed=s) for s in range(2))  # a one-shot iterator is fine
    new, report = least_squares(
        m, va, m, vb, spec, blocks, mm, vm, batches, mode="gd", steps=5, learning_rate=1e-3
    )
    assert {r["method"] for r in report["layers"].values()} == {"gd"}
    assert set(report["seconds"]) == {"gradient"}
    mean = lambda k: np.mean([r[k] for r in report["layers"].values()])  # noqa: E731
    assert mean("after") < mean("before")
    layers = find_layers(m, va, spec, blocks, np.zeros((1, 8, 8, 3), np.float32))
    _assert_mask(layers, weights_of(new, layers))


# ------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_error(pair):
    m, va, vb, spec, batches = pair
    blocks = _blocks(pair, 1.0)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    with pytest.raises(ValueError, match="at least one batch"):
        least_squares(m, va, m, vb, spec, blocks, mm, vm, [])
    with pytest.raises(ValueError, match="at least one batch"):
        layer_statistics(m, va, m, vb, spec, blocks, iter([]))
    with pytest.raises(ValueError, match="at least one batch"):
        gradient_descent(m, va, m, vb, spec, blocks, {}, [])
    with pytest.raises(ValueError, match="mode must be"):
        least_squares(m, va, m, vb, spec, blocks, mm, vm, batches, mode="adam")
    other = partial.full_blocks(spec, identity(spec), 1.0)
    with pytest.raises(ValueError, match="kernel"):
        least_squares(m, va, m, vb, spec, other, mm, vm, batches)


# ------------------------------------------------------------------ re-exports
def test_moved_names_are_re_exported():
    # The pieces live in ls_* modules; least_squares re-exports the very same
    # objects, so callers (and monkeypatches of least_squares' own calls) keep
    # working.
    from pleas_jax import ls_data, ls_descent, ls_layers, ls_memory, ls_solve, ls_statistics

    # The module, not the function the package re-exports under its name.
    ls = importlib.import_module("pleas_jax.least_squares")
    moved = {
        ls_layers: [
            "Layer",
            "apply_solution",
            "channel_mask",
            "find_layers",
            "layer_apply",
            "layer_rows",
            "matrix_mask",
            "matrix_to_weights",
            "statistics_bytes",
            "weights_of",
            "weights_to_matrix",
        ],
        ls_data: ["_data_passes", "_images"],
        ls_statistics: ["GRAM_METHODS", "batch_sums", "layer_statistics"],
        ls_memory: [
            "DEFAULT_MAX_MEMORY_BYTES",
            "MEMORY_BUDGETS",
            "StatisticsOverBound",
            "memory_chunks",
            "memory_report",
            "statistics_memory",
            "_one_shot_error",
        ],
        ls_descent: ["feature_residuals", "gradient_descent"],
        ls_solve: ["RIDGE_CENTRES", "solve", "residuals", "initial_residuals"],
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(ls, name) is getattr(module, name), (module.__name__, name)
    assert len(ls.__all__) == len(set(ls.__all__))
    assert all(hasattr(ls, name) for name in ls.__all__)
    public = {n for names in moved.values() for n in names if not n.startswith("_")}
    assert public <= set(ls.__all__)


def test_gradient_mode_streams_batches_past_its_device_bound(pair, monkeypatch):
    """Batches over ``resident_bytes`` are sent per step instead of kept on the
    devices; the steps, and so the fitted weights, are the same."""
    from pleas_jax import distributed

    m, va, vb, spec, batches = pair
    blocks = _blocks(pair, 1.5)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    w0 = weights_of(vm, find_layers(m, va, spec, blocks, batches[0][:1]))
    sent = []
    real = distributed.shard_batch

    def counting(x, mesh):
        sent.append(len(x))
        return real(x, mesh)

    monkeypatch.setattr(distributed, "shard_batch", counting)
    fits, sends = {}, {}
    for bound in (None, 0):
        sent.clear()
        fits[bound] = gradient_descent(
            m, va, m, vb, spec, blocks, w0, batches, steps=5, resident_bytes=bound
        )
        sends[bound] = len(sent)
    assert len(batches) < 5
    assert sends == {None: len(batches), 0: 5}
    np.testing.assert_array_equal(fits[None][1], fits[0][1])
    for n, w in fits[None][0].items():
        for k in w:
            np.testing.assert_array_equal(w[k], fits[0][0][n][k])


def test_statistics_progress_counts_towards_the_number_of_batches(pair, capsys):
    m, va, vb, spec, batches = pair
    blocks = _blocks(pair, 1.0)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    n = len(batches)
    # A list, and a callable returning one (as merge passes its data): the bar
    # shows the number of batches, not "0it [...]".
    layer_statistics(m, va, m, vb, spec, blocks, batches, progress=True)
    least_squares(m, va, m, vb, spec, blocks, mm, vm, lambda: batches, progress=True)
    err = capsys.readouterr().err
    assert err.count(f"least-squares statistics:   0%|          | 0/{n} [") == 2, err
    # A one-shot iterator has no length to show.
    layer_statistics(m, va, m, vb, spec, blocks, iter(batches), progress=True)
    assert "least-squares statistics: 0it [" in capsys.readouterr().err
