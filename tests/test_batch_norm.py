"""BatchNorm recompute against Flax's own batch statistics and plain numpy."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models
from pleas_jax.batch_norm import recompute_batch_norm
from pleas_jax.tree import flatten
from tests.helpers import images, init, randomize_norms


def _model():
    m = models.resnet20(num_classes=3, width=4)
    return m, randomize_norms(init(m, 16), 1)


def test_one_batch_equals_flax_batch_statistics(monkeypatch):
    m, v = _model()
    x = images(10, 16)
    new = recompute_batch_norm(m, v, [x])
    # momentum 0 makes Flax store exactly the batch's (biased) statistics.
    monkeypatch.setattr(sys.modules["pleas_jax.models.resnet"], "BN_MOMENTUM", 0.0)
    _, state = m.apply(v, x, train=True, mutable=["batch_stats"])
    ref = flatten(state["batch_stats"])
    got = flatten(new["batch_stats"])
    assert ref.keys() == got.keys()
    for p in ref:
        np.testing.assert_allclose(got[p], ref[p], rtol=2e-4, atol=1e-5, err_msg=str(p))


def test_first_layer_is_the_population_moments_over_all_batches():
    m, v = _model()
    batches = [images(n, 16, seed=n) for n in (3, 8, 5)]
    new = recompute_batch_norm(m, v, batches)
    feats = []
    for x in batches:
        _, st = m.apply(v, x, mutable=["features"])
        feats.append(np.asarray(st["features"]["conv1"]["out"], np.float64).reshape(-1, 4))
    allf = np.concatenate(feats)
    np.testing.assert_allclose(
        new["batch_stats"]["bn1"]["mean"], allf.mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(new["batch_stats"]["bn1"]["var"], allf.var(0), rtol=1e-4, atol=1e-6)
    # Deeper layers changed too, and the params are untouched.
    assert not np.allclose(
        new["batch_stats"]["layer3_2"]["bn2"]["var"], v["batch_stats"]["layer3_2"]["bn2"]["var"]
    )
    assert new["params"] is v["params"]


def test_no_data_is_an_error():
    m, v = _model()
    with pytest.raises(ValueError, match="at least one non-empty batch"):
        recompute_batch_norm(m, v, [])


def test_stable_when_mean_dwarfs_spread():
    # A large common offset must not cancel the variance away (float32).
    m, v = _model()
    x = images(8, 16) * 1e-3 + 300.0
    new = recompute_batch_norm(m, v, [x[:4], x[4:]])
    _, st = m.apply(v, jnp.asarray(x), mutable=["features"])
    f = np.asarray(st["features"]["conv1"]["out"], np.float64).reshape(-1, 4)
    np.testing.assert_allclose(new["batch_stats"]["bn1"]["var"], f.var(0), rtol=1e-2)
