"""Activation matching recovers planted permutations; sharding changes nothing."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models
from pleas_jax.matching import lap
from pleas_jax.matching.activations import (
    _moments,
    activation_matching,
    activation_statistics,
    feature_points,
    statistics_to_scores,
    with_compute_dtype,
)
from pleas_jax.models.layers import FEATURES
from pleas_jax.permutation import apply_permutation, invert
from pleas_jax.permutation import random as random_perm
from pleas_jax.spec import derive_spec
from pleas_jax.tree import flatten, path_str, unflatten
from tests.helpers import images, init, randomize_norms, run_on_cpu_devices


def _pair(arch, noise, size=32, width=16):
    module = models.resnet(arch, num_classes=10, width=width)
    va = randomize_norms(init(module, size), seed=1)
    spec = derive_spec(module, va, np.zeros((1, size, size, 3), np.float32))
    planted = random_perm(spec, jax.random.key(7))
    vb = apply_permutation(va, spec, planted)
    if noise:
        rng = np.random.default_rng(0)
        vb = unflatten(
            {
                p: v + noise * np.std(v) * rng.normal(size=np.shape(v)).astype(np.float32)
                for p, v in flatten(vb).items()
            }
        )
    return module, va, vb, spec, planted


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_recovers_planted_permutation_every_similarity(arch, noise):
    module, va, vb, spec, planted = _pair(arch, noise)
    batches = [images(8, seed=s) for s in range(2)]
    expected = invert(planted)
    stats = {
        sim: activation_statistics(module, va, module, vb, spec, batches, sim)
        for sim in ("distance", "correlation")
    }
    stats["inner"] = stats["distance"]  # cross moments are the same sums
    for sim, st in stats.items():
        scores = statistics_to_scores(st, sim)
        for g in spec:
            np.testing.assert_array_equal(
                lap.solve(scores[g]), np.asarray(expected[g]), err_msg=f"{sim} {g}"
            )


def test_public_call_and_original_coordinates():
    module, va, vb, spec, planted = _pair("resnet20", 0.0, size=16, width=8)
    perm, costs = activation_matching(
        module, va, module, vb, spec, [images(6, 16, seed=1)], "correlation"
    )
    expected = invert(planted)
    for g in spec:
        np.testing.assert_array_equal(perm[g], np.asarray(expected[g]))
        # B = A permuted, so a matched pair sees identical features: correlation
        # 1 at every point of the group.
        n_points = len(feature_points(spec, va)[g])
        rows = np.arange(spec[g].size)
        assert np.all(costs[g][rows, perm[g]] <= n_points + 1e-4)
        assert np.all(costs[g][rows, perm[g]] >= 0.99 * np.max(costs[g], axis=1))


def test_rejects_models_of_other_widths_before_work():
    a = models.resnet20(num_classes=5, width=8)
    b = models.resnet20(num_classes=5, width=4)
    va, vb = init(a, 16), init(b, 16)
    spec = derive_spec(a, va, np.zeros((1, 16, 16, 3), np.float32))

    def no_batches():
        raise AssertionError("data was read before the check")
        yield

    with pytest.raises(ValueError, match="different architecture or widths"):
        activation_matching(a, va, b, vb, spec, no_batches())


def test_empty_data_is_an_error():
    module, va, vb, spec, _ = _pair("resnet20", 0.0, size=16, width=4)
    with pytest.raises(ValueError, match="at least one batch"):
        activation_matching(module, va, module, vb, spec, [])
    # One array of images, not a list of batches: named, not a Flax shape error.
    with pytest.raises(ValueError, match=r"got a batch of shape \(16, 16, 3\).*not one array"):
        activation_matching(module, va, module, vb, spec, images(4, 16))


def test_a_callable_of_batches_is_read_like_the_batches():
    module, va, vb, spec, _ = _pair("resnet20", 0.0, size=16, width=4)
    data = [images(6, 16, seed=1), images(5, 16, seed=2)]
    listed = activation_matching(module, va, module, vb, spec, data)
    called = activation_matching(module, va, module, vb, spec, lambda: iter(data))
    for g in spec:
        np.testing.assert_array_equal(listed[0][g], called[0][g])
        np.testing.assert_array_equal(listed[1][g], called[1][g])


_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from pleas_jax import distributed, models
    from pleas_jax.matching.activations import activation_statistics
    from pleas_jax.spec import derive_spec
    from tests.helpers import images, init, max_relative_difference, randomize_norms

    assert len(jax.devices()) == 8, jax.devices()
    m = models.resnet20(num_classes=4, width=4)
    va = randomize_norms(init(m, 16), seed=1)
    vb = randomize_norms(init(m, 16, seed=3), seed=2)
    spec = derive_spec(m, va, np.zeros((1, 16, 16, 3), np.float32))
    out = {{}}
    for bs in (7, 8, 33):
        batches = [images(bs, 16, seed=bs), images(5, 16, seed=bs + 1)]
        one = activation_statistics(m, va, m, vb, spec, batches, "distance",
                                    mesh=distributed.data_mesh(jax.devices()[:1]))
        eight = activation_statistics(m, va, m, vb, spec, batches, "distance",
                                      mesh=distributed.data_mesh())
        out[bs] = max_relative_difference(one, eight)
        assert one[next(iter(one))]["count"] > 0
    print(json.dumps(out))
    """
)


