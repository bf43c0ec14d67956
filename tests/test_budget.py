"""Budget -> per-group ratios: uniform, zip and optimized allocations."""

import math
from typing import Any

import numpy as np
import pytest

from pleas_jax import accounting, budget
from tests.helpers import source_table


def test_budget_re_exports_the_accounting():
    """``budget.macs`` etc. keep working, and are the accounting's own objects."""
    for name in accounting.__all__:
        assert name in budget.__all__
        assert getattr(budget, name) is getattr(accounting, name)


# --------------------------------------------------------------------- uniform
def _breakpoints(spec):
    return np.unique(
        np.concatenate([(np.arange(1, g.size + 1) - 0.5) / g.size for g in spec.values()])
    )


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_uniform_meets_budget_as_closely_as_rounding_allows(arch):
    _, _, spec, table = source_table(arch, 224)
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


# ------------------------------------------------------------------- alignment
@pytest.mark.parametrize("method", ["uniform", "optimized"])
def test_aligned_counts_are_multiples_and_stay_within_budget(method):
    _, _, spec, table = source_table("resnet18", 224)
    w = {g: float(i % 5 + 1) for i, g in enumerate(spec)}
    for b in (1.1, 1.5, 1.9):
        ratios = budget.ratios_for_budget(method, table, spec, b, weights=w)
        aligned = budget.align_ratios(spec, ratios, 8)
        before = budget.separate_units(spec, ratios)
        after = budget.separate_units(spec, aligned)
        assert any(before[g] % 8 for g in spec)  # something to align
        for g, grp in spec.items():
            assert after[g] == before[g] - before[g] % 8  # largest multiple below
            assert aligned[g] * grp.size == after[g]  # exact k / n
        spent = budget.relative_compute(table, spec, aligned)
        assert spent <= budget.relative_compute(table, spec, ratios) <= b
        assert (
            budget.params(table, spec, aligned).nonzero
            <= budget.params(table, spec, ratios).nonzero
        )
    # Nothing to change: multiple 1, or counts already aligned (0, n, 16 of 64).
    r = budget.uniform_ratios(table, spec, 1.5)
    assert budget.align_ratios(spec, r, 1) == {
        g: budget.separate_units(spec, r)[g] / grp.size for g, grp in spec.items()
    }
    for ends in (0.0, 1.0):
        assert budget.align_ratios(spec, dict.fromkeys(spec, ends), 8) == dict.fromkeys(spec, ends)


def test_align_keeps_fully_separate_groups_of_any_size():
    from pleas_jax.spec import Group

    spec = {"odd": Group(10, ()), "small": Group(6, ()), "even": Group(64, ())}
    got = budget.align_ratios(spec, {"odd": 1.0, "small": 0.5, "even": 0.3}, 8)
    assert got == {"odd": 1.0, "small": 0.0, "even": 16 / 64}
    bad: Any  # wrong types too: align_ratios checks its argument at run time
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="multiple"):
            budget.align_ratios(spec, got, bad)
    with pytest.raises(ValueError, match="missing"):
        budget.align_ratios(spec, {"odd": 1.0}, 8)


# ------------------------------------------------------------------------- zip
def test_zip_budgets_fall_with_k():
    _, _, spec, table = source_table("resnet18", 224)
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
    _, _, spec, table = source_table("resnet18", 64)
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
    _, _, spec, table = source_table("resnet18", 224)
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
    _, _, spec, table = source_table(arch, 224)
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
    _, _, spec, table = source_table("resnet18", 224)
    g = "params/layer4_1/conv1/kernel:3"  # cheap: one inner group of the last stage
    weights = {k: float(k == g) for k in spec}
    ratios = budget.optimized_ratios(table, spec, 1.25, weights)
    assert ratios[g] == 1.0
    assert budget.relative_compute(table, spec, ratios) <= 1.25
    # Equal weights are fine too (and zero weights fall back to uniform).
    zero = budget.optimized_ratios(table, spec, 1.5, 0.0)
    uniform = budget.uniform_ratios(table, spec, 1.5)
    assert budget.separate_units(spec, zero) == budget.separate_units(spec, uniform)


@pytest.mark.parametrize("arch,width", [("resnet20", 3), ("resnet20", 4), ("resnet18", 4)])
def test_optimized_solves_every_budget_with_equal_weights(arch, width):
    """Equal weights (identity matching gives them) once made the greedy start
    search a group after the budget was spent; every budget must solve."""
    _, _, spec, table = source_table(arch, 10, num_classes=10, width=width)
    for b in np.round(np.arange(1.01, 2.0, 0.01), 2):
        ratios = budget.optimized_ratios(table, spec, float(b), 1.0)
        assert budget.relative_compute(table, spec, ratios) <= b + 1e-12, b


def test_numpy_scalars_are_numbers():
    _, _, spec, table = source_table("resnet20", 10, num_classes=10, width=4)
    want = budget.optimized_ratios(table, spec, 1.5, 1.0)
    b: Any = np.float32(1.5)
    w: Any = np.float32(1.0)
    assert budget.optimized_ratios(table, spec, b, w) == want


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
    _, _, spec, table = source_table("resnet18", 64)
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
    _, _, spec, table = source_table("resnet18", 64)
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


def test_bad_weight_dicts():
    _, _, spec, table = source_table("resnet18", 64)
    with pytest.raises(ValueError, match="non-negative"):
        budget.optimized_ratios(
            table, spec, 1.5, {**dict.fromkeys(spec, 1.0), "params/conv1/kernel:3": -1.0}
        )
