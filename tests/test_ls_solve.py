"""The closed-form solve's fallbacks: float64 Cholesky on the host where fp32
round-off defeats Cholesky, the pseudo-inverse where there is no ridge.

The truth is numpy's float64 solve of the same ridge system, on integer
features whose Gram fp32 holds exactly.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax.least_squares import solve
from pleas_jax.ls_solve import _host_cholesky, _solve_matrix
from pleas_jax.pair_least_squares import _solve_block
from tests.test_least_squares import _layer, _stats_from_arrays


def _duplicated(rows=40, seed=0):
    """Integer features ``[rows, 4]`` whose last column repeats the first, and targets."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(rows, 4)).astype(np.float32)
    x[:, 3] = x[:, 0]
    y = rng.integers(-3, 4, size=(rows, 2)).astype(np.float32)
    return x, y


def _ridge64(x, y, ridge):
    g, c = x.T.astype(np.float64) @ x, x.T.astype(np.float64) @ y
    lam = ridge * np.trace(g) / len(g)
    return np.linalg.solve(g + lam * np.eye(len(g)), c)


def test_a_ridge_below_fp32_resolution_is_solved_in_float64():
    # λ / diag ≈ 1e-9: fp32 reads diag + λ as diag, so the duplicated column
    # leaves a zero pivot; float64 still sees the ridge and solves exactly.
    layer = _layer("dense", (4, 0, 0), (2, 0, 0), False)
    x, y = _duplicated()
    stats = _stats_from_arrays(layer, x, y)
    sets = ((0, 2, (0, 1, 2, 3)),)
    _, ok = _solve_matrix(stats["gram"], stats["cross"], None, None, sets, 1e-9, "zero", "cholesky")
    assert not bool(ok)
    sol = solve({"l": stats}, ridge=1e-9)["l"]
    assert sol["solver"] == "cholesky_f64" and sol["fallback"]
    want = _ridge64(x, y, 1e-9)
    np.testing.assert_allclose(np.asarray(sol["kernel"]), want, rtol=1e-5, atol=1e-6)
    # The ridge's answer, not the pseudo-inverse's: equal weights on the twins.
    np.testing.assert_allclose(sol["kernel"][0], sol["kernel"][3], rtol=1e-5)


def test_no_ridge_on_a_singular_gram_takes_the_pseudo_inverse():
    layer = _layer("dense", (4, 0, 0), (2, 0, 0), False)
    x, y = _duplicated(seed=1)
    sol = solve({"l": _stats_from_arrays(layer, x, y)}, ridge=0.0)["l"]
    assert sol["solver"] == "eigh" and sol["fallback"]
    np.testing.assert_allclose(sol["kernel"], np.linalg.pinv(x) @ y, atol=1e-4)


def test_host_cholesky_declines_what_round_off_decides():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    g, b = x.T @ x, rng.normal(size=(6, 2)).astype(np.float32)
    diag = np.full(6, 0.1, np.float32)
    want = np.linalg.solve(g.astype(np.float64) + 0.1 * np.eye(6), b)
    np.testing.assert_allclose(_host_cholesky(g, diag, b, 0.1), want, rtol=1e-5)
    assert np.isnan(_host_cholesky(g, diag, b, 0.0)).all()  # no ridge: no bound
    assert np.isnan(_host_cholesky(-g, diag, b, 0.1)).all()  # indefinite
    # A Gram with a negative eigenvalue the ridge only just covers: pivots far
    # below the floor it claims.
    bad = g - (np.linalg.eigvalsh(g)[0] + 0.099) * np.eye(6, dtype=np.float32)
    assert np.isnan(_host_cholesky(bad, diag, b, 0.1)).all()


@pytest.mark.parametrize("pad", [0, 3])
def test_pair_blocks_fall_back_to_float64_too(pad):
    # The pair path's padded block: padded rows carry 1 on the diagonal and
    # solve to zero; real rows get the same float64 ridge solution.
    x, y = _duplicated(seed=2)
    n, k = 4 + pad, 2
    gram = np.zeros((n, n), np.float32)
    gram[:4, :4] = x.T @ x
    cross = np.zeros((n, k), np.float32)
    cross[:4] = x.T @ y
    blk = {
        "r": jnp.arange(n),
        "rv": jnp.asarray([1.0] * 4 + [0.0] * pad),
        "c": jnp.arange(k),
        "cv": jnp.ones(k),
    }
    r0, pull = -jnp.asarray(cross), jnp.zeros((n, k))  # W0 = 0, centre 0
    fp32 = _solve_block(jnp.asarray(gram), r0, pull, blk, 1e-9, "cholesky")
    assert not np.isfinite(np.asarray(fp32)).all()
    got = np.asarray(_solve_block(jnp.asarray(gram), r0, pull, blk, 1e-9, "cholesky_f64"))
    np.testing.assert_allclose(got[:4], _ridge64(x, y, 1e-9), rtol=1e-5, atol=1e-6)
    assert np.all(got[4:] == 0)