def test_eight_devices_equal_one():
    worst = run_on_cpu_devices(_SHARDED)
    print("8 vs 1 device, max relative difference per batch size:", worst)
    assert set(worst) == {"7", "8", "33"}
    assert all(v <= 1e-5 for v in worst.values()), worst


def test_bfloat16_moments_accumulate_in_float32():
    # 16,384 rows of bf16 features: a bf16 result (8 bits of mantissa) would be
    # off by ~4e-3; fp32 accumulation of the exact bf16 products is ~1e-7 off
    # the float64 sums of the same numbers.
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(16384, 48)) + 1.0, jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(16384, 40)) - 0.5, jnp.bfloat16)
    w = jnp.asarray(rng.random(16384) < 0.8, jnp.float32)  # padded rows masked out
    s = jax.jit(lambda a, b, w: _moments(a, b, w, True))(a, b, w)
    a64, b64, w64 = (np.asarray(v, np.float64) for v in (a, b, w))
    truth = {
        "cross": (a64 * w64[:, None]).T @ b64,
        "sum_a": w64 @ a64,
        "sum_b": w64 @ b64,
        "sq_a": w64 @ (a64 * a64),
        "sq_b": w64 @ (b64 * b64),
        "count": w64.sum(),
    }
    for name, v in truth.items():
        assert s[name].dtype == jnp.float32, name
        np.testing.assert_allclose(
            np.asarray(s[name]), v, rtol=1e-6, atol=1e-6 * np.max(np.abs(v)), err_msg=name
        )


