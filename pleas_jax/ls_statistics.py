"""Least-squares statistics: the sums the closed-form solve reads, from data.

Per layer, ``G = Σ X̃ᵀX̃``, ``C = Σ X̃ᵀỸ``, ``Σ Ỹ²`` and the row count, plus,
relative to the merge weights W0, ``R0 = Σ X̃ᵀ(X̃W0 − Ỹ)`` and ``Σ (X̃W0 − Ỹ)²``
(layout of X̃ and W: :mod:`pleas_jax.ls_layers`). :func:`batch_sums` is one
batch's contribution: for a conv either from the patch rows or, without
building patches, from shifted products of the input map (the patch Gram of
a k×k conv holds only (2k−1)² distinct shifts, :mod:`pleas_jax.ls_shifts`).
:func:`layer_statistics` accumulates it over the data in sharded passes, one
per chunk of layers under the memory bound (:mod:`pleas_jax.ls_memory`).
:func:`pleas_jax.least_squares.solve` solves from the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from pleas_jax import distributed
from pleas_jax.ls_data import (
    Batches,
    _add,
    _blocks_key,
    _cached,
    _data_passes,
    _features,
    _images,
    _layer_data,
    _select,
)
from pleas_jax.ls_layers import (
    Layer,
    find_layers,
    layer_apply,
    layer_rows,
    matrix_mask,
    matrix_to_weights,
    statistics_bytes,
    weights_to_matrix,
)
from pleas_jax.ls_memory import DEFAULT_MAX_MEMORY_BYTES, _one_shot_error, memory_chunks
from pleas_jax.ls_shifts import (
    _AUTO_EXAMPLES,
    _SHIFT_MIN_SAVING,
    _shift_gram,
    _shift_saving,
    _shifts_apply,
    _windows,
)
from pleas_jax.partial import GroupBlocks
from pleas_jax.products import check_precision, einsum, gram_matrix, matmul

# ----------------------------------------------------------------- statistics
GRAM_METHODS = ("auto", "patches", "shifts")  # "auto": pleas_jax.ls_shifts decides


def _pad_input(layer: Layer, x):
    cfg = [(0, 0, 0), *[(int(lo), int(hi), 0) for lo, hi in layer.padding], (0, 0, 0)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _conv_cross(layer: Layer, xp, yw, precision):
    """``Σ X̃ᵀ y`` of a conv without building patches: ``[dim, C_out]``, from
    the padded input ``xp`` and the targets ``yw`` weighted per example."""
    out_spatial = yw.shape[1:-1]
    sp = "".join("abc"[: len(out_spatial)])
    per_tap = [
        einsum(f"n{sp}c,n{sp}o->co", w, yw, precision) for w in _windows(layer, xp, out_spatial)
    ]
    c = jnp.stack(per_tap, axis=1).reshape(layer.c_in * layer.taps, -1)  # channel-major
    if layer.bias:
        c = jnp.concatenate([c, jnp.sum(yw.reshape(-1, yw.shape[-1]), axis=0)[None]], axis=0)
    return c


def batch_sums(
    layer: Layer,
    x,
    y,
    mask,
    init: Mapping[str, Any] | None = None,
    *,
    gram: str = "auto",
    precision: Any = "highest",
    target_gram: bool = False,
) -> dict[str, Any]:
    """One batch's contribution to :func:`layer_statistics` for one layer.

    Args:
      layer: the layer.
      x: its merged input ``[N, *spatial, C_in]`` (fp32).
      y: its merged target ``[N, *out_spatial, C_out]``.
      mask: ``[N]`` 1 for real examples, 0 for padding, or ``None`` when
        every example counts (no masked copies of the features are made). The
        Grams are formed from masked features on both sides, which takes
        ``w² = w``.
      init: optional ``{"kernel", "bias"}``, W0 (masked).
      gram: ``"patches"`` (``XᵀX`` of the patch rows), ``"shifts"`` (from
        shifted products of the input map, :func:`_shift_gram`; stride-1 2-D
        convs, other layers use patches) or ``"auto"``: shifts where they are
        estimated to cost at most 2/3 of patches at 64 examples per device
        (:func:`_shift_saving`; for a 3x3 conv, maps of 8x8 and up), else
        patches. Both give the same sums up to fp32 round-off.
      precision: matmul precision of the sums: ``"highest"`` (fp32),
        ``"bf16_3x"`` or ``"bfloat16"`` (:mod:`pleas_jax.products`), or a
        ``jax.lax.Precision``.
      target_gram: also return ``"target_gram" [C_out, C_out]`` (Σ ỸᵀỸ).

    Returns:
      ``{"gram", "cross", "target_sq", "count"}`` (+ ``"init_grad"``,
      ``"init_sq"`` with ``init``), shapes as in :func:`layer_statistics`.
    """
    if gram not in GRAM_METHODS:
        raise ValueError(f"gram must be one of {GRAM_METHODS}, got {gram!r}")
    use_shifts = _shifts_apply(layer) and (
        gram == "shifts"
        or (
            gram == "auto"
            and _shift_saving(layer, x.shape[1:-1], _AUTO_EXAMPLES) >= _SHIFT_MIN_SAVING
        )
    )
    if layer.kind == "conv":
        padded = [s + lo + hi for s, (lo, hi) in zip(x.shape[1:-1], layer.padding, strict=True)]
        expect = tuple(
            (p - d * (k - 1) - 1) // st + 1
            for p, k, st, d in zip(
                padded, layer.kernel_size, layer.strides, layer.dilation, strict=True
            )
        )
        if expect != tuple(y.shape[1:-1]):
            raise ValueError(
                f"layer {layer.name}: input {x.shape} with kernel {layer.kernel_size}, strides "
                f"{layer.strides}, padding {layer.padding} gives {expect} positions, the output has "
                f"{tuple(y.shape[1:-1])}"
            )
    n_out = math.prod(y.shape[1:-1])
    y2 = y.reshape(-1, layer.c_out)
    if mask is None:

        def rows_w(a):
            return a

        def examples_w(a):
            return a

        count = jnp.asarray(y2.shape[0], jnp.float32)
    else:
        mask = mask.astype(jnp.float32)
        w = jnp.repeat(mask, n_out)[:, None]

        def rows_w(a):  # [rows, k], rows example-major
            return a * w

        def examples_w(a):  # [N, ...]
            return a * mask.reshape((-1,) + (1,) * (a.ndim - 1))

        count = jnp.sum(w)
    out = {"target_sq": jnp.sum(rows_w(y2) * y2, axis=0), "count": count}
    if target_gram:
        out["target_gram"] = gram_matrix(rows_w(y2), precision)
    if use_shifts:
        xp = _pad_input(layer, x)
        g = _shift_gram(layer, xp, examples_w(xp), precision)
        out["gram"] = g.at[-1, -1].set(out["count"]) if layer.bias else g
        out["cross"] = _conv_cross(layer, xp, examples_w(y), precision)
        if init is not None:
            err = layer_apply(layer, x, init) - y
            out["init_grad"] = _conv_cross(layer, xp, examples_w(err), precision)
            err2 = err.reshape(-1, layer.c_out)
            out["init_sq"] = jnp.sum(rows_w(err2) * err2, axis=0)
        return out
    rows = layer_rows(layer, x)
    rw = rows_w(rows)
    out["gram"] = gram_matrix(rw, precision)
    out["cross"] = matmul(rw.T, y2, precision)
    if init is not None:
        # From the rows already built, not a conv: XLA:CPU convs over maps of
        # a few positions run ~100x below its GEMM speed.
        w0 = weights_to_matrix(layer, init["kernel"], init.get("bias"))
        err = matmul(rows, w0, precision) - y2
        out["init_grad"] = matmul(rw.T, err, precision)
        out["init_sq"] = jnp.sum(rows_w(err) * err, axis=0)
    return out


def _statistics_fn(
    module_a, module_b, layers, blocks, precision, gram, target_gram=False, masked=True
):
    # masked=False: the version for batches without padding, which ignores
    # the mask (no masked copies of features or patch rows).
    def fn(replicated, x, mask):
        mask = mask if masked else None
        va, vb, init = replicated
        fa, fb = _features(module_a, va, x), _features(module_b, vb, x)
        out = {}
        for name, layer in layers.items():
            xin, y = _layer_data(layer, blocks, fa, fb)
            w0 = None if init is None else matrix_to_weights(layer, init[name])
            out[name] = batch_sums(
                layer, xin, y, mask, w0, gram=gram, precision=precision, target_gram=target_gram
            )
        return out

    return fn


def layer_statistics(
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec: Mapping[str, Any],
    blocks: Mapping[str, GroupBlocks],
    batches: Batches,
    *,
    init: Mapping[str, Mapping[str, Any]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    layers: Iterable[str] | None = None,
    precision: Any = "highest",
    gram: str = "auto",
    target_gram: bool = False,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Sums for the closed-form solve of every merged layer, one pass over data
    per chunk of layers.

    Per batch, both source models run with their features recorded; for every
    layer, X̃ and Ỹ are built (:mod:`pleas_jax.least_squares`) and the sums below accumulate
    in fp32, each device summing its shard of the batch, then ``psum``.

    Memory: the layers are split, in forward order, into consecutive chunks
    whose sums fit ``max_memory_bytes`` (:func:`pleas_jax.ls_memory.memory_chunks`), and each chunk
    takes its own pass over the data, so the device accumulates one chunk's
    sums at a time (plus one batch's contribution to them while it is added,
    and the models' features). With more than one chunk, every finished chunk
    is copied to host memory (numpy arrays in the result), so the bound holds
    for the whole call; with one chunk the sums stay on the device.

    Args:
      module_a, variables_a, module_b, variables_b: the two source models.
      spec: their permutation spec; blocks: merge blocks per group.
      batches: images ``[N, H, W, C]`` (or ``(images, labels)``) per batch: a
        list (or other re-iterable), a callable returning a fresh iterator,
        or a one-shot iterator (only when one chunk suffices).
      init: optional layer name -> ``{"kernel", "bias"}`` of the merged model
        (:func:`pleas_jax.ls_layers.weights_of`), the W0 the solve and residuals are taken
        relative to.
      mesh: a 1-D data mesh (all local devices by default).
      layers: only these layer names (default: every conv/dense layer).
      precision: matmul precision of the sums, ``"highest"`` (fp32, the
        default), ``"bf16_3x"`` (bf16 tensor-core products with ~fp32
        accuracy, for GPUs and TPUs) or ``"bfloat16"``
        (:mod:`pleas_jax.products`).
      gram: how conv Grams are formed, ``"auto"``, ``"patches"`` or
        ``"shifts"`` (:func:`batch_sums`).
      target_gram: also accumulate ``"target_gram" [C_out, C_out]`` (Σ ỸᵀỸ).
      max_memory_bytes: bound on one chunk's sums (fp32 bytes,
        :func:`pleas_jax.ls_layers.statistics_bytes`); ``None``: every layer in one pass.
      progress: show a progress bar.

    Returns:
      layer name -> ``{"layer": Layer, "gram": [dim, dim], "cross": [dim, C_out],
      "target_sq": [C_out] (Σ Ỹ²), "count": [] (rows)}``, plus with ``init``:
      ``"init": [dim, C_out]`` (W0), ``"init_grad": [dim, C_out]``
      (Σ X̃ᵀ(X̃W0 − Ỹ)) and ``"init_sq": [C_out]`` (Σ (X̃W0 − Ỹ)²).

    Raises:
      ValueError: no data, a layer least squares cannot handle, a one-shot
        iterator where several passes are needed;
        :class:`pleas_jax.ls_memory.StatisticsOverBound` (a ``ValueError``) for a layer whose sums
        alone exceed ``max_memory_bytes`` (raised before any pass).
    """
    if gram not in GRAM_METHODS:
        raise ValueError(f"gram must be one of {GRAM_METHODS}, got {gram!r}")
    check_precision(precision)
    first, next_pass, one_shot = _data_passes(batches, "least squares")
    example = _images(first)[:1]
    all_layers = find_layers(module_a, variables_a, spec, blocks, example)
    chosen = _select(all_layers, layers)
    kw = {"init": init is not None, "target_gram": target_gram}
    chunks = memory_chunks(chosen, max_memory_bytes, **kw)
    if one_shot and len(chunks) > 1:
        total = sum(statistics_bytes(lay, **kw) for lay in chosen.values())
        raise _one_shot_error("least-squares statistics", len(chunks), total, max_memory_bytes)
    mesh = mesh or distributed.data_mesh()
    out = {}
    for i, chunk in enumerate(chunks):
        part = {n: chosen[n] for n in chunk}
        init_m = None
        if init is not None:
            # Forbidden entries of W0 are zero by construction; masking keeps R0
            # consistent with the masked solution even for a hand-made W0.
            init_m = {
                n: weights_to_matrix(lay, init[n]["kernel"], init[n].get("bias"))
                * jnp.asarray(matrix_mask(lay), jnp.float32)
                for n, lay in part.items()
            }
        key = (
            "statistics",
            module_a,
            module_b,
            tuple(part.values()),
            _blocks_key(blocks, part),
            precision,
            gram,
            mesh,
            init_m is None,
            target_gram,
        )

        def step_for(masked, key=key, part=part):
            return _cached(
                (*key, masked),
                lambda: distributed.batch_sum(
                    _statistics_fn(
                        module_a, module_b, part, blocks, precision, gram, target_gram, masked
                    ),
                    mesh,
                ),
            )

        replicated = (variables_a, variables_b, init_m)
        desc = "least-squares statistics" + (f" ({i + 1}/{len(chunks)})" if len(chunks) > 1 else "")
        acc = None
        # tqdm shows the total where the pass has a length (_data_passes keeps it).
        for batch in tqdm(next_pass(), desc=desc, disable=not progress, leave=False):
            images = _images(batch)
            step = step_for(distributed.is_padded(len(images), mesh))
            x, mask = distributed.shard_batch(images, mesh)
            s = step(replicated, x, mask)
            acc = s if acc is None else _add(acc, s)
            # Drop this batch's sums now: held until the next step is
            # dispatched, they would make the peak three chunks, not two.
            del s
        if acc is None:
            raise ValueError(
                f"least-squares statistics: pass {i + 1} of {len(chunks)} got no batches"
            )
        if init_m is not None:
            acc = {n: {**acc[n], "init": init_m[n]} for n in part}
        if len(chunks) > 1:
            # To the host, so that the device holds one chunk at a time.
            acc = jax.device_get(acc)
        for name, layer in part.items():
            out[name] = {"layer": layer, **acc[name]}
    return out
