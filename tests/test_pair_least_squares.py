"""Least squares from pair statistics against per-merge statistics (a second
implementation), the ensemble at budget 2, the block mask, the gradient mode."""

import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models, partial
from pleas_jax.least_squares import find_layers, layer_statistics, least_squares
from pleas_jax.matching.activations import activation_matching
from pleas_jax.pair_least_squares import (
    _project,
    fit,
    full_coordinate_blocks,
    pair_statistics,
)
from pleas_jax.pair_problems import _problem
from pleas_jax.permutation import identity
from pleas_jax.spec import derive_spec
from tests.helpers import init, resnet20_pair

SIZE = 16


@pytest.fixture(scope="module")
def pair():
    m, va, vb, spec, batches = resnet20_pair(width=8, size=SIZE, batches=3, batch_size=32)
    perm, costs = activation_matching(m, va, m, vb, spec, batches[:1])
    stats = pair_statistics(m, va, m, vb, spec, batches)
    return m, va, vb, spec, batches, perm, costs, stats


def _merge(pair, ratio):
    m, va, vb, spec, batches, perm, costs, _ = pair
    blocks = partial.make_blocks(spec, perm, costs, ratio)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    return blocks, mm, vm


def _scale(x):
    return float(jnp.max(jnp.abs(x)))


def test_full_coordinates_are_the_budget_two_identity_layout(pair):
    m, va, vb, spec, batches, *_, stats = pair
    layers = find_layers(m, va, spec, full_coordinate_blocks(spec), batches[0][:1])
    assert stats.layers == layers
    # The classifier sees one row per image, the stem one per pixel.
    n = sum(len(b) for b in batches)
    assert float(stats.sums["fc"]["count"]) == n
    assert float(stats.sums["conv1"]["count"]) == n * SIZE * SIZE
    for name, s in stats.sums.items():
        lay = layers[name]
        assert s["gram"].shape == (lay.dim, lay.dim) and s["cross"].shape == (lay.dim, lay.c_out)
        assert s["target_gram"].shape == (lay.c_out, lay.c_out)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7])
def test_projected_solution_equals_per_merge_solution(pair, ratio):
    m, va, vb, spec, batches, *_ = pair
    blocks, mm, vm = _merge(pair, ratio)
    ref, ref_report = least_squares(m, va, m, vb, spec, blocks, mm, vm, batches)
    got, report = fit(pair[-1], blocks, vm)
    assert report["statistics"] == "pair"
    x = np.concatenate(batches)
    ref_logits, got_logits = mm.apply(ref, x), mm.apply(got, x)
    err = _scale(got_logits - ref_logits) / _scale(ref_logits)
    print(f"ratio {ratio}: max |pair - per-merge| / max |logit| = {err:.2e}")
    assert err <= 2e-3
    for n, r in report["layers"].items():
        want = ref_report["layers"][n]
        # Residuals from the projected sums vs from per-merge sums; the pair
        # form subtracts energies, so compare on the scale of the targets.
        for key in ("before", "after"):
            assert abs(r[key] - want[key]) <= 1e-3 * want["before"] + 1e-6, (n, key, r, want)
        assert r["after"] <= r["before"] * (1 + 1e-4) + 1e-7, (n, r)


def test_mask_is_respected_and_budget_two_keeps_the_ensemble(pair):
    m, va, vb, spec, batches, *_ = pair
    blocks, mm, vm = _merge(pair, 1.0)
    got, _ = fit(pair[-1], blocks, vm)
    x = np.concatenate(batches)
    ens = 0.5 * (m.apply(va, x) + m.apply(vb, x))
    err = _scale(mm.apply(got, x) - ens) / _scale(ens)
    print(f"budget 2: max |merged - ensemble| / max |logit| = {err:.2e}")
    assert err <= 1e-3
    blocks, mm, vm = _merge(pair, 0.5)
    got, _ = fit(pair[-1], blocks, vm)
    for name, lay in find_layers(m, va, spec, blocks, x[:1]).items():
        node = got["params"]
        for key in lay.path:
            node = node[key]
        k = np.asarray(node["kernel"])
        mi, ai, _ = lay.in_splits
        mo, ao, _ = lay.out_splits
        assert not np.any(k[..., mi + ai :, mo : mo + ao]), name
        assert not np.any(k[..., mi : mi + ai, mo + ao :]), name


def test_gradient_mode_approaches_the_closed_form(pair):
    blocks, mm, vm = _merge(pair, 0.3)
    _, closed = fit(pair[-1], blocks, vm)
    _, gd = fit(pair[-1], blocks, vm, mode="gd", steps=200, learning_rate=2e-3)
    gain_gd = gain_cf = 0.0
    for n, r in gd["layers"].items():
        c = closed["layers"][n]
        assert r["method"] == "gd"
        # Never below the exact minimum, and it makes progress from W0.
        assert r["after"] >= c["after"] * (1 - 1e-3) - 1e-7, (n, r, c)
        gain_gd += r["before"] - r["after"]
        gain_cf += c["before"] - c["after"]
    print(f"gd recovers {gain_gd / gain_cf:.3f} of the closed form's reduction")
    assert gain_gd >= 0.5 * gain_cf


def test_blocks_of_another_pair_are_rejected(pair):
    m, va, vb, spec, *_ = pair
    other = models.resnet20(num_classes=10, width=4)
    vo = init(other, SIZE)
    so = derive_spec(other, vo, np.zeros((1, SIZE, SIZE, 3), np.float32))
    blocks = partial.full_blocks(so, identity(so), 0.5)
    with pytest.raises(ValueError, match="units in the pair statistics"):
        fit(pair[-1], blocks, vo)
    with pytest.raises(ValueError, match="mode must be"):
        fit(pair[-1], _merge(pair, 0.5)[0], _merge(pair, 0.5)[2], mode="adam")
    # A backbone without the classifier the sums were taken with (separate heads).
    blocks, _, vm = _merge(pair, 0.5)
    backbone = {**vm, "params": {k: v for k, v in vm["params"].items() if k != "fc"}}
    with pytest.raises(ValueError, match=r"layers the merged model lacks \(fc\)"):
        fit(pair[-1], blocks, backbone)


@pytest.mark.parametrize("mode", ["closed_form", "gd"])  # padded differently
def test_per_merge_statistics_reproduce_projected_grams(pair, mode):
    # The projection itself, not only the solve: Gram and cross of one layer.
    m, va, vb, spec, batches, *_, stats = pair
    blocks, mm, vm = _merge(pair, 0.4)
    direct = layer_statistics(m, va, m, vb, spec, blocks, batches, layers=["layer2_0/conv1"])
    p = _problem("layer2_0/conv1", stats.layers["layer2_0/conv1"], blocks, vm, mode)
    g, c, t = _project(stats.sums["layer2_0/conv1"], p.args["rows"], p.args["cols"])
    d, k = p.layer.dim, p.layer.c_out
    s = direct["layer2_0/conv1"]
    np.testing.assert_allclose(
        np.asarray(g)[:d, :d], s["gram"], rtol=1e-5, atol=1e-5 * _scale(s["gram"])
    )
    np.testing.assert_allclose(
        np.asarray(c)[:d, :k], s["cross"], rtol=1e-5, atol=1e-5 * _scale(s["cross"])
    )
    np.testing.assert_allclose(np.asarray(t)[:k], s["target_sq"], rtol=1e-5)
    assert not np.any(np.asarray(g)[d:]) and not np.any(np.asarray(c)[:, k:])
