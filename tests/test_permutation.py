"""Permutation algebra and application to variables pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models
from pleas_jax.permutation import apply_permutation, compose, identity, invert, random
from pleas_jax.spec import Group, derive_spec
from pleas_jax.tree import flatten, map_with_path


def _toy():
    """A two-layer MLP's variables and spec, by hand: hidden units of size 5."""
    rng = np.random.default_rng(0)
    variables = {
        "params": {
            "l0": {"kernel": rng.normal(size=(3, 5)), "bias": rng.normal(size=5)},
            "l1": {"kernel": rng.normal(size=(5, 4)), "bias": rng.normal(size=4)},
        },
        "batch_stats": {"bn": {"mean": rng.normal(size=5)}},
    }
    spec = {
        "hidden": Group(
            5,
            (
                (("params", "l0", "kernel"), 1),
                (("params", "l0", "bias"), 0),
                (("batch_stats", "bn", "mean"), 0),
                (("params", "l1", "kernel"), 0),
            ),
        ),
        "square": Group(4, ((("params", "l1", "kernel"), 1), (("params", "l1", "bias"), 0))),
    }
    return variables, spec


def _assert_same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)  # jit returns dicts with sorted keys
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=path)


def test_apply_moves_units():
    v, spec = _toy()
    perm = {"hidden": np.array([4, 0, 1, 3, 2]), "square": np.array([1, 0, 3, 2])}
    out = apply_permutation(v, spec, perm)
    # New unit i is old unit perm[i], along every axis of the group.
    np.testing.assert_array_equal(
        out["params"]["l0"]["kernel"], v["params"]["l0"]["kernel"][:, perm["hidden"]]
    )
    np.testing.assert_array_equal(
        out["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"][perm["hidden"]]
    )
    np.testing.assert_array_equal(
        out["params"]["l1"]["kernel"],
        v["params"]["l1"]["kernel"][perm["hidden"]][:, perm["square"]],
    )
    # The function x -> relu(x W0 + b0) W1 + b1 is unchanged up to its outputs.
    x = np.random.default_rng(1).normal(size=(2, 3))

    def f(t):
        p = t["params"]
        h = np.maximum(x @ p["l0"]["kernel"] + p["l0"]["bias"], 0)
        return h @ p["l1"]["kernel"] + p["l1"]["bias"]

    np.testing.assert_allclose(f(out), f(v)[:, perm["square"]], rtol=1e-12)


def test_leaves_outside_the_spec_are_untouched():
    v, spec = _toy()
    v["params"]["other"] = {"w": np.ones(5)}
    out = apply_permutation(v, {"hidden": spec["hidden"]}, random(spec, 0))
    assert out["params"]["other"]["w"] is v["params"]["other"]["w"]
    assert out["params"]["l1"]["bias"] is v["params"]["l1"]["bias"]


def test_identity_and_inverse():
    v, spec = _toy()
    _assert_same(apply_permutation(v, spec, identity(spec)), v)
    p = random(spec, seed=3)
    for k in spec:
        assert sorted(p[k]) == list(range(spec[k].size))
        np.testing.assert_array_equal(compose(p, invert(p))[k], np.arange(spec[k].size))
        np.testing.assert_array_equal(compose(invert(p), p)[k], np.arange(spec[k].size))
        np.testing.assert_array_equal(invert(invert(p))[k], p[k])
    # Permuting and permuting back restores every leaf exactly.
    _assert_same(apply_permutation(apply_permutation(v, spec, p), spec, invert(p)), v)


def test_compose_order():
    v, spec = _toy()
    p, q = random(spec, seed=1), random(spec, seed=2)
    twice = apply_permutation(apply_permutation(v, spec, q), spec, p)
    _assert_same(twice, apply_permutation(v, spec, compose(p, q)))
    assert not all(np.array_equal(compose(p, q)[k], compose(q, p)[k]) for k in spec)
    # Associative, and a group missing from one side is taken from the other.
    r = random(spec, seed=4)
    for k in spec:
        np.testing.assert_array_equal(compose(compose(p, q), r)[k], compose(p, compose(q, r))[k])
    half = compose({"hidden": p["hidden"]}, q)
    np.testing.assert_array_equal(half["square"], q["square"])


def test_jax_random_and_jit_with_traced_permutations():
    v, spec = _toy()
    p = random(spec, jax.random.key(0))
    assert all(isinstance(a, jax.Array) for a in p.values())
    for k in spec:
        assert sorted(np.asarray(p[k]).tolist()) == list(range(spec[k].size))

    @jax.jit
    def roundtrip(v, p):
        moved = apply_permutation(v, spec, p)
        return moved, apply_permutation(moved, spec, invert(p)), compose(p, invert(p))

    v32 = map_with_path(lambda _, x: jnp.asarray(x, jnp.float32), v)
    moved, back, ident = roundtrip(v32, p)
    _assert_same(back, v32)
    _assert_same(moved, apply_permutation(v32, spec, {k: np.asarray(a) for k, a in p.items()}))
    for k in spec:
        np.testing.assert_array_equal(ident[k], np.arange(spec[k].size))


def test_errors_name_the_group():
    v, spec = _toy()
    with pytest.raises(KeyError, match="no entry for group 'square'"):
        apply_permutation(v, spec, {"hidden": np.arange(5)})
    with pytest.raises(ValueError, match="group 'hidden' has size 5"):
        apply_permutation(v, spec, {"hidden": np.arange(4), "square": np.arange(4)})
    with pytest.raises(KeyError, match="params/l0/kernel is not in the variables"):
        apply_permutation({"batch_stats": v["batch_stats"]}, spec, identity(spec))
    # Non-strict: permute what is there (e.g. only the statistics).
    p = random(spec, 0)
    out = apply_permutation({"batch_stats": v["batch_stats"]}, spec, p, strict=False)
    np.testing.assert_array_equal(
        out["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"][p["hidden"]]
    )


def test_permuting_every_group_keeps_a_resnet_function():
    m = models.resnet20(num_classes=10)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    shapes = jax.eval_shape(m.init, jax.random.key(0), x)

    def leaf(path, s):
        if len(s.shape) >= 2:
            return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        low = 0.5 if path[-1] in ("scale", "var") else -0.5
        return rng.uniform(low, 1.5, s.shape).astype(np.float32)

    v = map_with_path(leaf, shapes)
    spec = derive_spec(m, v, x[:1])
    forward = jax.jit(lambda v: m.apply(v, x))
    permuted = apply_permutation(v, spec, random(spec, seed=7))
    y, y_perm = np.asarray(forward(v)), np.asarray(forward(permuted))
    np.testing.assert_allclose(y_perm, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
