"""Compute / parameter accounting of merged models, the XLA cross-check, budget -> ratios."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import budget, models, partial
from pleas_jax.spec import derive_spec
from pleas_jax.tree import flatten

BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)


@functools.cache
def _source(arch, size, num_classes=1000, width=None):
    """``(module, shapes, spec, table)``: the accounting reads only shapes, so
    the variables are abstract (``jax.ShapeDtypeStruct``; nothing is compiled)."""
    model = models.resnet(arch, num_classes, width=width)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    spec = derive_spec(model, shapes, x)
    return model, shapes, spec, budget.layer_table(model, shapes, spec, (size, size, 3))


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
    _, _, spec, table = _source(arch, 224)
    assert budget.macs(table, spec, 0.0) == macs == _torchvision_macs(arch, 224)
    assert budget.params(table, spec, 0.0) == (n_params, n_params)


def test_layer_table_reads_taps_padding_and_bias():
    _, _, _, table = _source("resnet18", 64)
    layers = {la.name: la for la in table.layers}
    assert len(layers) == 21  # 20 convs + fc
    stem = layers["conv1"]
    assert (stem.kernel_size, stem.positions, stem.in_group, stem.c_in) == (
        (7, 7),
        32 * 32,
        None,
        3,
    )
    # 3x3 pad 1 on a 2x2 map: each output position sees 2x2 real input taps.
    last = layers["layer4_1/conv2"]
    assert (last.positions, last.taps, last.valid_taps) == (4, 36, 16)
    down = layers["layer4_0/downsample_0"]
    assert down.taps == down.valid_taps == 4
    fc = layers["fc"]
    assert (fc.kernel_size, fc.positions, fc.out_group, fc.bias) == ((), 1, None, True)
    assert not any(la.bias for la in table.layers if la.name != "fc")


def test_backbone_without_classifier():
    model = models.resnet20(None)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    spec = derive_spec(model, v, x, free_output=True)
    table = budget.layer_table(model, v, spec, (1, 32, 32, 3))
    assert [la.name for la in table.layers][-1] == "layer3_2/conv2"
    assert budget.relative_compute(table, spec, 1.0) == 2.0


def test_all_separate_is_exactly_the_ensemble():
    """Every r = 1 is the ensemble: conv + dense compute exactly twice one model,
    although the image channels and the classes are shared (the stem reads the
    image once per model, the shared classifier reads both models' features)."""
    for arch in ("resnet18", "resnet50"):
        _, _, spec, table = _source(arch, 64)
        assert budget.macs(table, spec, 1.0) == 2 * budget.macs(table, spec, 0.0)
        assert budget.relative_compute(table, spec, 1.0) == 2.0
        assert budget.relative_compute(table, spec, 0.0) == 1.0
        valid = budget.macs(table, spec, 1.0, count_padding=False)
        assert valid == 2 * budget.macs(table, spec, 0.0, count_padding=False)
        assert valid < budget.macs(table, spec, 1.0)


def _random_ratios(spec, seed):
    rng = np.random.default_rng(seed)
    return {g: float(rng.uniform()) for g in spec}


def test_macs_and_params_match_the_merged_model():
    """Per-layer blocks of the real merged model (``partial``) give the same
    MACs, and its variables hold exactly the stored / non-zero parameter counts."""
    model, shapes, spec, table = _source("resnet18", 32, 10, 16)
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
    assert budget.macs(table, spec, ratios) == expected

    _, merged = partial.partial_merge(model, spec, blocks, va, vb)
    leaves = [np.asarray(x) for x in jax.tree.leaves(merged["params"])]
    count = budget.params(table, spec, ratios)
    assert count.stored == sum(x.size for x in leaves)
    assert count.nonzero == sum(int(np.count_nonzero(x)) for x in leaves)
    assert count.nonzero < count.stored


def test_separate_units_rounds_like_partial():
    _, _, spec, _ = _source("resnet18", 32, 10, 16)
    ratios = _random_ratios(spec, 5)
    sep = budget.separate_units(spec, ratios)
    assert sep == {g: partial.n_separate(spec[g].size, r) for g, r in ratios.items()}


# ------------------------------------------------------------------------ XLA
def _xla_check(arch, size):
    model, shapes, spec, table = _source(arch, size)
    va, vb = _random_variables(shapes, 1), _random_variables(shapes, 2)
    perm = {g: np.arange(grp.size) for g, grp in spec.items()}
    rows = []
    for b in BUDGETS:
        ratios = budget.uniform_ratios(table, spec, b)
        r = next(iter(ratios.values()))
        merged, mv = partial.partial_merge(model, spec, partial.full_blocks(spec, perm, r), va, vb)
        analytic = 2 * budget.macs(table, spec, ratios, count_padding=False)
        xla = budget.xla_flops(merged, mv, (size, size, 3))
        rows.append((b, analytic, xla))
        # XLA adds BatchNorm, ReLU, residual sums and pooling (one FLOP per
        # element each) to the 2 FLOPs per multiply-add of the convs.
        assert analytic <= xla <= 1.02 * analytic, (b, analytic, xla)
        stored = sum(int(np.size(x)) for x in jax.tree.leaves(mv["params"]))
        assert stored == budget.params(table, spec, ratios).stored
    return rows


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [64, 224])
def test_xla_flops_match_analytic(arch, size):
    """Lowering only (nothing compiled or run): a few seconds per model."""
    rows = _xla_check(arch, size)
    # Two source models' worth of conv FLOPs at budget 2, and no more.
    assert rows[-1][1] == 2 * rows[0][1]


