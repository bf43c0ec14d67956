"""Least squares: refit every conv/dense layer of the merged model (the "LeaS").

Every layer of the merged model reads channels ``[merged | A-only | B-only]``
and writes channels in the same order. Its regression inputs X̃ and targets Ỹ
come from the two *source* models on the same batch, not from the merged
model: merged channels are the average of the matched A and B channels,
separate channels are copied (:func:`pleas_jax.partial.combine`), taken at the
layer's input and at its output before normalisation.

One row of X̃ per output position. For a conv the row is the input patch that
position sees, flattened channel-major (column ``c * taps + offset``, with
``taps = prod(kernel_size)`` and the offset in row-major kernel order), so an
input channel's patch columns are contiguous; a layer with a bias gets a last
column of ones. A kernel ``[*kernel_size, C_in, C_out]`` is the matrix
``[C_in * taps (+1), C_out]`` (:func:`weights_to_matrix`).

A-only outputs may not read B-only inputs and vice versa, so each layer splits
into three independent ridge regressions: merged outputs on every input,
A-only outputs on ``[merged, A-only]``, B-only outputs on ``[merged, B-only]``
(the bias column is always allowed). Each is solved in closed form from sums
accumulated in sharded passes over the data (:func:`layer_statistics`; one
pass unless the sums exceed a memory bound, then one per chunk of layers):

    G = Σ X̃ᵀX̃,  C = Σ X̃ᵀỸ,  W_S = (G_SS + λI)⁻¹ (C_S + λ W0_S),
    λ = ridge · trace(G_SS) / |S|.

W0 is the ridge's centre. ``"init"`` (the default of :func:`least_squares`)
centres it on the partial-merge weights: a direction the data does not excite
keeps its merged value instead of collapsing to zero, a layer the merge
already gets exactly right stays exact (budget 2 keeps the ensemble), and as
the ridge vanishes the result is the least-squares solution nearest W0, the
one plain gradient descent started from W0 converges to. ``"zero"`` is the
textbook ridge ``(G + λI)⁻¹ C``; at ridge 1e-4 it shrinks every layer a
little, which on a budget-2 ResNet-20 compounds to 5e-3 of the logit scale
(``"init"``: 3e-7). Cholesky runs in fp32 on the Jacobi-scaled matrix, with
an ``eigh`` pseudo-inverse where it fails. When the statistics carry
the merge weights W0, the solve and the residuals are written relative to W0
(they also accumulate ``R0 = Σ X̃ᵀ(X̃W0 − Ỹ)`` and the exact residual of W0), so
fp32 round-off scales with how far the solution moves rather than with the
targets' energy.

The gradient mode (:func:`gradient_descent`) minimises the same masked
per-layer mean squared error with optax from features recomputed per batch,
as the paper's code does; it also serves layers whose Gram would exceed a
memory bound.

This module holds the solve and the whole fit; the pieces live in modules
of one concept each, re-exported here so that callers keep one place to
import least squares from: layer geometry and the kernel <-> matrix layout
(:mod:`pleas_jax.ls_layers`), the features both modes read per batch
(:mod:`pleas_jax.ls_data`), the statistics (:mod:`pleas_jax.ls_statistics`),
their memory bound (:mod:`pleas_jax.ls_memory`) and the gradient mode
(:mod:`pleas_jax.ls_descent`). Layer geometry (kernel size, strides,
padding, dilation, bias) is read from the Flax modules while tracing the
forward pass (every ``nn.Conv`` and ``nn.Dense`` call is intercepted), not
guessed from shapes, and the patch geometry is checked against the output
shape the layer records.

Example::

    blocks = partial.full_blocks(spec, identity(spec), 0.5)
    merged_module, merged = partial.partial_merge(module, spec, blocks, va, vb)
    merged, report = least_squares(module, va, module, vb, spec, blocks,
                                   merged_module, merged, batches)
    report["layers"]["layer1_0/conv1"]   # {"before": ..., "after": ..., ...}
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax import distributed
from pleas_jax.ls_data import Batches, _data_passes, _images
from pleas_jax.ls_descent import feature_residuals, gradient_descent
from pleas_jax.ls_layers import (
    _HI,
    Layer,
    apply_solution,
    channel_mask,
    find_layers,
    layer_apply,
    layer_rows,
    matrix_mask,
    matrix_to_weights,
    statistics_bytes,
    weights_of,
    weights_to_matrix,
)
from pleas_jax.ls_memory import (
    DEFAULT_MAX_MEMORY_BYTES,
    MEMORY_BUDGETS,
    StatisticsOverBound,
    _one_shot_error,
    memory_chunks,
    memory_report,
    statistics_memory,
)
from pleas_jax.ls_statistics import GRAM_METHODS, batch_sums, layer_statistics
from pleas_jax.partial import GroupBlocks
from pleas_jax.products import PRECISION_MODES, check_precision

# The public names of least squares, wherever they are defined: the ls_*
# modules' names are imported above so that callers keep importing them from
# here.
__all__ = [
    "DEFAULT_MAX_MEMORY_BYTES",
    "GRAM_METHODS",
    "MEMORY_BUDGETS",
    "MODES",
    "PRECISION_MODES",
    "RIDGE_CENTRES",
    "Layer",
    "StatisticsOverBound",
    "apply_solution",
    "batch_sums",
    "channel_mask",
    "feature_residuals",
    "find_layers",
    "gradient_descent",
    "initial_residuals",
    "layer_apply",
    "layer_rows",
    "layer_statistics",
    "least_squares",
    "matrix_mask",
    "matrix_to_weights",
    "memory_chunks",
    "memory_report",
    "residuals",
    "solve",
    "statistics_bytes",
    "statistics_memory",
    "weights_of",
    "weights_to_matrix",
]

MODES = ("closed_form", "gd")
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
    s, v = jnp.linalg.eigh(a)
    tol = jnp.finfo(a.dtype).eps * a.shape[0] * jnp.max(jnp.abs(s))
    keep = s > tol
    inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    return jnp.matmul(v, inv[:, None] * jnp.matmul(v.T, c, precision=_HI), precision=_HI)


def _ridge_solve(g, rhs, centre, ridge, method):
    """``(g + λI)⁻¹ (rhs + λ centre)`` with ``λ = ridge · trace(g) / n``, by
    Cholesky or by an eigendecomposition pseudo-inverse."""
    n = g.shape[0]
    g = 0.5 * (g + g.T)
    tr = jnp.trace(g)
    # A block whose inputs are all zero (dead units) has g = 0 and rhs = 0:
    # any positive λ then returns the centre, the limit of a vanishing ridge.
    lam = jnp.where(tr > 0, ridge * tr / n, 1.0)
    a = g + lam * jnp.eye(n, dtype=g.dtype)
    b = rhs + lam * centre
    if method == "eigh":
        return _pinv_solve(a, b)
    # Jacobi scaling (unit diagonal) changes nothing in exact arithmetic and
    # keeps channels of very different energy from spoiling fp32 Cholesky.
    d = jnp.diagonal(a)
    s = jnp.where(d > 0, jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 1.0)
    a = a * s[:, None] * s[None, :]
    w = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), b * s[:, None])
    return w * s[:, None]


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
    by Cholesky in fp32 (pseudo-inverse by ``eigh`` where that fails). Weights
    outside the allowed sets are exactly zero.

    Args:
      stats: from :func:`layer_statistics`.
      ridge: relative ridge (0 for plain least squares).
      ridge_centre: ``"init"`` pulls towards the merge weights W0 (needs stats
        taken with ``init``), ``"zero"`` towards zero; by default ``"init"``
        where the stats carry W0, else ``"zero"``.

    Returns:
      layer name -> ``{"kernel": [*k, C_in, C_out], "bias": [C_out] (if the
      layer has one), "fallback": bool (a block needed the pseudo-inverse)}``.

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
    for name, s in stats.items():
        layer = s["layer"]
        relative = "init" in s
        centre = ridge_centre or ("init" if relative else "zero")
        if centre == "init" and not relative:
            raise ValueError(f"layer {name}: ridge_centre='init' needs statistics taken with init")
        sets = tuple((lo, hi, tuple(int(i) for i in idx)) for lo, hi, idx in _allowed_sets(layer))
        args = (None, s["init"], s["init_grad"]) if relative else (s["cross"], None, None)
        problems.append((name, layer, s["gram"], args, sets, centre))

    def cholesky(p):
        _, _, gram, args, sets, centre = p
        with jax.default_matmul_precision("highest"):
            return _solve_matrix(gram, *args, sets, float(ridge), centre, "cholesky")

    with jax.default_matmul_precision("highest"):
        # Every layer's Cholesky solve is dispatched before any result is
        # read (on a CPU from several threads, one core each), and their
        # finiteness comes back in one transfer: waiting on each layer in
        # turn would leave an accelerator idle between solves.
        solved = distributed.map_programs(cholesky, problems, cost=lambda p: p[1].dim ** 3)
        finite = jax.device_get([ok for _, ok in solved])
        for problem, (w, _), ok in zip(problems, solved, finite, strict=True):
            name, layer, gram, args, sets, centre = problem
            # NaN from Cholesky means the matrix is not positive definite (no
            # ridge on a rank-deficient Gram, or round-off); the pseudo-inverse
            # then gives the least-squares solution of smallest norm.
            fb = not bool(ok)
            if fb:
                w, finite = _solve_matrix(gram, *args, sets, float(ridge), centre, "eigh")
                if not bool(finite):
                    raise ValueError(
                        f"layer {name}: the least-squares solution is not finite (features overflow?)"
                    )
            out[name] = {**matrix_to_weights(layer, w), "fallback": fb}
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
    return {n: float(got[n]) / (float(got_counts[n]) * c_out[n]) for n in sse}


def initial_residuals(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """:func:`residuals` of the W0 that ``stats`` were taken relative to, read
    off ``Σ (X̃W0 − Ỹ)²`` (no Gram product: it is the same sum for D = 0)."""
    sums = jax.device_get({name: (jnp.sum(s["init_sq"]), s["count"]) for name, s in stats.items()})
    return {
        name: float(sums[name][0]) / (float(sums[name][1]) * s["layer"].c_out)
        for name, s in stats.items()
    }


# ----------------------------------------------------------------- top level
def least_squares(
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec: Mapping[str, Any],
    blocks: Mapping[str, GroupBlocks],
    merged_module,
    merged_variables: Mapping[str, Any],
    batches: Batches,
    *,
    mode: str = "closed_form",
    ridge: float = 1e-4,
    ridge_centre: str = "init",
    max_gram_bytes: int = 1 << 30,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
    steps: int = 400,
    learning_rate: float = 5e-4,
    mesh: jax.sharding.Mesh | None = None,
    precision: Any = "highest",
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Refit every conv/dense layer of the merged model (PLeaS step 3).

    Args:
      module_a, variables_a, module_b, variables_b: the source models (B in
        its original unit order; ``blocks`` carry the matching).
      spec, blocks: permutation spec and merge blocks per group.
      merged_module, merged_variables: the partial merge
        (:func:`pleas_jax.partial.partial_merge`), whose weights start the
        refit and centre the ridge.
      batches: images ``[N, H, W, C]`` (or ``(images, labels)``) per batch: a
        list (or other re-iterable), a callable returning a fresh iterator,
        or a one-shot iterator (read into a list when gradient descent needs
        several passes; refused when several statistics chunks would).
      mode: ``"closed_form"`` (ridge solve per block; layers too large for
        the bounds below fall back to gradient descent) or ``"gd"``
        (gradient descent on every layer).
      ridge, ridge_centre: see :func:`solve`.
      max_gram_bytes, max_memory_bytes: a layer is solved in closed form only
        when its Gram fits ``max_gram_bytes`` *and* its statistics
        (:func:`statistics_bytes`) fit ``max_memory_bytes``, so the tighter
        bound wins (by default the 1 GiB Gram bound). The closed-form layers
        are then split in forward order into chunks whose statistics fit
        ``max_memory_bytes`` (``None``: one chunk); each chunk takes one pass
        over the data, is solved, and is freed before the next, so the device
        holds one chunk's sums at a time.
      steps, learning_rate: gradient mode (:func:`gradient_descent`).
      mesh, progress: as for :func:`layer_statistics`.
      precision: matmul precision of the closed-form sums, ``"highest"``
        (fp32), ``"bf16_3x"`` or ``"bfloat16"`` (:mod:`pleas_jax.products`).

    Returns:
      ``(variables, report)``: the merged variables with refitted kernels and
      biases (BatchNorm statistics untouched), and ``{"mode", "ridge",
      "seconds": {stage: s}, "layers": {name: {"method", "before", "after",
      "fallback"}}, "memory": {...}}`` with each layer's mean squared error
      before (partial merge weights) and after, and the statistics chunks
      (:func:`memory_report`: ``"chunks"``, ``"passes"``,
      ``"peak_statistics_bytes"``, ``"total_statistics_bytes"``,
      ``"chunk_bytes"``, ``"bound"``).

    Raises:
      ValueError: an unknown mode, no data, merged variables that do not fit
        the blocks, or a one-shot iterator where several chunks need passes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ridge_centre not in RIDGE_CENTRES:
        raise ValueError(f"ridge_centre must be one of {RIDGE_CENTRES}, got {ridge_centre!r}")
    check_precision(precision)
    first, next_pass, one_shot = _data_passes(batches, "least squares")
    example = _images(first)[:1]
    layers = find_layers(module_a, variables_a, spec, blocks, example)
    _check_geometry(layers, find_layers(merged_module, merged_variables, {}, {}, example))
    init = weights_of(merged_variables, layers)
    if mode == "gd":
        closed, descent = {}, dict(layers)
    else:
        closed = {
            n: lay
            for n, lay in layers.items()
            if lay.gram_bytes <= max_gram_bytes
            and (max_memory_bytes is None or statistics_bytes(lay) <= max_memory_bytes)
        }
        descent = {n: lay for n, lay in layers.items() if n not in closed}
    chunks = memory_chunks(closed, max_memory_bytes)
    memory = memory_report(closed, chunks, max_memory_bytes)
    if descent and one_shot:
        # Several passes follow (gradient steps cycle through the batches):
        # keep the data, as gradient_descent would.
        data = list(next_pass())
        next_pass, one_shot = (lambda: data), False
    if one_shot and len(chunks) > 1:
        raise _one_shot_error(
            "least squares", len(chunks), memory["total_statistics_bytes"], max_memory_bytes
        )
    mesh = mesh or distributed.data_mesh()
    seconds: dict[str, float] = {}
    report_layers: dict[str, dict[str, Any]] = {}
    solution: dict[str, dict[str, Any]] = {}
    for chunk in chunks:
        t0 = time.perf_counter()
        stats = layer_statistics(
            module_a,
            variables_a,
            module_b,
            variables_b,
            spec,
            blocks,
            next_pass(),
            init={n: init[n] for n in chunk},
            mesh=mesh,
            layers=chunk,
            precision=precision,
            max_memory_bytes=max_memory_bytes,
            progress=progress,
        )
        jax.block_until_ready(stats)
        seconds["statistics"] = seconds.get("statistics", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        part = solve(stats, ridge=ridge, ridge_centre=ridge_centre)
        jax.block_until_ready(part)
        seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - t0
        before, after = initial_residuals(stats), residuals(stats, part)
        solution.update(part)
        for n in chunk:
            report_layers[n] = {
                "method": "closed_form",
                "before": before[n],
                "after": after[n],
                "fallback": part[n]["fallback"],
            }
        del stats  # the next chunk's sums take its place on the device
    if descent:
        t0 = time.perf_counter()
        d_init = {n: init[n] for n in descent}
        fitted, _ = gradient_descent(
            module_a,
            variables_a,
            module_b,
            variables_b,
            spec,
            blocks,
            d_init,
            next_pass(),
            steps=steps,
            learning_rate=learning_rate,
            mesh=mesh,
            progress=progress,
        )
        jax.block_until_ready(fitted)
        seconds["gradient"] = time.perf_counter() - t0
        models_ab = (module_a, variables_a, module_b, variables_b, spec, blocks)
        before = feature_residuals(*models_ab, d_init, next_pass(), mesh=mesh, progress=progress)
        after = feature_residuals(*models_ab, fitted, next_pass(), mesh=mesh, progress=progress)
        solution.update(fitted)
        for n in descent:
            report_layers[n] = {
                "method": "gd",
                "before": before[n],
                "after": after[n],
                "fallback": False,
            }
    variables = apply_solution(merged_variables, solution)
    report = {
        "mode": mode,
        "ridge": ridge,
        "ridge_centre": ridge_centre,
        "seconds": seconds,
        "layers": {n: report_layers[n] for n in layers},
        "memory": memory,
    }
    return variables, report


def _check_geometry(source: Mapping[str, Layer], merged: Mapping[str, Layer]) -> None:
    """The merged model has the source's layers, geometry and widths."""
    if list(source) != list(merged):
        raise ValueError(
            f"the merged model's layers {list(merged)} differ from the source's {list(source)}"
        )
    for n, s in source.items():
        m = merged[n]
        if (s.kind, s.kernel_size, s.strides, s.padding, s.dilation, s.bias) != (
            m.kind,
            m.kernel_size,
            m.strides,
            m.padding,
            m.dilation,
            m.bias,
        ):
            raise ValueError(f"layer {n} has another geometry in the merged model")
        if s.kernel_shape != m.kernel_shape:
            raise ValueError(
                f"params/{n}/kernel of the merged model has shape {m.kernel_shape}, the blocks give "
                f"{s.kernel_shape}"
            )
