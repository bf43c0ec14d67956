"""The merge pipeline against ensembles, planted permutations and bad input."""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import models
from pleas_jax.batch_norm import recompute_batch_norm
from pleas_jax.merge import merge
from pleas_jax.permutation import apply_permutation
from pleas_jax.permutation import random as random_perm
from pleas_jax.spec import derive_spec
from tests.helpers import images, init, randomize_norms

CONFIGS = {"resnet20": (16, 4), "resnet18": (32, 8)}


def _pair(arch, classes_a=5, classes_b=5):
    size, width = CONFIGS[arch]
    ma = models.resnet(arch, num_classes=classes_a, width=width)
    mb = models.resnet(arch, num_classes=classes_b, width=width)
    va = randomize_norms(init(ma, size), 1)
    vb = randomize_norms(init(mb, size, seed=2), 3)
    data = [images(16, size, seed=s) for s in range(3)]
    return (ma, va), (mb, vb), data, images(8, size, seed=11)


def _scale(y):
    return float(jnp.abs(y).max())


@pytest.mark.parametrize(
    "arch,ls_precision", [("resnet20", "highest"), ("resnet18", "highest"), ("resnet20", "bf16_3x")]
)
def test_budget_two_is_the_ensemble(arch, ls_precision):
    (ma, va), (mb, vb), data, x = _pair(arch)
    ens = 0.5 * (ma.apply(va, x) + mb.apply(vb, x))
    # Before least squares and BN recompute: exact.
    raw = merge((ma, va), (mb, vb), data, 2.0, least_squares=None, batch_norm=False, progress=False)
    np.testing.assert_allclose(raw.logits(x), ens, atol=1e-5 * _scale(ens))
    # After both: the ensemble of the sources with their BN recomputed on the same data.
    full = merge(
        (ma, va),
        (mb, vb),
        data,
        2.0,
        progress=False,
        count_xla_flops=False,
        ls_precision=ls_precision,
    )
    ra, rb = recompute_batch_norm(ma, va, data), recompute_batch_norm(mb, vb, data)
    ens_bn = 0.5 * (ma.apply(ra, x) + mb.apply(rb, x))
    err = float(jnp.abs(full.logits(x) - ens_bn).max()) / _scale(ens_bn)
    print(f"{arch}: budget 2 after LS ({ls_precision}) + BN, relative error {err:.2e}")
    assert err <= 1e-3


def test_budget_two_separate_heads_reproduce_each_model():
    (ma, va), (mb, vb), data, x = _pair("resnet20", 3, 4)
    raw = merge(
        (ma, va),
        (mb, vb),
        data,
        2.0,
        heads="separate",
        least_squares=None,
        batch_norm=False,
        progress=False,
        count_xla_flops=False,
    )
    for head, (m, v) in (("a", (ma, va)), ("b", (mb, vb))):
        ref = m.apply(v, x)
        np.testing.assert_allclose(raw.logits(x, head), ref, atol=1e-5 * _scale(ref))
    full = merge(
        (ma, va), (mb, vb), data, 2.0, heads="separate", progress=False, count_xla_flops=False
    )
    for head, (m, v) in (("a", (ma, va)), ("b", (mb, vb))):
        ref = m.apply(recompute_batch_norm(m, v, data), x)
        err = float(jnp.abs(full.logits(x, head) - ref).max()) / _scale(ref)
        assert err <= 1e-3, (head, err)


@pytest.mark.parametrize(
    "matching,matching_dtype,precision",
    [
        ("activation", None, "highest"),
        ("activation", "bfloat16", "highest"),
        ("activation", None, "bf16_3x"),
        ("weight", None, "highest"),
    ],
)
def test_budget_one_merges_a_permuted_copy_back_into_the_model(matching, matching_dtype, precision):
    (m, va), _, data, x = _pair("resnet20")
    spec = derive_spec(m, va, x[:1])
    vb = apply_permutation(va, spec, random_perm(spec, jax.random.key(5)))
    result = merge(
        (m, va),
        (m, vb),
        data,
        1.0,
        matching=matching,
        progress=False,
        matching_dtype=matching_dtype,
        matching_precision=precision,
        count_xla_flops=False,
    )
    assert result.module.stream_widths == m.stream_widths
    ref = m.apply(recompute_batch_norm(m, va, data), x)
    err = float(jnp.abs(result.logits(x) - ref).max()) / _scale(ref)
    print(
        f"budget 1, planted permutation, {matching} matching ({matching_dtype}, {precision}): "
        f"relative error {err:.2e}"
    )
    assert err <= 1e-3


def test_report_and_budget():
    (ma, va), (mb, vb), data, x = _pair("resnet20")
    r = merge((ma, va), (mb, vb), data, 1.5, progress=False)
    rep = r.report
    assert 1.4 <= rep["achieved_budget"] <= 1.5
    assert set(rep["seconds"]) >= {"spec", "matching", "least squares", "batch norm"}
    layers = rep["least_squares_report"]["layers"]
    assert all(v["after"] <= v["before"] * (1 + 1e-6) + 1e-9 for v in layers.values())
    assert abs(rep["xla_flops"] / rep["analytic_conv_flops"] - 1) < 0.1
    assert r.logits(x).shape == (8, 5)