def test_xla_flops_per_image():
    model, v, _, _ = _source("resnet18", 32, 10, 16)
    one = budget.xla_flops(model, v, (32, 32, 3))  # abstract variables suffice
    # BatchNorm's per-channel work (rsqrt of the variances) is per batch.
    assert budget.xla_flops(model, v, (4, 32, 32, 3)) == pytest.approx(one, rel=1e-3)
    with pytest.raises(ValueError, match="input_shape"):
        budget.xla_flops(model, v, (32, 32))


# --------------------------------------------------------------------- uniform
def _breakpoints(spec):
    return np.unique(
        np.concatenate([(np.arange(1, g.size + 1) - 0.5) / g.size for g in spec.values()])
    )


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_uniform_meets_budget_as_closely_as_rounding_allows(arch):
    _, _, spec, table = _source(arch, 224)
    steps = _breakpoints(spec)
    for b in (1.0, 1.1, 1.25, 1.5, 1.75, 1.9, 2.0):
        ratios = budget.uniform_ratios(table, spec, b)
        (r,) = set(ratios.values())
        spent = budget.relative_compute(table, spec, ratios)
        assert spent <= b
        above = steps[steps > r]
        if len(above):
            # The next allocation a shared ratio can reach spends more than b.
            assert budget.relative_compute(table, spec, float(above[0]) + 1e-9) > b
        else:
            assert r == 1.0
        assert b - spent < 0.01  # steps are small for ResNets
    assert set(budget.uniform_ratios(table, spec, 1.0).values()) == {0.0}
    assert set(budget.uniform_ratios(table, spec, 2.0).values()) == {1.0}


# ------------------------------------------------------------------------- zip
def test_zip_budgets_fall_with_k():
    _, _, spec, table = _source("resnet18", 224)
    stages = budget.zip_budgets(table, spec)
    assert [k for k, _ in stages] == [0, 1, 2, 3, 4]
    spent = [b for _, b in stages]
    assert spent[0] == 2.0 and spent[-1] == 1.0
    assert all(x > y for x, y in zip(spent, spent[1:], strict=False))
    blocks = [b for _, b in budget.zip_budgets(table, spec, unit="block")]
    assert len(blocks) == 9 and blocks[0] == 2.0 and blocks[-1] == 1.0
    assert all(x >= y for x, y in zip(blocks, blocks[1:], strict=False))
    # Whole stages are block boundaries too.
    assert set(spent) <= set(blocks)


