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
(``"init"``: 3e-7). Cholesky runs in fp32 on the Jacobi-scaled matrix; where
fp32 round-off defeats it (wide layers on few rows) the same system is solved
in float64 on the host, and with no ridge to make it definite by an ``eigh``
pseudo-inverse (:mod:`pleas_jax.ls_solve`). When the statistics carry
the merge weights W0, the solve and the residuals are written relative to W0
(they also accumulate ``R0 = Σ X̃ᵀ(X̃W0 − Ỹ)`` and the exact residual of W0), so
fp32 round-off scales with how far the solution moves rather than with the
targets' energy.

The gradient mode (:func:`gradient_descent`) minimises the same masked
per-layer mean squared error with optax from features recomputed per batch,
as the paper's code does; it also serves layers whose Gram would exceed a
memory bound.

This module holds the whole fit; the pieces live in modules of one concept
each, re-exported here so that callers keep one place to import least squares
from: layer geometry and the kernel <-> matrix layout
(:mod:`pleas_jax.ls_layers`), the features both modes read per batch
(:mod:`pleas_jax.ls_data`), the statistics (:mod:`pleas_jax.ls_statistics`)
and their memory bound (:mod:`pleas_jax.ls_memory`), the closed-form solve
(:mod:`pleas_jax.ls_solve`) and the gradient mode (:mod:`pleas_jax.ls_descent`). Layer geometry (kernel size, strides,
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

import time
from collections.abc import Mapping
from typing import Any

import jax

from pleas_jax import distributed
from pleas_jax.ls_data import Batches, _data_passes, _images
from pleas_jax.ls_descent import feature_residuals, gradient_descent
from pleas_jax.ls_layers import (
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
from pleas_jax.ls_solve import RIDGE_CENTRES, initial_residuals, residuals, solve
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
    max_gram_bytes: int | None = None,
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
        when its statistics (:func:`statistics_bytes`, its Gram included) fit
        ``max_memory_bytes`` and, if given, its Gram fits ``max_gram_bytes``
        (``None``: no bound of its own, so ``merge``'s ``max_memory_bytes``
        alone decides, as :func:`statistics_memory` reports). The closed-form layers
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
            if (max_gram_bytes is None or lay.gram_bytes <= max_gram_bytes)
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
                "solver": part[n]["solver"],
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
                "solver": None,
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