def test_the_pseudo_inverse_keeps_weak_well_determined_inputs():
    """Without scaling, the eigenvalue cut-off relative to a channel of scale
    3e3 dropped the bias and an ordinary channel (mean squared error 25)."""
    rng = np.random.default_rng(4)
    x = np.stack([3e3 * rng.normal(size=400), np.zeros(400), rng.normal(size=400)], axis=1).astype(
        np.float32
    )  # one strong channel, one dead, one ordinary
    y = (1e-3 * x[:, :1] + 0.7 * x[:, 2:] + 5.0).astype(np.float32)
    layer = _layer("dense", (3, 0, 0), (1, 0, 0), True)
    sol = solve({"l": _stats_from_arrays(layer, x, y)}, ridge=0.0)["l"]
    assert sol["solver"] == "eigh"
    np.testing.assert_allclose(sol["kernel"][:, 0], [1e-3, 0.0, 0.7], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(sol["bias"], [5.0], rtol=1e-3)


def test_fewer_rows_than_inputs_are_solved_in_float64():
    """Only the ridge makes such a Gram definite: an fp32 factorisation's
    error in the directions the rows do not see (held-out inputs do) reached
    6% of the update. Truth: numpy's float64 solve of the same sums."""
    rng = np.random.default_rng(5)
    rows, dim = 40, 300
    x = np.maximum(rng.normal(size=(rows, dim)), 0).astype(np.float32)  # ReLU-like
    y = rng.normal(size=(rows, 4)).astype(np.float32)
    layer = _layer("dense", (dim, 0, 0), (4, 0, 0), False)
    stats = _stats_from_arrays(layer, x, y)
    sol = solve({"l": stats}, ridge=1e-4)["l"]
    assert sol["solver"] == "cholesky_f64"
    g, c = (np.asarray(stats[k], np.float64) for k in ("gram", "cross"))
    lam = 1e-4 * np.trace(g) / dim
    want = np.linalg.solve(g + lam * np.eye(dim), c)
    err = np.linalg.norm(sol["kernel"] - want) / np.linalg.norm(want)
    assert err < 1e-4, err
    # With more rows than inputs fp32 stays the first choice.
    more = _stats_from_arrays(_layer("dense", (8, 0, 0), (4, 0, 0), False), x[:, :8], y)
    assert solve({"l": more}, ridge=1e-4)["l"]["solver"] == "cholesky"


# A merge whose layers see fewer rows than inputs (32 images of 8 px) solves
# them by float64 on the host; on several devices that host callback hung.
_FEW_ROWS = """
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from pleas_jax import merge, models
from tests.helpers import images, init, randomize_norms

m = models.resnet20(num_classes=5, width=4)
va, vb = randomize_norms(init(m, 8), 1), randomize_norms(init(m, 8, seed=2), 3)
data = [images(16, 8, seed=s) for s in range(2)]
x = images(8, 8, seed=11)
out = {{"devices": len(jax.devices())}}
for statistics in ("per_merge", "pair"):
    r = merge((m, va), (m, vb), data, 1.5, statistics=statistics, progress=False,
              count_xla_flops=False)
    layers = r.report["least_squares_report"]["layers"]
    out[statistics] = {{
        "solvers": sorted({{v["solver"] for v in layers.values()}}),
        "logits": np.asarray(r.logits(x)).tolist(),
    }}
print(json.dumps(out))
"""


def test_host_float64_solves_run_on_several_devices():
    from tests.helpers import run_on_cpu_devices

    one, two = (run_on_cpu_devices(_FEW_ROWS, n=n, timeout=400) for n in (1, 2))
    assert (one["devices"], two["devices"]) == (1, 2)
    errs = {}
    for statistics in ("per_merge", "pair"):
        assert "cholesky_f64" in two[statistics]["solvers"], two[statistics]["solvers"]
        a, b = (np.asarray(r[statistics]["logits"]) for r in (one, two))
        errs[statistics] = float(np.abs(a - b).max() / np.abs(a).max())
    print("2 devices vs 1, max relative logit difference:", errs)
    # Sums in another order (1e-7 apart) through systems of more inputs than
    # rows, conditioned only by the ridge: the same solution to ~1e-3.
    assert all(e <= 1e-2 for e in errs.values()), errs
