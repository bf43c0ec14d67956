"""Least-squares statistics: the shift-structured conv Gram equals the patch
Gram, and sharding the pass over eight devices changes nothing."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax.ls_layers import Layer, layer_apply
from pleas_jax.ls_statistics import batch_sums
from tests.helpers import run_on_cpu_devices


# --------------------------------------------------------------- conv Grams
@pytest.mark.parametrize(
    "k,pad,hw,bias",
    [
        ((3, 3), ((1, 1), (1, 1)), (9, 7), False),
        ((3, 3), ((0, 0), (0, 0)), (6, 6), True),
        ((5, 3), ((2, 2), (1, 1)), (8, 7), False),
        ((3, 3), ((1, 1), (1, 1)), (2, 2), False),
        ((3, 3), ((0, 2), (1, 0)), (5, 4), True),
        ((1, 3), ((0, 0), (1, 1)), (4, 6), False),
    ],
)
def test_shift_gram_equals_patch_gram(k, pad, hw, bias):
    layer = Layer("c", "conv", k, (1, 1), pad, (1, 1), bias, None, None, (4, 0, 0), (3, 0, 0))
    rng = np.random.default_rng(sum(hw))
    x = jnp.asarray(rng.normal(size=(5, *hw, 4)) + 0.5, jnp.float32)  # non-zero mean, like ReLU
    kernel = jnp.asarray(rng.normal(size=layer.kernel_shape), jnp.float32)
    w0 = {"kernel": kernel, "bias": jnp.ones((3,))} if bias else {"kernel": kernel}
    y = layer_apply(layer, x, w0) + jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    mask = jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.0])
    w0 = {"kernel": 0.5 * kernel, **({"bias": jnp.zeros((3,))} if bias else {})}
    sums = jax.jit(batch_sums, static_argnums=0, static_argnames="gram")
    a = sums(layer, x, y, mask, w0, gram="shifts")
    b = sums(layer, x, y, mask, w0, gram="patches")
    assert set(a) == set(b)
    for name in a:
        scale = float(jnp.max(jnp.abs(b[name])))
        np.testing.assert_allclose(a[name], b[name], atol=2e-6 * scale, err_msg=name)
    # Padding examples count for nothing.
    c = sums(
        layer, x[jnp.array([0, 1, 3])], y[jnp.array([0, 1, 3])], jnp.ones(3), w0, gram="shifts"
    )
    for name in a:
        np.testing.assert_allclose(a[name], c[name], atol=2e-6 * float(jnp.max(jnp.abs(c[name]))))


@pytest.mark.parametrize("hw,shifts", [((32, 30), True), ((3, 3), False)])
def test_auto_gram_takes_shifts_only_where_they_save_work(monkeypatch, hw, shifts):
    from pleas_jax import ls_statistics

    calls = []
    real = ls_statistics._shift_gram

    def counted(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(ls_statistics, "_shift_gram", counted)
    layer = Layer(
        "c",
        "conv",
        (3, 3),
        (1, 1),
        ((1, 1), (1, 1)),
        (1, 1),
        True,
        None,
        None,
        (4, 0, 0),
        (3, 0, 0),
    )
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, *hw, 4)) + 0.5, jnp.float32)
    kernel = jnp.asarray(rng.normal(size=layer.kernel_shape), jnp.float32)
    y = layer_apply(layer, x, {"kernel": kernel, "bias": jnp.ones((3,))})
    mask = jnp.ones(4)
    a = batch_sums(layer, x, y, mask, gram="auto")
    assert len(calls) == int(shifts)
    b = batch_sums(layer, x, y, mask, gram="patches")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-6 * float(jnp.max(jnp.abs(b[name]))))


@pytest.mark.parametrize("kind,gram", [("conv", "shifts"), ("conv", "patches"), ("dense", None)])
def test_bf16_3x_grams_of_few_rows_need_no_pseudo_inverse(kind, gram):
    # 32 rows against 577 or 1,025 columns (few images, deep layers): the
    # bf16_3x sums must still give a positive definite ridged Gram, or the
    # solve falls back to its eigendecomposition (resnet50 at 32 px did for
    # eight layers, 8x slower than Cholesky).
    from pleas_jax.least_squares import solve

    rng = np.random.default_rng(7)
    if kind == "conv":
        layer = Layer(
            "c",
            "conv",
            (3, 3),
            (1, 1),
            ((1, 1), (1, 1)),
            (1, 1),
            True,
            None,
            None,
            (64, 0, 0),
            (8, 0, 0),
        )
        shape: tuple[int, ...] = (2, 4, 4, 64)
    else:
        layer = Layer("d", "dense", (), (), (), (), True, None, None, (1024, 0, 0), (8, 0, 0))
        shape = (32, 1024)
    x = jnp.asarray(
        np.maximum(rng.normal(size=shape), 0) * np.exp(rng.normal(size=shape[-1])), jnp.float32
    )
    w = {
        "kernel": jnp.asarray(rng.normal(size=layer.kernel_shape), jnp.float32),
        "bias": jnp.zeros((8,)),
    }
    y = layer_apply(layer, x, w)
    kw = {} if gram is None else {"gram": gram}
    fp32 = batch_sums(layer, x, y, None, **kw)
    for mask in (None, jnp.ones(shape[0]).at[-1].set(0.0)):
        s = batch_sums(layer, x, y, mask, precision="bf16_3x", **kw)
        g = np.asarray(s["gram"], np.float64)
        d = np.diag(g) + 1e-4 * np.trace(g) / len(g)
        a = (g + (d - np.diag(g)) * np.eye(len(g))) / np.sqrt(d[:, None] * d[None, :])
        assert np.linalg.eigvalsh(0.5 * (a + a.T)).min() > 0
        if mask is None:
            np.testing.assert_allclose(
                s["gram"], fp32["gram"], rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(fp32["gram"])))
            )
        sol = solve({"l": {"layer": layer, **s}})
        # Fewer rows than inputs: float64 Cholesky from the start (ls_solve.first_solver).
        assert sol["l"]["solver"] == "cholesky_f64"


# ---------------------------------------------------------------- 8 devices
_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from pleas_jax import distributed, models, partial
    from pleas_jax.ls_layers import find_layers, weights_of
    from pleas_jax.ls_statistics import layer_statistics
    from pleas_jax.permutation import identity
    from pleas_jax.spec import derive_spec
    from tests.helpers import images, init, max_relative_difference, randomize_norms

    assert len(jax.devices()) == 8, jax.devices()
    m = models.resnet20(num_classes=4, width=4)
    va = randomize_norms(init(m, 16), seed=1)
    vb = randomize_norms(init(m, 16, seed=3), seed=2)
    spec = derive_spec(m, va, np.zeros((1, 16, 16, 3), np.float32))
    blocks = partial.full_blocks(spec, identity(spec), 0.5)
    _, vm = partial.partial_merge(m, spec, blocks, va, vb)
    # Every kind of layer (stem, strided 3x3, 1x1 downsample, block-split
    # 3x3, classifier with bias), not all 21: compilation dominates this test.
    names = ["conv1", "layer2_0/conv1", "layer2_0/downsample_0", "layer3_2/conv2", "fc"]
    found = find_layers(m, va, spec, blocks, np.zeros((1, 16, 16, 3), np.float32))
    w0 = weights_of(vm, {{n: found[n] for n in names}})
    out = {{}}
    for bs in (7, 33):
        # Two batches of one shape: accumulation is covered, compilations few.
        batches = [images(bs, 16, seed=bs), images(bs, 16, seed=bs + 1)]
        one = layer_statistics(m, va, m, vb, spec, blocks, batches, init=w0, layers=names,
                               mesh=distributed.data_mesh(jax.devices()[:1]))
        eight = layer_statistics(m, va, m, vb, spec, blocks, batches, init=w0, layers=names,
                                 mesh=distributed.data_mesh())
        assert list(one) == names
        assert all(float(s["count"]) > 0 for s in one.values())
        out[bs] = max_relative_difference(one, eight, skip=("layer",))
    print(json.dumps(out))
    """
)


def test_eight_devices_equal_one():
    worst = run_on_cpu_devices(_SHARDED)
    print("8 vs 1 device, max relative difference per batch size:", worst)
    assert set(worst) == {"7", "33"}
    assert all(v <= 1e-5 for v in worst.values()), worst
