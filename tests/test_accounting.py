"""Compute / parameter accounting of merged models and the XLA cross-check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import accounting, budget, models, partial
from pleas_jax.spec import derive_spec
from tests.helpers import source_table

BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)


def _random_variables(shapes, seed):
    """Random float32 numpy leaves (non-zero, positive variances), fast on the host."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape)).astype(np.float32) + 0.1, shapes)


def _torchvision_macs(arch: str, size: int) -> int:
    """Conv + fc multiply-adds of torchvision's ResNets, from the architecture
    alone (padding taps included), written out independently of the tracer."""
    block, stages = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}[
        arch
    ]
    hw = (size + 6 - 7) // 2 + 1  # 7x7/2 stem, pad 3
    total = 49 * 3 * 64 * hw * hw
    hw = (hw + 2 - 3) // 2 + 1  # 3x3/2 max-pool, pad 1
    c_in = 64
    for s, n in enumerate(stages):
        planes = 64 * 2**s
        for j in range(n):
            stride = 2 if (s > 0 and j == 0) else 1
            out_hw = (hw - 1) // stride + 1
            if block == "basic":
                c_out = planes
                total += 9 * c_in * planes * out_hw**2 + 9 * planes * planes * out_hw**2
            else:
                c_out = 4 * planes
                total += c_in * planes * hw**2 + 9 * planes * planes * out_hw**2
                total += planes * c_out * out_hw**2
            if stride != 1 or c_in != c_out:
                total += c_in * c_out * out_hw**2
            c_in, hw = c_out, out_hw
    return total + c_in * 1000


# ------------------------------------------------------------------ accounting
@pytest.mark.parametrize(
    "arch, macs, n_params",
    [("resnet18", 1_814_073_344, 11_689_512), ("resnet50", 4_089_184_256, 25_557_032)],
)
def test_source_model_matches_torchvision_counts(arch, macs, n_params):
    _, _, spec, table = source_table(arch, 224)
    assert accounting.macs(table, spec, 0.0) == macs == _torchvision_macs(arch, 224)
    assert accounting.params(table, spec, 0.0) == (n_params, n_params)


def test_backbone_without_classifier():
    model = models.resnet20(None)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    spec = derive_spec(model, v, x, free_output=True)
    table = accounting.layer_table(model, v, spec, (1, 32, 32, 3))
    assert [la.name for la in table.layers][-1] == "layer3_2/conv2"
    assert accounting.relative_compute(table, spec, 1.0) == 2.0


def test_all_separate_is_exactly_the_ensemble():
    """Every r = 1 is the ensemble: conv + dense compute exactly twice one model,
    although the image channels and the classes are shared (the stem reads the
    image once per model, the shared classifier reads both models' features)."""
    for arch in ("resnet18", "resnet50"):
        _, _, spec, table = source_table(arch, 64)
        assert accounting.macs(table, spec, 1.0) == 2 * accounting.macs(table, spec, 0.0)
        assert accounting.relative_compute(table, spec, 1.0) == 2.0
        assert accounting.relative_compute(table, spec, 0.0) == 1.0
        valid = accounting.macs(table, spec, 1.0, count_padding=False)
        assert valid == 2 * accounting.macs(table, spec, 0.0, count_padding=False)
        assert valid < accounting.macs(table, spec, 1.0)


def _random_ratios(spec, seed):
    rng = np.random.default_rng(seed)
    return {g: float(rng.uniform()) for g in spec}