def test_zip_ratios_merge_whole_stages():
    _, _, spec, table = _source("resnet18", 64)
    ratios = budget.zip_ratios(table, spec, 2)
    merged = {g for g, r in ratios.items() if r == 0.0}
    assert set(ratios.values()) == {0.0, 1.0}
    # Stage 1 and 2 streams and inner groups; the stem writes stage 1's stream.
    assert "params/conv1/kernel:3" in merged
    assert "params/layer2_0/conv2/kernel:3" in merged
    assert "params/layer2_1/conv1/kernel:3" in merged
    assert "params/layer3_0/conv1/kernel:3" not in merged
    with pytest.raises(ValueError, match="k must be"):
        budget.zip_ratios(table, spec, 5)


def test_zip_ratios_for_budget_picks_the_most_compute_within_budget():
    _, _, spec, table = _source("resnet18", 224)
    stages = dict(budget.zip_budgets(table, spec))
    for b in (1.0, 1.3, 1.5, 1.7, 2.0):
        ratios = budget.zip_ratios_for_budget(table, spec, b)
        spent = budget.relative_compute(table, spec, ratios)
        assert spent <= b
        k = next(k for k, x in stages.items() if x == spent)
        assert k == 0 or stages[k - 1] > b


# ------------------------------------------------------------------- optimized
def _objective(spec, weights, ratios):
    sep = budget.separate_units(spec, ratios)
    return sum(weights[g] * sep[g] for g in spec)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_optimized_respects_budget_and_beats_uniform(arch):
    _, _, spec, table = _source(arch, 224)
    rng = np.random.default_rng(0)
    weights = {g: float(rng.uniform()) for g in spec}
    for b in (1.25, 1.5, 1.75):
        ratios = budget.optimized_ratios(table, spec, b, weights)
        assert set(ratios) == set(spec)
        assert all(0.0 <= r <= 1.0 for r in ratios.values())
        for g, r in ratios.items():  # whole units, exactly
            assert math.isclose(r * spec[g].size, round(r * spec[g].size), abs_tol=1e-9)
        assert budget.relative_compute(table, spec, ratios) <= b
        uniform = budget.uniform_ratios(table, spec, b)
        assert _objective(spec, weights, ratios) > _objective(spec, weights, uniform)
        assert ratios == budget.optimized_ratios(table, spec, b, weights)  # deterministic


def test_optimized_keeps_the_only_sensitive_group_separate():
    _, _, spec, table = _source("resnet18", 224)
    g = "params/layer4_1/conv1/kernel:3"  # cheap: one inner group of the last stage
    weights = {k: float(k == g) for k in spec}
    ratios = budget.optimized_ratios(table, spec, 1.25, weights)
    assert ratios[g] == 1.0
    assert budget.relative_compute(table, spec, ratios) <= 1.25
    # Equal weights are fine too (and zero weights fall back to uniform).
    zero = budget.optimized_ratios(table, spec, 1.5, 0.0)
    uniform = budget.uniform_ratios(table, spec, 1.5)
    assert budget.separate_units(spec, zero) == budget.separate_units(spec, uniform)


