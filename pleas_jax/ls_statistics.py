"""Least-squares statistics: the sums the closed-form solve reads, from data.

Per layer, ``G = Σ X̃ᵀX̃``, ``C = Σ X̃ᵀỸ``, ``Σ Ỹ²`` and the row count, plus,
relative to the merge weights W0, ``R0 = Σ X̃ᵀ(X̃W0 − Ỹ)`` and ``Σ (X̃W0 − Ỹ)²``
(layout of X̃ and W: :mod:`pleas_jax.ls_layers`). :func:`batch_sums` is one
batch's contribution: for a conv either from the patch rows or, without
building patches, from shifted products of the input map (the patch Gram of
a k×k conv holds only (2k−1)² distinct shifts, :func:`_shift_gram`).
:func:`layer_statistics` accumulates it over the data in sharded passes, one
per chunk of layers under the memory bound (:mod:`pleas_jax.ls_memory`).
:func:`pleas_jax.least_squares.solve` solves from the result.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pleas_jax import distributed
from pleas_jax.ls_data import (
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
from pleas_jax.partial import GroupBlocks
from pleas_jax.products import check_precision, einsum, matmul

# ----------------------------------------------------------------- statistics
GRAM_METHODS = ("auto", "patches", "shifts")
# "auto" takes the shift Gram where :func:`_shift_saving` estimates it at most
# 2/3 of the patch Gram's cost. The estimate counts multiply-adds plus the
# per-batch assembly of the taps² blocks, ~400 multiply-adds' worth per Gram
# entry (measured on CPU; memory-bound on a GPU too). Measured on one layer's
# sums (CPU, fp32, 3x3 convs, bench/gram.py and its predecessor): shifts were
# 1.4-2.5x faster from 8x8 maps up at batch 64 and from 14x14 up at batch 8,
# break-even at 4x4, and slower at 2x2 (batch 64) and 7x7 (batch 8), where the
# assembly dominates; the estimate picks the faster one in each of these.
_SHIFT_MIN_SAVING = 1.5
_ASSEMBLY_MACS = 400.0
# The choice is made for this many examples per device, not the shard's own
# count: the two ways round off differently, and the sums must not depend on
# how many devices share a batch (tests/test_ls_statistics.py, 8 devices).
_AUTO_EXAMPLES = 64


def _pad_input(layer: Layer, x):
    cfg = [(0, 0, 0), *[(int(lo), int(hi), 0) for lo, hi in layer.padding], (0, 0, 0)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _windows(layer: Layer, xp, out_spatial):
    """Per kernel offset (row-major), the strided slice of the padded input
    ``xp [N, *spatial, C]`` that meets it: each ``[N, *out_spatial, C]``."""
    for offs in itertools.product(*(range(k) for k in layer.kernel_size)):
        start = (0, *(o * d for o, d in zip(offs, layer.dilation, strict=True)), 0)
        limit = (xp.shape[0], *(s + st * (n - 1) + 1 for s, st, n in
                                zip(start[1:-1], layer.strides, out_spatial, strict=True)), xp.shape[-1])
        yield jax.lax.slice(xp, start, limit, (1, *layer.strides, 1))


def _conv_cross(layer: Layer, xp, yw, precision):
    """``Σ X̃ᵀ y`` of a conv without building patches: ``[dim, C_out]``, from
    the padded input ``xp`` and the targets ``yw`` weighted per example."""
    out_spatial = yw.shape[1:-1]
    sp = "".join("abc"[: len(out_spatial)])
    per_tap = [einsum(f"n{sp}c,n{sp}o->co", w, yw, precision)
               for w in _windows(layer, xp, out_spatial)]
    c = jnp.stack(per_tap, axis=1).reshape(layer.c_in * layer.taps, -1)  # channel-major
    if layer.bias:
        c = jnp.concatenate([c, jnp.sum(yw.reshape(-1, yw.shape[-1]), axis=0)[None]], axis=0)
    return c


def _shifts_apply(layer: Layer) -> bool:
    """The shift-structured Gram covers 2-D convs with stride and dilation 1."""
    return (layer.kind == "conv" and len(layer.kernel_size) == 2 and layer.taps > 1
            and all(s == 1 for s in layer.strides) and all(d == 1 for d in layer.dilation))


def _shift_saving(layer: Layer, spatial, examples: int) -> float:
    """Estimated cost of the patch Gram over that of the shift Gram, for a
    layer that :func:`_shifts_apply` to, on ``examples`` input maps of
    ``spatial`` positions (per channel pair: multiply-adds, plus the shift
    Gram's per-batch block assembly)."""
    ext = []
    for n, (lo, hi), k in zip(spatial, layer.padding, layer.kernel_size, strict=True):
        padded = n + lo + hi
        out = padded - k + 1
        inner = range(max(lo, 0), padded - max(hi, 0))
        border = sum(1 for y in inner if not k - 1 <= y < out)
        ext.append((out, len(inner) + border))
    shifts = ((2 * layer.kernel_size[0] - 1) * (2 * layer.kernel_size[1] - 1) + 1) // 2
    patch = layer.taps ** 2 * ext[0][0] * ext[1][0] * examples
    shift = shifts * ext[0][1] * ext[1][1] * examples + _ASSEMBLY_MACS * layer.taps ** 2
    return patch / shift


def _shift_gram(layer: Layer, xp, xpw, precision):
    """Patch Gram of a stride-1 conv from shifted products of its input map.

    Block ``(t, t')`` of the Gram sums ``xpw[u] ⊗ xp[u + δ]`` (``δ = t' − t``)
    over the window ``W_t`` of positions ``u`` that kernel offset ``t`` sees.
    The ``taps²`` blocks share only ``(2k−1)²`` shifts (half of them by
    symmetry), and the windows of one shift differ only in a few border rows
    and columns. So per shift one GEMM sums over every position where
    ``xpw`` can be non-zero (``Y × X``: the input, not the padding), and
    small GEMMs over the border rows, the border columns and their crossings
    take away what a window leaves out (inclusion-exclusion):
    ``Σ_{W_t} = Σ_{Y×X} − Σ_{(Y∖W_y)×X} − Σ_{Y×(X∖W_x)} + Σ_{(Y∖W_y)×(X∖W_x)}``.
    A 3×3 conv thus costs ~13 products per position instead of the patch
    Gram's 81, all as GEMMs contracting over examples and positions.
    ``xp``: the padded input ``[N, Hp, Wp, C]``; ``xpw``: the same weighted
    per example.
    """
    ky, kx = layer.kernel_size
    _, hp, wp, c = xp.shape
    ho, wo = hp - ky + 1, wp - kx + 1
    deltas = [(dy, dx) for dy in range(-(ky - 1), ky) for dx in range(-(kx - 1), kx) if (dy, dx) >= (0, 0)]
    # Where xpw can be non-zero: inside the padding (a negative pad crops).
    (y0, y1), (x0, x1) = ((max(lo, 0), n - max(hi, 0))
                          for (lo, hi), n in zip(layer.padding, (hp, wp), strict=True))
    # Zero margins let every shift read one [Y, X] range; the margins only
    # meet offset pairs that do not exist.
    big = jnp.pad(xp, ((0, 0), (ky - 1, ky - 1), (kx - 1, kx - 1), (0, 0)))
    xs = xpw[:, y0:y1, x0:x1]
    shifted = jnp.stack([big[:, ky - 1 + dy + y0:ky - 1 + dy + y1, kx - 1 + dx + x0:kx - 1 + dx + x1]
                         for dy, dx in deltas], axis=3)  # [N, |Y|, |X|, E, C]: one GEMM operand
    # Border rows/columns: outside the window of at least one offset
    # (indices relative to Y and X); out_y[a]: those outside offset a's.
    ey = [y - y0 for y in range(y0, y1) if not ky - 1 <= y < ho]
    ex = [x - x0 for x in range(x0, x1) if not kx - 1 <= x < wo]
    out_y = [[i for i, y in enumerate(ey) if not a <= y0 + y < a + ho] for a in range(ky)]
    out_x = [[j for j, x in enumerate(ex) if not a <= x0 + x < a + wo] for a in range(kx)]
    full = einsum("nyxc,nyxed->ecd", xs, shifted, precision)
    if ey:
        iy = np.asarray(ey)
        rows = einsum("nyxc,nyxed->eycd", xs[:, iy], shifted[:, iy], precision)
    if ex:
        ix = np.asarray(ex)
        cols = einsum("nyxc,nyxed->excd", xs[:, :, ix], shifted[:, :, ix], precision)
    if ey and ex:
        pts = einsum("nyxc,nyxed->eyxcd", xs[:, iy][:, :, ix], shifted[:, iy][:, :, ix], precision)

    def window_sum(e, ay, ax):
        # Written out per block (not as selection matmuls), so that XLA
        # fuses each block into one elementwise pass.
        b = full[e]
        for i in out_y[ay]:
            b = b - rows[e, i]
        for j in out_x[ax]:
            b = b - cols[e, j]
        for i, j in itertools.product(out_y[ay], out_x[ax]):
            b = b + pts[e, i, j]
        return b

    # Block (t, t') is the window sum of offset t at shift t' − t; a pair
    # with a negative shift is the transpose of its mirror.
    index = {d: e for e, d in enumerate(deltas)}
    taps = ky * kx
    cache, blocks = {}, []
    for t, t2 in itertools.product(range(taps), repeat=2):
        (ay, ax), (by, bx) = divmod(t, kx), divmod(t2, kx)
        d = (by - ay, bx - ax)
        neg = d < (0, 0)
        key = (index[(-d[0], -d[1])], by, bx) if neg else (index[d], ay, ax)
        if key not in cache:
            cache[key] = window_sum(*key)
        blocks.append(cache[key].T if neg else cache[key])
    blocks = jnp.stack(blocks).reshape(taps, taps, c, c)
    g = blocks.transpose(2, 0, 3, 1).reshape(c * taps, c * taps)  # channel-major rows and columns
    if layer.bias:
        sums = jnp.stack([w.sum((0, 1, 2)) for w in _windows(layer, xpw, (ho, wo))], 1).reshape(-1)
        g = jnp.concatenate([g, sums[None]], axis=0)
        g = jnp.concatenate([g, jnp.append(sums, 0.0)[:, None]], axis=1)
    return g


def batch_sums(
    layer: Layer, x, y, mask, init: Mapping[str, Any] | None = None, *,
    gram: str = "auto", precision: Any = "highest", target_gram: bool = False,
) -> dict[str, Any]:
    """One batch's contribution to :func:`layer_statistics` for one layer.

    Args:
      layer: the layer.
      x: its merged input ``[N, *spatial, C_in]`` (fp32).
      y: its merged target ``[N, *out_spatial, C_out]``.
      mask: ``[N]`` example weights (0 for padding).
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
        or (gram == "auto"
            and _shift_saving(layer, x.shape[1:-1], _AUTO_EXAMPLES) >= _SHIFT_MIN_SAVING))
    if layer.kind == "conv":
        padded = [s + lo + hi for s, (lo, hi) in zip(x.shape[1:-1], layer.padding, strict=True)]
        expect = tuple((p - d * (k - 1) - 1) // st + 1 for p, k, st, d in
                       zip(padded, layer.kernel_size, layer.strides, layer.dilation, strict=True))
        if expect != tuple(y.shape[1:-1]):
            raise ValueError(
                f"layer {layer.name}: input {x.shape} with kernel {layer.kernel_size}, strides "
                f"{layer.strides}, padding {layer.padding} gives {expect} positions, the output has "
                f"{tuple(y.shape[1:-1])}"
            )
    mask = mask.astype(jnp.float32)
    n_out = math.prod(y.shape[1:-1])
    y2 = y.reshape(-1, layer.c_out)
    w = jnp.repeat(mask, n_out)
    out = {"target_sq": jnp.sum(w[:, None] * y2 * y2, axis=0), "count": jnp.sum(w)}
    if target_gram:
        out["target_gram"] = matmul((y2 * w[:, None]).T, y2, precision)
    if use_shifts:
        xp = _pad_input(layer, x)
        per_example = mask.reshape((-1,) + (1,) * (xp.ndim - 1))
        g = _shift_gram(layer, xp, xp * per_example, precision)
        out["gram"] = g.at[-1, -1].set(out["count"]) if layer.bias else g
        out["cross"] = _conv_cross(layer, xp, y * per_example, precision)
        if init is not None:
            err = layer_apply(layer, x, init) - y
            out["init_grad"] = _conv_cross(layer, xp, err * per_example, precision)
            out["init_sq"] = jnp.sum(w[:, None] * jnp.square(err.reshape(-1, layer.c_out)), axis=0)
        return out
    rows = layer_rows(layer, x)
    rw = rows * w[:, None]
    out["gram"] = matmul(rw.T, rows, precision)
    out["cross"] = matmul(rw.T, y2, precision)
    if init is not None:
        # From the rows already built, not a conv: XLA:CPU convs over maps of
        # a few positions run ~100x below its GEMM speed.
        w0 = weights_to_matrix(layer, init["kernel"], init.get("bias"))
        err = matmul(rows, w0, precision) - y2
        out["init_grad"] = matmul(rw.T, err, precision)
        out["init_sq"] = jnp.sum(w[:, None] * err * err, axis=0)
    return out


def _statistics_fn(module_a, module_b, layers, blocks, precision, gram, target_gram=False):
    def fn(replicated, x, mask):
        va, vb, init = replicated
        fa, fb = _features(module_a, va, x), _features(module_b, vb, x)
        out = {}
        for name, layer in layers.items():
            xin, y = _layer_data(layer, blocks, fa, fb)
            w0 = None if init is None else matrix_to_weights(layer, init[name])
            out[name] = batch_sums(layer, xin, y, mask, w0, gram=gram, precision=precision,
                                   target_gram=target_gram)
        return out

    return fn


def layer_statistics(
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec: Mapping[str, Any],
    blocks: Mapping[str, GroupBlocks],
    batches: Iterable[Any],
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
            init_m = {n: weights_to_matrix(lay, init[n]["kernel"], init[n].get("bias"))
                      * jnp.asarray(matrix_mask(lay), jnp.float32) for n, lay in part.items()}
        key = ("statistics", module_a, module_b, tuple(part.values()), _blocks_key(blocks, part),
               precision, gram, mesh, init_m is None, target_gram)
        step = _cached(key, lambda part=part: distributed.batch_sum(
            _statistics_fn(module_a, module_b, part, blocks, precision, gram, target_gram), mesh))
        replicated = (variables_a, variables_b, init_m)
        desc = "least-squares statistics" + (f" ({i + 1}/{len(chunks)})" if len(chunks) > 1 else "")
        acc = None
        for batch in tqdm(next_pass(), desc=desc, disable=not progress, leave=False):
            x, mask = distributed.shard_batch(_images(batch), mesh)
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
