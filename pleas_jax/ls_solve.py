"""The closed-form solve of one layer's three block regressions, and residuals from sums.

Given a layer's statistics (:func:`pleas_jax.ls_statistics.layer_statistics`:
``G = Σ X̃ᵀX̃``, ``C = Σ X̃ᵀỸ`` and, when taken relative to the merge weights
W0, ``R0 = Σ X̃ᵀ(X̃W0 − Ỹ)``), :func:`solve` fits each output block on its
allowed inputs, ``W_S = (G_SS + λI)⁻¹ (C_S + λ W0_S)`` with
``λ = ridge · trace(G_SS) / |S|``: Cholesky in fp32 on the Jacobi-scaled
matrix, an ``eigh`` pseudo-inverse where it fails. :func:`residuals` gives
each layer's mean squared error from the same sums. :mod:`pleas_jax.least_squares`
explains the choices and runs the whole fit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from pleas_jax import distributed
from pleas_jax.ls_layers import _HI, Layer, matrix_mask, matrix_to_weights, weights_to_matrix

RIDGE_CENTRES = ("init", "zero")


# ---------------------------------------------------------------------- solve
def _allowed_sets(layer: Layer):
    """``(first output, end output, allowed rows)`` per output block."""
    mask = matrix_mask(layer)
    mo, ao, bo = layer.out_splits
    return [
        (lo, lo + n, np.flatnonzero(mask[:, lo]))
        for lo, n in ((0, mo), (mo, ao), (mo + ao, bo))
        if n
    ]


def _pinv_solve(a, c):
    """A least-squares solution of ``a x = c`` for a positive semidefinite
    ``a``: the pseudo-inverse of the Jacobi-scaled matrix (unit diagonal;
    rows and columns of a zero diagonal, dead inputs, stay zero). Unscaled,
    the cut-off relative to the largest eigenvalue would also drop well
    determined directions of inputs far weaker than the strongest one (a bias
    column beside a channel of scale 3e3)."""
    d = jnp.diagonal(a)
    s = jnp.where(d > 0, jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 0.0)
    ev, v = jnp.linalg.eigh(a * s[:, None] * s[None, :])
    tol = jnp.finfo(a.dtype).eps * a.shape[0] * jnp.max(jnp.abs(ev))
    keep = ev > tol
    inv = jnp.where(keep, 1.0 / jnp.where(keep, ev, 1.0), 0.0)
    x = jnp.matmul(v, inv[:, None] * jnp.matmul(v.T, c * s[:, None], precision=_HI), precision=_HI)
    return x * s[:, None]


# Closed-form solvers in the order they are tried: each next one where the
# previous gave a non-finite solution.
SOLVERS = ("cholesky", "cholesky_f64", "eigh")


def first_solver(count: float, dim: int) -> str:
    """The solver to try first for a layer of ``dim`` inputs seen at ``count``
    rows. With fewer rows than inputs the Gram is singular and only the ridge
    makes it definite: its condition is then about ``dim / ridge`` and an fp32
    factorisation's error, that times fp32's epsilon, reaches several percent
    of the update in the directions the data do not see (held-out inputs do),
    while nothing flags it. Those go to float64 on the host from the start."""
    return "cholesky_f64" if count < dim else "cholesky"


def _host_cholesky(g, diag, b, floor):
    """``(g + diag(diag))⁻¹ b`` by a float64 Cholesky on the host (Jacobi-scaled), float32 out.

    For systems whose fp32 factorisation failed. The matrix is formed here, in
    float64, so a ridge below fp32's resolution of the diagonal still counts.
    ``g`` is a Gram (positive semidefinite up to its own round-off) and
    ``diag ≥ floor``, so the scaled matrix's eigenvalues, and every pivot, are
    about ``floor / max(diag a)`` or more: late layers on few small images
    (many more columns than rows) have a ridge below fp32's round-off but far
    above float64's. A pivot under half that bound (or ``floor = 0``: no
    ridge) means round-off decided, and the result is NaN so that the caller
    takes the pseudo-inverse instead.
    """
    a = np.array(g, np.float64)
    a[np.diag_indices_from(a)] += np.asarray(diag, np.float64)
    b, floor = np.asarray(b, np.float64), float(floor)
    nan = np.full(b.shape, np.nan, np.float32)
    if not floor > 0 or not np.all(np.isfinite(a)):
        return nan
    d = np.diagonal(a)
    s = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 1.0)
    try:
        c, lower = scipy.linalg.cho_factor(
            a * s[:, None] * s[None, :], lower=True, overwrite_a=True, check_finite=False
        )
    except np.linalg.LinAlgError:
        return nan
    if np.min(np.diagonal(c)) ** 2 < 0.5 * floor * np.min(s) ** 2:
        return nan
    x = scipy.linalg.cho_solve((c, lower), b * s[:, None], check_finite=False)
    return (x * s[:, None]).astype(np.float32)


def on_one_device(tree):
    """``tree``'s arrays on the first device, for a program that calls back to
    the host (``"cholesky_f64"``). In a program replicated over several devices
    (the sums' ``psum`` leaves them so) every device calls back, and XLA:CPU's
    collectives deadlock: a merge on 2-8 simulated devices hung, then aborted."""
    device = jax.devices()[0]
    arrays = (jax.Array, np.ndarray)
    return jax.tree.map(lambda x: jax.device_put(x, device) if isinstance(x, arrays) else x, tree)


def _cholesky_solve(g, diag, b, method, floor):
    """``(g + diag(diag))⁻¹ b`` for a Gram ``g`` and a positive ``diag ≥ floor``:
    fp32 Cholesky on the device (Jacobi-scaled: a unit diagonal changes nothing
    in exact arithmetic and keeps channels of very different energy from
    spoiling it), or ``method="cholesky_f64"``: :func:`_host_cholesky`."""
    if method == "cholesky_f64":
        out = jax.ShapeDtypeStruct(b.shape, jnp.float32)
        return jax.pure_callback(_host_cholesky, out, g, diag, b, floor)
    a = g + jnp.diag(diag)
    d = jnp.diagonal(a)
    s = jnp.where(d > 0, jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 1.0)
    a = a * s[:, None] * s[None, :]
    w = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), b * s[:, None])
    return w * s[:, None]


def _ridge_solve(g, rhs, centre, ridge, method):
    """``(g + λI)⁻¹ (rhs + λ centre)`` with ``λ = ridge · trace(g) / n``, by
    Cholesky (``"cholesky"``: fp32; ``"cholesky_f64"``: float64 on the host)
    or by an eigendecomposition pseudo-inverse (``"eigh"``)."""
    n = g.shape[0]
    g = 0.5 * (g + g.T)
    tr = jnp.trace(g)
    # A block whose inputs are all zero (dead units) has g = 0 and rhs = 0:
    # any positive λ then returns the centre, the limit of a vanishing ridge.
    lam = jnp.where(tr > 0, ridge * tr / n, 1.0)
    b = rhs + lam * centre
    if method == "eigh":
        return _pinv_solve(g + lam * jnp.eye(n, dtype=g.dtype), b)
    # A zero ridge gives no floor: the host solve then declines (NaN).
    diag = jnp.full((n,), lam, g.dtype)
    return _cholesky_solve(g, diag, b, method, jnp.where(ridge > 0, lam, 0.0))


@functools.partial(jax.jit, static_argnames=("sets", "ridge", "centre", "method"))
def _solve_matrix(gram, cross, init, init_grad, sets, ridge, centre, method):
    """All output blocks of one layer and whether every weight is finite;
    ``sets`` as from :func:`_allowed_sets` (hashable). With ``init`` (W0) the
    unknown is ``D = W − W0``:
    ``(G + λI) D = −R0 + λ (Z − W0)`` with ``R0 = G W0 − C`` and Z the centre."""
    relative = init is not None
    w = init if relative else jnp.zeros_like(cross)
    for lo, hi, idx in sets:
        idx = np.asarray(idx)
        g = gram[idx][:, idx]
        if relative:
            rhs = -init_grad[idx, lo:hi]
            shift = jnp.zeros_like(rhs) if centre == "init" else -init[idx, lo:hi]
            w = w.at[idx, lo:hi].add(_ridge_solve(g, rhs, shift, ridge, method))
        else:
            rhs = cross[idx, lo:hi]
            w = w.at[idx, lo:hi].set(_ridge_solve(g, rhs, jnp.zeros_like(rhs), ridge, method))
    return w, jnp.all(jnp.isfinite(w))


def solve(
    stats: Mapping[str, Mapping[str, Any]], *, ridge: float = 1e-4, ridge_centre: str | None = None
) -> dict[str, dict[str, Any]]:
    """Block-constrained ridge solve of every layer in ``stats``.

    Per layer, three solves (merged outputs on every input, A-only outputs on
    ``[merged, A-only]``, B-only outputs on ``[merged, B-only]``), each
    ``W_S = (G_SS + λI)⁻¹ (C_S + λ W0_S)`` with ``λ = ridge · trace(G_SS) / |S|``
    by Cholesky in fp32 (float64 on the host where fp32 round-off defeats it
    and for layers seen at fewer rows than inputs, :func:`first_solver`; a
    pseudo-inverse by ``eigh`` where there is no ridge to make the system
    definite). Weights outside the allowed sets are exactly zero.

    Args:
      stats: from :func:`layer_statistics`.
      ridge: relative ridge (0 for plain least squares).
      ridge_centre: ``"init"`` pulls towards the merge weights W0 (needs stats
        taken with ``init``), ``"zero"`` towards zero; by default ``"init"``
        where the stats carry W0, else ``"zero"``.

    Returns:
      layer name -> ``{"kernel": [*k, C_in, C_out], "bias": [C_out] (if the
      layer has one), "solver": "cholesky" | "cholesky_f64" | "eigh" (what
      solved it: fp32 Cholesky, float64 Cholesky on the host where fp32 failed
      or would be inaccurate, the pseudo-inverse where both failed),
      "fallback": solver != "cholesky"}``.

    Raises:
      ValueError: a non-finite solution (names the layer), or ``init`` centre
        without init statistics.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge_centre not in (*RIDGE_CENTRES, None):
        raise ValueError(f"ridge_centre must be one of {RIDGE_CENTRES}, got {ridge_centre!r}")
    out = {}
    problems = []
    counts = jax.device_get({name: s["count"] for name, s in stats.items()})
    for name, s in stats.items():
        layer = s["layer"]
        relative = "init" in s
        centre = ridge_centre or ("init" if relative else "zero")
        if centre == "init" and not relative:
            raise ValueError(f"layer {name}: ridge_centre='init' needs statistics taken with init")
        sets = tuple((lo, hi, tuple(int(i) for i in idx)) for lo, hi, idx in _allowed_sets(layer))
        args = (None, s["init"], s["init_grad"]) if relative else (s["cross"], None, None)
        first = first_solver(float(counts[name]), layer.dim)
        problems.append((name, layer, s["gram"], args, sets, centre, first))

    def solve_with(solver, gram, args, sets, centre):
        if solver != "cholesky_f64":
            return _solve_matrix(gram, *args, sets, float(ridge), centre, solver)
        # The result returns to where the sums live.
        home = getattr(gram, "sharding", None)
        one_gram, one_args = on_one_device((gram, args))
        w, ok = _solve_matrix(one_gram, *one_args, sets, float(ridge), centre, solver)
        return (w, ok) if home is None else (jax.device_put(w, home), ok)

    def cholesky(p):
        _, _, gram, args, sets, centre, first = p
        with jax.default_matmul_precision("highest"):
            return solve_with(first, gram, args, sets, centre)

    with jax.default_matmul_precision("highest"):
        # Every layer's Cholesky solve is dispatched before any result is
        # read (on a CPU from several threads, one core each), and their
        # finiteness comes back in one transfer: waiting on each layer in
        # turn would leave an accelerator idle between solves.
        solved = distributed.map_programs(cholesky, problems, cost=lambda p: p[1].dim ** 3)
        finite = jax.device_get([ok for _, ok in solved])
        for problem, (w, _), ok in zip(problems, solved, finite, strict=True):
            name, layer, gram, args, sets, centre, first = problem
            # NaN from Cholesky means the matrix is not positive definite to
            # fp32 round-off (many more columns than rows, a small ridge). The
            # same system in float64 then gives the exact ridge solution; with
            # no ridge on a rank-deficient Gram, the pseudo-inverse gives a
            # least-squares solution.
            solver = first
            if not bool(ok):
                for solver in SOLVERS[SOLVERS.index(first) + 1 :]:
                    w, ok = solve_with(solver, gram, args, sets, centre)
                    if bool(ok):
                        break
            if not bool(ok):
                raise ValueError(
                    f"layer {name}: the least-squares solution is not finite (features overflow?)"
                )
            out[name] = {
                **matrix_to_weights(layer, w),
                "fallback": solver != "cholesky",
                "solver": solver,
            }
    return out


@jax.jit
def _sse_plain(gram, cross, target_sq, w):
    gw = jnp.matmul(gram, w, precision=_HI)
    return jnp.sum(w * gw) - 2.0 * jnp.sum(w * cross) + jnp.sum(target_sq)


@jax.jit
def _sse_relative(gram, init, init_grad, init_sq, w):
    # Taken relative to W0, so round-off scales with the change, not with Σ Ỹ².
    d = w - init
    return (
        jnp.sum(init_sq)
        + 2.0 * jnp.sum(d * init_grad)
        + jnp.sum(d * jnp.matmul(gram, d, precision=_HI))
    )


def residuals(
    stats: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Mapping[str, Any]]
) -> dict[str, float]:
    """Mean squared error of each layer of ``stats`` with the given weights.

    ``Σ ‖X̃W − Ỹ‖² / (rows · C_out)`` from the accumulated sums, for every layer
    present in both ``stats`` and ``weights`` (``{"kernel", "bias"}``).
    """
    sse, counts, c_out = {}, {}, {}
    for name, s in stats.items():
        if name not in weights:
            continue
        layer = s["layer"]
        w = weights_to_matrix(layer, weights[name]["kernel"], weights[name].get("bias"))
        if "init" in s:
            sse[name] = _sse_relative(s["gram"], s["init"], s["init_grad"], s["init_sq"], w)
        else:
            sse[name] = _sse_plain(s["gram"], s["cross"], s["target_sq"], w)
        counts[name], c_out[name] = s["count"], layer.c_out
    # One transfer for all layers, not one wait per layer.
    got, got_counts = jax.device_get((sse, counts))
    # A sum of squares below zero is round-off (the sums are taken relative to W0).
    return {n: max(float(got[n]), 0.0) / (float(got_counts[n]) * c_out[n]) for n in sse}


def initial_residuals(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """:func:`residuals` of the W0 that ``stats`` were taken relative to, read
    off ``Σ (X̃W0 − Ỹ)²`` (no Gram product: it is the same sum for D = 0)."""
    sums = jax.device_get({name: (jnp.sum(s["init_sq"]), s["count"]) for name, s in stats.items()})
    return {
        name: float(sums[name][0]) / (float(sums[name][1]) * s["layer"].c_out)
        for name, s in stats.items()
    }