def test_macs_and_params_match_the_merged_model():
    """Per-layer blocks of the real merged model (``partial``) give the same
    MACs, and its variables hold exactly the stored / non-zero parameter counts."""
    model, shapes, spec, table = source_table("resnet18", 32, 10, 16)
    ratios = _random_ratios(spec, 1)
    va, vb = _random_variables(shapes, 1), _random_variables(shapes, 2)
    perm = {g: np.random.default_rng(3).permutation(grp.size) for g, grp in spec.items()}
    costs = {
        g: np.random.default_rng(4).normal(size=(grp.size, grp.size)) for g, grp in spec.items()
    }
    blocks = partial.make_blocks(spec, perm, costs, ratios)
    splits = dict(partial.layer_splits(spec, blocks, va))
    by_name = {la.name: la for la in table.layers}
    assert set(splits) == set(by_name)
    expected = 0
    for name, ((mi, ai, bi), (mo, ao, bo)) in splits.items():
        pairs = mo * (mi + ai + bi) + ao * (mi + ai) + bo * (mi + bi)
        expected += by_name[name].taps * pairs
    assert accounting.macs(table, spec, ratios) == expected

    _, merged = partial.partial_merge(model, spec, blocks, va, vb)
    leaves = [np.asarray(x) for x in jax.tree.leaves(merged["params"])]
    count = accounting.params(table, spec, ratios)
    assert count.stored == sum(x.size for x in leaves)
    assert count.nonzero == sum(int(np.count_nonzero(x)) for x in leaves)
    assert count.nonzero < count.stored


def test_separate_units_rounds_like_partial():
    _, _, spec, _ = source_table("resnet18", 32, 10, 16)
    ratios = _random_ratios(spec, 5)
    sep = accounting.separate_units(spec, ratios)
    assert sep == {g: partial.n_separate(spec[g].size, r) for g, r in ratios.items()}


# ------------------------------------------------------------------------ XLA
def _xla_check(arch, size):
    model, shapes, spec, table = source_table(arch, size)
    va, vb = _random_variables(shapes, 1), _random_variables(shapes, 2)
    perm = {g: np.arange(grp.size) for g, grp in spec.items()}
    rows = []
    for b in BUDGETS:
        ratios = budget.uniform_ratios(table, spec, b)
        r = next(iter(ratios.values()))
        merged, mv = partial.partial_merge(model, spec, partial.full_blocks(spec, perm, r), va, vb)
        analytic = 2 * accounting.macs(table, spec, ratios, count_padding=False)
        xla = accounting.xla_flops(merged, mv, (size, size, 3))
        rows.append((b, analytic, xla))
        # XLA adds BatchNorm, ReLU, residual sums and pooling (one FLOP per
        # element each) to the 2 FLOPs per multiply-add of the convs.
        assert analytic <= xla <= 1.02 * analytic, (b, analytic, xla)
        stored = sum(int(np.size(x)) for x in jax.tree.leaves(mv["params"]))
        assert stored == accounting.params(table, spec, ratios).stored
    return rows


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [64, 224])
def test_xla_flops_match_analytic(arch, size):
    """Lowering only (nothing compiled or run): a few seconds per model."""
    rows = _xla_check(arch, size)
    # Two source models' worth of conv FLOPs at budget 2, and no more.
    assert rows[-1][1] == 2 * rows[0][1]


def test_xla_flops_per_image():
    model, v, _, _ = source_table("resnet18", 32, 10, 16)
    one = accounting.xla_flops(model, v, (32, 32, 3))  # abstract variables suffice
    # BatchNorm's per-channel work (rsqrt of the variances) is per batch.
    assert accounting.xla_flops(model, v, (4, 32, 32, 3)) == pytest.approx(one, rel=1e-3)
    with pytest.raises(ValueError, match="input_shape"):
        accounting.xla_flops(model, v, (32, 32))


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("r", [-0.1, 1.1, float("nan")])
def test_ratio_outside_zero_one_is_an_error(r):
    _, _, spec, table = source_table("resnet18", 64)
    g = "params/layer2_0/conv1/kernel:3"
    ratios = {k: (r if k == g else 0.5) for k in spec}
    for fn in (accounting.macs, accounting.params, accounting.relative_compute):
        with pytest.raises(ValueError, match=g):
            fn(table, spec, ratios)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(table, spec, r)


def test_bad_ratio_dicts():
    _, _, spec, table = source_table("resnet18", 64)
    some = dict(list(dict.fromkeys(spec, 0.5).items())[:3])
    with pytest.raises(ValueError, match="missing"):
        accounting.macs(table, spec, some)
    with pytest.raises(ValueError, match="unknown"):
        accounting.macs(table, spec, {**dict.fromkeys(spec, 0.5), "nope": 0.5})
