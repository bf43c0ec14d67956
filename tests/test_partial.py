"""Partial merging: block choice, merged variables, block-sparse evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models, partial
from pleas_jax.permutation import apply_permutation, identity, invert
from pleas_jax.permutation import random as random_perm
from pleas_jax.spec import derive_spec
from pleas_jax.tree import flatten
from tests.helpers import images, init, randomize_norms


def _pair(arch="resnet20", size=16, width=4, classes=5):
    m = models.resnet(arch, num_classes=classes, width=width)
    va = randomize_norms(init(m, size), 1)
    vb = randomize_norms(init(m, size, seed=2), 3)
    spec = derive_spec(m, va, np.zeros((1, size, size, 3), np.float32))
    return m, va, vb, spec


def test_rounding_is_half_up():
    assert [partial.n_separate(5, r) for r in (0.0, 0.1, 0.5, 0.9, 1.0)] == [0, 1, 3, 5, 5]
    # Exact decimal ties, checked with integers: r = k / 1000 of n units is
    # k * n / 1000, rounded half up, even where r * n lands a hair below the tie.
    for n in range(1, 101):
        for k in range(1001):
            assert partial.n_separate(n, k / 1000) == (2 * k * n + 1000) // 2000, (n, k)
        # Whole units come back exactly.
        assert [partial.n_separate(n, j / n) for j in range(n + 1)] == list(range(n + 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        partial.n_separate(4, 1.5)


def test_best_pairs_are_merged():
    from pleas_jax.spec import Group

    spec = {"g": Group(4, ((("params", "w"), 0),))}
    perm = {"g": np.array([2, 0, 3, 1])}
    costs = np.zeros((4, 4))
    costs[np.arange(4), perm["g"]] = [0.1, 0.9, 0.5, 0.2]
    bl = partial.make_blocks(spec, perm, {"g": costs}, 0.5)["g"]
    np.testing.assert_array_equal(bl.merged_a, [1, 2])
    np.testing.assert_array_equal(bl.merged_b, [0, 3])
    np.testing.assert_array_equal(bl.only_a, [0, 3])
    np.testing.assert_array_equal(bl.only_b, [2, 1])
    assert bl.sizes == (2, 2, 2) and bl.width == 6
    with pytest.raises(ValueError, match="not a permutation"):
        partial.make_blocks(spec, {"g": np.array([0, 0, 1, 2])}, {"g": costs}, 0.5)


@pytest.mark.parametrize("arch,size", [("resnet20", 16), ("resnet18", 32)])
def test_budget_two_is_the_ensemble(arch, size):
    m, va, vb, spec = _pair(arch, size, width=4 if arch == "resnet20" else 8)
    blocks = partial.full_blocks(spec, identity(spec), 1.0)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    x = images(4, size)
    ref = 0.5 * (m.apply(va, x) + m.apply(vb, x))
    np.testing.assert_allclose(mm.apply(vm, x), ref, atol=1e-5 * float(jnp.abs(ref).max()))
    # Separate classifier columns are halved, the bias averaged.
    n = spec[next(g for g in spec if any(p[1] == "fc" for p, _ in spec[g].axes))].size
    fc = vm["params"]["fc"]
    np.testing.assert_allclose(fc["kernel"][:n], 0.5 * va["params"]["fc"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(
        fc["bias"], 0.5 * (va["params"]["fc"]["bias"] + vb["params"]["fc"]["bias"]), rtol=1e-6
    )


def test_separate_blocks_never_meet():
    m, va, vb, spec = _pair()
    blocks = partial.full_blocks(spec, identity(spec), 0.5)
    _, vm = partial.partial_merge(m, spec, blocks, va, vb)
    kernel = np.asarray(vm["params"]["layer2_1"]["conv2"]["kernel"])
    g_in = next(g for g in spec if (("params", "layer2_1", "conv2", "kernel"), 2) in spec[g].axes)
    g_out = next(g for g in spec if (("params", "layer2_1", "conv2", "kernel"), 3) in spec[g].axes)
    mi, ai, bi = blocks[g_in].sizes
    mo, ao, bo = blocks[g_out].sizes
    assert ai > 0 and bo > 0
    assert np.all(kernel[:, :, mi : mi + ai, mo + ao :] == 0)
    assert np.all(kernel[:, :, mi + ai :, mo : mo + ao] == 0)
    assert np.any(kernel[:, :, :mi, mo:] != 0)


def test_costs_of_the_wrong_shape_are_refused():
    m, va, _, spec = _pair()
    g = next(iter(spec))
    n = spec[g].size
    costs = {h: np.zeros((grp.size, grp.size)) for h, grp in spec.items()}
    costs[g] = np.zeros((n, n - 1))
    with pytest.raises(ValueError, match=rf"costs\[{g}\] has shape \({n}, {n - 1}\)"):
        partial.make_blocks(spec, identity(spec), costs, 0.5)


def test_models_of_other_widths_are_refused():
    m, va, _, spec = _pair()
    wide = models.resnet("resnet20", num_classes=5, width=8)
    blocks = partial.full_blocks(spec, identity(spec), 0.5)
    with pytest.raises(ValueError, match=r"has 4 units on axis \d \(group .*\) in A but 8 in B"):
        partial.partial_merge(m, spec, blocks, va, init(wide, 16, seed=2))


def test_block_sparse_layers_equal_dense_evaluation():
    m, va, vb, spec = _pair()
    blocks = partial.full_blocks(spec, identity(spec), 0.6)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    assert mm.splits and all(isinstance(s[0], str) for s in mm.splits)
    dense = mm.clone(splits=())
    x = images(3, 16)
    np.testing.assert_allclose(mm.apply(vm, x), dense.apply(vm, x), rtol=1e-5, atol=1e-5)


def test_merging_a_permuted_copy_at_budget_one_gives_the_model_back():
    m, va, _, spec = _pair()
    planted = random_perm(spec, jax.random.key(0))
    vb = apply_permutation(va, spec, planted)
    perm = invert(planted)  # what matching returns for this pair
    blocks = partial.full_blocks(spec, perm, 0.0)
    mm, vm = partial.partial_merge(m, spec, blocks, va, vb)
    assert mm.stream_widths == m.stream_widths
    x = images(3, 16)
    np.testing.assert_allclose(mm.apply(vm, x), m.apply(va, x), rtol=1e-5, atol=1e-5)
    for p, v in flatten(va).items():
        np.testing.assert_allclose(flatten(vm)[p], v, rtol=1e-6, atol=1e-7)
