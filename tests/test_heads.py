"""Routed source heads on a merged backbone, and linear probes."""

import numpy as np
import pytest

from pleas_jax import heads, models, partial
from pleas_jax.permutation import identity
from pleas_jax.spec import derive_spec
from pleas_jax.train import accuracy
from tests.helpers import apply, images, init, randomize_norms


def _strip_fc(v):
    return {k: {n: t for n, t in c.items() if n != "fc"} for k, c in v.items()}


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_routed_heads_on_merged_backbone(ratio):
    ma, mb = models.resnet20(num_classes=3, width=4), models.resnet20(num_classes=4, width=4)
    va, vb = randomize_norms(init(ma, 16), 1), randomize_norms(init(mb, 16, seed=2), 3)
    spec = derive_spec(ma, va, np.zeros((1, 16, 16, 3), np.float32))
    (g_out,) = [g for g in spec if (("params", "fc", "kernel"), 0) in spec[g].axes]
    assert heads.head_group(spec) == g_out
    blocks = partial.full_blocks(spec, identity(spec), ratio)
    backbone = ma.clone(num_classes=None)
    mm, vm = partial.partial_merge(backbone, spec, blocks, _strip_fc(va), _strip_fc(vb))
    ha, hb = heads.route_heads(blocks[g_out], va["params"]["fc"], vb["params"]["fc"])
    x = images(5, 16)
    feats = mm.apply(vm, x)
    assert feats.shape == (5, blocks[g_out].width)
    la, lb = heads.apply_head(ha, feats), heads.apply_head(hb, feats)
    assert la.shape == (5, 3) and lb.shape == (5, 4)
    if ratio == 1.0:  # nothing merged: each head sees exactly its own model
        np.testing.assert_allclose(la, apply(ma, va, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lb, apply(mb, vb, x), rtol=1e-5, atol=1e-5)
    n_m, n_a, n_b = blocks[g_out].sizes
    assert np.all(np.asarray(ha["kernel"])[n_m + n_a :] == 0)
    assert np.all(np.asarray(hb["kernel"])[n_m : n_m + n_a] == 0)


def test_head_group_needs_exactly_one_group_feeding_the_classifier():
    m = models.resnet20(num_classes=3, width=4)
    spec = derive_spec(m, init(m, 8), np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="one group feeding params/head/kernel's inputs, found 0"):
        heads.head_group(spec, "head")


def test_linear_probe_learns_separable_classes():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, size=400)
    x = centers[y] + rng.normal(size=(400, 16))
    head = heads.train_linear_probe(
        x[:300], y[:300], 4, epochs=30, learning_rate=1e-2, batch_size=64
    )
    assert accuracy(heads.apply_head(head, x[300:]), y[300:]) > 0.95
    again = heads.train_linear_probe(
        x[:300], y[:300], 4, epochs=30, learning_rate=1e-2, batch_size=64
    )
    np.testing.assert_array_equal(head["kernel"], again["kernel"])  # seeded


def test_probe_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        heads.train_linear_probe(np.zeros((4, 2)), np.array([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="labels must be whole numbers"):
        heads.train_linear_probe(np.zeros((4, 2)), np.array([0, 0.5, 1, 2]), 3)
    for bad, message in (
        ({"batch_size": 0}, "batch_size must be a positive whole number"),
        ({"batch_size": -5}, "batch_size must be a positive whole number"),
        ({"epochs": -1}, "epochs must be a whole number >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            heads.train_linear_probe(np.zeros((4, 2)), np.array([0, 1, 2, 0]), 3, **bad)