def test_bfloat16_compute_runs_the_models_in_bfloat16():
    module = models.resnet20(num_classes=4, width=4)
    va = init(module, 16)
    _, feats = with_compute_dtype(module, "bfloat16").apply(va, images(2, 16), mutable=[FEATURES])
    dtypes = {str(f.dtype) for f in flatten(feats[FEATURES]).values()}
    assert dtypes == {"bfloat16"}, dtypes
    assert module.dtype == jnp.float32  # the caller's module is left as it was


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_bfloat16_matching_stays_within_tolerance_of_float32(noise):
    module, va, vb, spec, planted = _pair("resnet18", noise)
    batches = [images(8, seed=s) for s in range(2)]
    expected = invert(planted)
    worst = {"distance": 0.0, "correlation": 0.0}
    for sim in worst:
        st32 = activation_statistics(module, va, module, vb, spec, batches, sim)
        st16 = activation_statistics(module, va, module, vb, spec, batches, sim, dtype="bfloat16")
        s32, s16 = statistics_to_scores(st32, sim), statistics_to_scores(st16, sim)
        for g in spec:
            if sim == "distance":
                rel = np.max(np.abs(s16[g] - s32[g])) / np.max(np.abs(s32[g]))
            else:
                # Entrywise, correlation is ill-conditioned for nearly dead
                # ReLU units (a few 1e-4 values round to zeros in bf16, and the
                # unit's correlations jump from ~0.9 to 0): compare norms.
                rel = np.linalg.norm(s16[g] - s32[g]) / np.linalg.norm(s32[g])
            worst[sim] = max(worst[sim], float(rel))
            # The matching itself is the result that must not change.
            np.testing.assert_array_equal(
                lap.solve(s16[g]), np.asarray(expected[g]), err_msg=f"{sim} {g}"
            )
    # Measured: distance 4.7e-3 (largest entry), correlation 3.6e-2 (norm).
    print(f"noise {noise}: bf16 vs fp32 scores, relative difference {worst}")
    assert worst["distance"] <= 1e-2 and worst["correlation"] <= 5e-2, worst


def test_compute_dtype_errors():
    module, va, vb, spec, _ = _pair("resnet20", 0.0, size=16, width=4)
    with pytest.raises(ValueError, match="must be floating"):
        activation_statistics(module, va, module, vb, spec, [images(2, 16)], dtype="int32")
    with pytest.raises(ValueError, match="unknown dtype"):
        activation_statistics(module, va, module, vb, spec, [images(2, 16)], dtype="bfloat17")


def _recorded(module, variables, batches):
    """Per batch, every recorded feature of the model (path -> array)."""
    return [flatten(module.apply(variables, x, mutable=[FEATURES])[1][FEATURES]) for x in batches]


def _float64_moments(recorded_a, recorded_b, pt):
    """Cross moment, sums and per-batch distances of one point, in float64 numpy,
    from :func:`_recorded` features of the two models."""
    truth = {"cross": 0.0, "sum_a": 0.0, "sum_b": 0.0, "sq_a": 0.0, "sq_b": 0.0, "neg_dist": 0.0}
    for fa, fb in zip(recorded_a, recorded_b, strict=True):
        a, b = (np.asarray(f[pt], np.float64) for f in (fa, fb))
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        cross, sq_a, sq_b = a.T @ b, (a * a).sum(0), (b * b).sum(0)
        batch = {
            "cross": cross,
            "sum_a": a.sum(0),
            "sum_b": b.sum(0),
            "sq_a": sq_a,
            "sq_b": sq_b,
            "neg_dist": -np.sqrt(np.maximum(sq_a[:, None] + sq_b[None, :] - 2 * cross, 0.0)),
        }
        truth = {k: truth[k] + v for k, v in batch.items()}
    return truth


def test_normalisation_outputs_are_derived_from_their_inputs_exactly():
    # A BN output in inference mode is an affine map of the conv output it
    # reads; its moments come from the conv output's (no product of its own).
    # Checked against float64 sums over the recorded features of two
    # different models with trained-like norms.
    import pleas_jax.matching.activations as act

    module = models.resnet("resnet50", num_classes=10, width=8)
    va = randomize_norms(init(module, 32), seed=1)
    vb = randomize_norms(init(module, 32, seed=5), seed=2)
    spec = derive_spec(module, va, np.zeros((1, 32, 32, 3), np.float32))
    batches = [images(4, seed=s) for s in range(2)]
    derived = []
    original = act._affine_moments

    def counting(m, *affine):
        derived.append(1)
        return original(m, *affine)

    act._affine_moments = counting
    act._compiled_step.cache_clear()  # trace anew, through the counting wrapper
    try:
        stats = activation_statistics(module, va, module, vb, spec, batches, "distance")
    finally:
        act._affine_moments = original
    points = {(g, path_str(pt)): pt for g, pts in feature_points(spec, va).items() for pt in pts}
    norm_points = [
        k for k in stats if points[k][-2].startswith("bn") or points[k][-2] == "downsample_1"
    ]
    # Every bottleneck's three BNs and every shortcut BN (16 + 4 blocks' worth).
    assert len(derived) == len(norm_points) == 53
    worst = 0.0
    recorded_a, recorded_b = _recorded(module, va, batches), _recorded(module, vb, batches)
    for key in norm_points:
        truth = _float64_moments(recorded_a, recorded_b, points[key])
        for name, v in truth.items():
            err = np.max(np.abs(stats[key][name] - v)) / np.max(np.abs(v))
            worst = max(worst, float(err))
    # Measured 8.5e-7 (a distance next to zero); float32 round-off of the sums.
    assert worst <= 1e-5, worst