def test_unit_multiple_aligns_the_merged_widths():
    (ma, va), (mb, vb), data, x = _pair("resnet20")
    plain = merge((ma, va), (mb, vb), data, 1.5, matching="weight", progress=False).report
    r = merge((ma, va), (mb, vb), data, 1.5, matching="weight", unit_multiple=2, progress=False)
    rep = r.report
    spec = derive_spec(ma, va, x[:1])
    sep = {g: rep["widths"][g] - spec[g].size for g in spec}
    assert any(plain["widths"][g] - spec[g].size != sep[g] for g in spec)  # it did something
    assert all(s % 2 == 0 or s == spec[g].size for g, s in sep.items()), sep
    assert rep["unit_multiple"] == 2
    assert rep["achieved_budget"] <= plain["achieved_budget"] <= 1.5
    assert abs(rep["xla_flops"] / rep["analytic_conv_flops"] - 1) < 0.1
    assert np.all(np.isfinite(np.asarray(r.logits(x))))


def test_a_unit_multiple_that_discards_the_budget_is_warned_about(caplog):
    (ma, va), (mb, vb), data, x = _pair("resnet20")
    spec = derive_spec(ma, va, x[:1])
    big = 2 * max(int(g.size) for g in spec.values())  # wider than any group
    with caplog.at_level("WARNING", logger="pleas_jax.merge"):
        rep = merge(
            (ma, va),
            (mb, vb),
            data,
            1.5,
            matching="weight",
            least_squares=None,
            unit_multiple=big,
            count_xla_flops=False,
            progress=False,
        ).report
    assert rep["achieved_budget"] == pytest.approx(1.0)
    (record,) = caplog.records
    # From the budget uniform ratios reach at these tiny widths (just under 1.5).
    assert re.match(
        rf"unit_multiple={big} rounds the separate units down to budget 1.000 from 1.4\d\d "
        r"\(groups of \[4, 8, 16\] units\)",
        record.getMessage(),
    ), record.getMessage()


def _no_data():
    raise AssertionError("data was read before the inputs were checked")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"budget": 0.5}, r"budget must lie in \[1, 2\]"),
        ({"budget": 2.5}, r"budget must lie in \[1, 2\]"),
        ({"ratios": "random"}, "ratios must be one of"),
        ({"matching": "magic"}, "matching must be one of"),
        ({"least_squares": "adam"}, "least_squares must be one of"),
        ({"matching_dtype": "int8"}, "compute dtype must be floating"),
        ({"ls_precision": "fp16"}, "precision must be one of"),
        ({"matching_precision": "fp8"}, "precision must be one of"),
        ({"unit_multiple": 0}, "unit_multiple must be a whole number"),
        ({"unit_multiple": 2.5}, "unit_multiple must be a whole number"),
    ],
)
def test_bad_arguments_fail_before_work(kwargs, message):
    (ma, va), (mb, vb), _, _ = _pair("resnet20")
    args = {"budget": 1.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        merge((ma, va), (mb, vb), _no_data, progress=False, **args)


def test_pair_statistics_of_another_pair_are_refused_before_any_work():
    from pleas_jax.pair_least_squares import PairStatistics, models_fingerprint

    (ma, va), (mb, vb), _, _ = _pair("resnet20")
    own = models_fingerprint(va, vb)
    assert models_fingerprint(va, vb) == own
    assert models_fingerprint(vb, va) != own  # swapped
    retrained = jax.tree.map(lambda x: x * 1.001, vb)
    assert models_fingerprint(va, retrained) != own
    taken = PairStatistics({}, {}, {}, None, own)
    for pair in (((mb, vb), (ma, va)), ((ma, va), (mb, retrained))):
        with pytest.raises(ValueError, match="pair statistics were taken from other source"):
            merge(*pair, _no_data, 1.5, statistics=taken, progress=False)


def test_ratio_outside_unit_interval():
    (ma, va), (mb, vb), data, x = _pair("resnet20")
    spec = derive_spec(ma, va, x[:1])
    bad = {g: 1.5 for g in spec}
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        merge((ma, va), (mb, vb), data, 1.5, ratios=bad, matching="identity", progress=False)
    some = dict(list({g: 0.5 for g in spec}.items())[1:])
    with pytest.raises(ValueError, match=r"ratios must name every group of the spec: missing \["):
        merge((ma, va), (mb, vb), data, 1.5, ratios=some, matching="identity", progress=False)


def _any(x: Any) -> Any:
    """``x``, typed for a call whose annotation says float (a numpy scalar is one)."""
    return x


def test_budget_types():
    (ma, va), (mb, vb), _, _ = _pair("resnet20")
    with pytest.raises(TypeError, match="budget must be a number"):
        merge((ma, va), (mb, vb), _no_data, "1.5", progress=False)  # type: ignore[arg-type]
    # A numpy scalar is a number: checked for its range like a float.
    with pytest.raises(ValueError, match=r"budget must lie in \[1, 2\].*got 2.5"):
        merge((ma, va), (mb, vb), _no_data, _any(np.float32(2.5)), progress=False)


def test_model_mismatches_and_empty_data():
    (ma, va), (mb, vb), data, _ = _pair("resnet20")
    other = models.resnet20(num_classes=5, width=8)
    with pytest.raises(ValueError, match="different architectures or widths"):
        merge((ma, va), (other, init(other, 16)), _no_data, 1.5, progress=False)
    deeper = models.resnet18(num_classes=5, width=4)
    with pytest.raises(ValueError, match="different architectures or widths"):
        merge((ma, va), (deeper, init(deeper, 16)), _no_data, 1.5, progress=False)
    (ma3, va3), (mb4, vb4), _, _ = _pair("resnet20", 3, 4)
    with pytest.raises(ValueError, match="shared head needs the same classes"):
        merge((ma3, va3), (mb4, vb4), _no_data, 1.5, progress=False)
    with pytest.raises(ValueError, match="batches are empty"):
        merge((ma, va), (mb, vb), [], 1.5, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        merge((ma, va), (mb, vb), iter(data), 1.5, progress=False)