def test_sensitivity_from_costs():
    rng = np.random.default_rng(0)
    n = 32
    spec = {"good": _Group(n), "poor": _Group(n), "flat": _Group(n)}
    noise = rng.normal(size=(n, n))
    costs = {
        "good": noise * 0.1 + 10 * np.eye(n),  # every pair clearly aligned
        "poor": noise + np.diag(np.linspace(0.0, 5.0, n)),  # some pairs barely
        "flat": np.ones((n, n)),
    }
    perm = {g: np.arange(n) for g in spec}
    w = budget.sensitivity_from_costs(spec, perm, costs)
    assert 0.0 <= w["good"] < 0.05 < w["poor"]
    assert w["flat"] == 1.0
    # Shift and scale of the scores do not matter.
    shifted = {g: 3.0 * c - 7.0 for g, c in costs.items()}
    w2 = budget.sensitivity_from_costs(spec, perm, shifted)
    assert all(w2[g] == pytest.approx(w[g]) for g in spec)
    # An absolute reference makes uniformly mediocre alignment count.
    mediocre = {"good": np.full((n, n), 0.0) + 0.5 * np.eye(n)}
    spec1 = {"good": _Group(n)}
    assert budget.sensitivity_from_costs(spec1, {"good": np.arange(n)}, mediocre)["good"] == 0.0
    assert budget.sensitivity_from_costs(spec1, {"good": np.arange(n)}, mediocre, reference=1.0)[
        "good"
    ] == pytest.approx(0.5 / (1.0 - 0.5 / n))


class _Group:
    def __init__(self, size):
        self.size = size
        self.axes = ()


def test_dispatcher():
    _, _, spec, table = _source("resnet18", 64)
    assert budget.ratios_for_budget("uniform", table, spec, 1.5) == budget.uniform_ratios(
        table, spec, 1.5
    )
    assert budget.ratios_for_budget("zip", table, spec, 1.5, unit="block") == (
        budget.zip_ratios_for_budget(table, spec, 1.5, unit="block")
    )
    w = dict.fromkeys(spec, 1.0)
    assert budget.ratios_for_budget("optimized", table, spec, 1.5, weights=w) == (
        budget.optimized_ratios(table, spec, 1.5, w)
    )
    with pytest.raises(ValueError, match="weights"):
        budget.ratios_for_budget("optimized", table, spec, 1.5)
    with pytest.raises(ValueError, match="unknown ratio method"):
        budget.ratios_for_budget("random", table, spec, 1.5)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("b", [0.5, 0.999, 2.001, 2.5, float("nan")])
def test_budget_outside_one_two_is_an_error(b):
    _, _, spec, table = _source("resnet18", 64)
    w = dict.fromkeys(spec, 1.0)
    calls = [
        lambda: budget.uniform_ratios(table, spec, b),
        lambda: budget.zip_ratios_for_budget(table, spec, b),
        lambda: budget.optimized_ratios(table, spec, b, w),
        lambda: budget.ratios_for_budget("uniform", table, spec, b),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"\[1, 2\]"):
            call()


@pytest.mark.parametrize("r", [-0.1, 1.1, float("nan")])
def test_ratio_outside_zero_one_is_an_error(r):
    _, _, spec, table = _source("resnet18", 64)
    g = "params/layer2_0/conv1/kernel:3"
    ratios = {k: (r if k == g else 0.5) for k in spec}
    for fn in (budget.macs, budget.params, budget.relative_compute):
        with pytest.raises(ValueError, match=g):
            fn(table, spec, ratios)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(table, spec, r)


def test_bad_ratio_and_weight_dicts():
    _, _, spec, table = _source("resnet18", 64)
    some = dict(list(dict.fromkeys(spec, 0.5).items())[:3])
    with pytest.raises(ValueError, match="missing"):
        budget.macs(table, spec, some)
    with pytest.raises(ValueError, match="unknown"):
        budget.macs(table, spec, {**dict.fromkeys(spec, 0.5), "nope": 0.5})
    with pytest.raises(ValueError, match="non-negative"):
        budget.optimized_ratios(
            table, spec, 1.5, {**dict.fromkeys(spec, 1.0), "params/conv1/kernel:3": -1.0}
        )
    with pytest.raises(ValueError, match="input_shape"):
        budget.layer_table(models.resnet20(), {}, spec, (32, 32))


def test_table_is_per_image():
    model, v, spec, table = _source("resnet18", 64)
    batched = budget.layer_table(model, v, spec, (8, 64, 64, 3))
    assert batched == table
    assert flatten(v)  # variables untouched