@pytest.mark.parametrize(("precision", "bound"), [("bf16_3x", 2e-5), ("bfloat16", 5e-3)])
def test_precision_modes_of_the_cross_moments(precision, bound):
    module, va, vb, spec, planted = _pair("resnet18", 0.01)
    batches = [images(8, seed=s) for s in range(2)]
    ref = statistics_to_scores(
        activation_statistics(module, va, module, vb, spec, batches, "inner"), "inner"
    )
    got = statistics_to_scores(
        activation_statistics(module, va, module, vb, spec, batches, "inner", precision=precision),
        "inner",
    )
    expected = invert(planted)
    worst = 0.0
    for g in spec:
        worst = max(worst, float(np.max(np.abs(got[g] - ref[g])) / np.max(np.abs(ref[g]))))
        np.testing.assert_array_equal(lap.solve(got[g]), np.asarray(expected[g]), err_msg=g)
    # Measured: 2.3e-6 (bf16_3x), 9.0e-4 (bfloat16).
    print(f"{precision}: inner scores vs highest, largest relative difference {worst:.2e}")
    assert worst <= bound, worst


def test_bad_precision_is_an_error():
    module, va, vb, spec, _ = _pair("resnet20", 0.0, size=16, width=4)
    with pytest.raises(ValueError, match="precision must be one of"):
        activation_statistics(module, va, module, vb, spec, [images(2, 16)], precision="tf16")


def test_correlation_of_a_constant_unit_is_zero_not_rounding_noise():
    """A dead channel after BatchNorm is constant (here 5.0): its float32
    variance and covariances are rounding noise, whose ratio once scored ~12
    and took a live unit's partner. Truth: numpy's Pearson correlation in
    float64 of the same features (0 where a unit is constant)."""
    rng = np.random.default_rng(0)
    n, count = 6, 20_000
    a = (3.0 + rng.normal(size=(count, n))).astype(np.float32)
    a[:, 0] = 5.0
    perm = rng.permutation(n)
    b = (a[:, perm] + 0.3 * rng.normal(size=(count, n))).astype(np.float32)
    b[:, np.flatnonzero(perm == 0)] = 5.0  # the constant unit's partner is constant too

    def f32_sum(x):
        return np.sum(x, axis=0, dtype=np.float32)

    stats = {
        ("g", "p"): {
            "cross": a.T @ b,  # float32 products and sums, as the kernels give
            "sum_a": f32_sum(a),
            "sum_b": f32_sum(b),
            "sq_a": f32_sum(a * a),
            "sq_b": f32_sum(b * b),
            "count": np.float32(count),
        }
    }
    got = statistics_to_scores(stats, "correlation")["g"]
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.corrcoef(a.T.astype(np.float64), b.T.astype(np.float64))[:n, n:]
    want = np.nan_to_num(want)
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.all(np.abs(got) <= 1.0)
    assert np.all(got[0] == 0) and np.all(got[:, perm == 0] == 0)
    # B's unit j is A's unit perm[j]: the live units find their planted
    # partners; the constant one takes what is left.
    np.testing.assert_array_equal(lap.solve(got)[1:], np.argsort(perm)[1:])
