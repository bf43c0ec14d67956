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

Layer geometry and the kernel <-> matrix layout are in
:mod:`pleas_jax.ls_layers` (re-exported here). Layer geometry (kernel size,
strides, padding, dilation, bias) is read from
the Flax modules while tracing the forward pass (every ``nn.Conv`` and
``nn.Dense`` call is intercepted), not guessed from shapes, and the patch
geometry is checked against the output shape the layer records.

Example::

    blocks = partial.full_blocks(spec, identity(spec), 0.5)
    merged_module, merged = partial.partial_merge(module, spec, blocks, va, vb)
    merged, report = least_squares(module, va, module, vb, spec, blocks,
                                   merged_module, merged, batches)
    report["layers"]["layer1_0/conv1"]   # {"before": ..., "after": ..., ...}
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from pleas_jax import distributed
# Layer geometry and matrices live in ls_layers; imported here so that callers
# keep one place to import least squares from.
from pleas_jax.ls_layers import (
    Layer,
    apply_solution,
    channel_mask,
    find_layers,
    layer_rows,
    matrix_mask,
    matrix_to_weights,
    statistics_bytes,
    weights_of,
    weights_to_matrix,
)
from pleas_jax.models.layers import FEATURES
from pleas_jax.partial import GroupBlocks, combine
from pleas_jax.tree import flatten

_HI = jax.lax.Precision.HIGHEST
MODES = ("closed_form", "gd")
RIDGE_CENTRES = ("init", "zero")


# ------------------------------------------------------------------- features
def _features(module, variables, x) -> dict[tuple[str, ...], Any]:
    _, state = module.apply(variables, x, mutable=[FEATURES])
    return flatten(state[FEATURES])


def _layer_data(layer: Layer, blocks, fa, fb):
    """Merged input ``[N, ..., C_in]`` and target ``[N, ..., C_out]`` (fp32)."""
    pieces = []
    for end, group in (("in", layer.in_group), ("out", layer.out_group)):
        a, b = fa.get((*layer.path, end)), fb.get((*layer.path, end))
        if a is None or b is None:
            raise ValueError(
                f"layer {layer.name}: the models record no {end!r} features; build them from "
                "pleas_jax.models layers"
            )
        bl = None if group is None else blocks[group]
        pieces.append(combine(a.astype(jnp.float32), b.astype(jnp.float32), bl))
    return pieces


def _row_weights(mask, n_rows):
    # Rows are example-major, so each example's mask repeats over its positions.
    return jnp.repeat(mask.astype(jnp.float32), n_rows // mask.shape[0])


def _peek(batches: Iterable[Any], what: str):
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{what} needs at least one batch of data")
    return first, itertools.chain([first], it)


def _data_passes(batches, what: str):
    """The first batch, and a function that returns the data for one more pass.

    ``batches``: a re-iterable collection (a list: every pass iterates it
    again), a callable returning a fresh iterator (called once per pass after
    the first), or a one-shot iterator (one pass only). The first pass reuses
    the iterator the first batch was read from, so nothing is read twice.

    Returns ``(first, next_pass, one_shot)``; ``next_pass()`` raises
    ``ValueError`` when a one-shot iterator is asked for a second pass.
    """
    if callable(batches):
        it = iter(batches())
    else:
        it = iter(batches)
    one_shot = not callable(batches) and it is batches
    first = next(it, None)
    if first is None:
        raise ValueError(f"{what} needs at least one batch of data")
    pending = [itertools.chain([first], it)]

    def next_pass():
        if pending:
            return pending.pop()
        if callable(batches):
            return batches()
        if one_shot:
            raise ValueError(f"{what}: a one-shot iterator of batches cannot feed a second pass")
        return batches

    return first, next_pass, one_shot


def _images(batch) -> np.ndarray:
    x = batch[0] if isinstance(batch, tuple | list) else batch
    return np.asarray(x)


def _select(layers: Mapping[str, Layer], names: Iterable[str] | None) -> dict[str, Layer]:
    if names is None:
        return dict(layers)
    names = list(names)
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"no conv/dense layers {unknown}; the model has {list(layers)}")
    return {n: layers[n] for n in names}


# Compiled per-batch functions, reused across calls on the same models, layers
# and blocks (a new closure would otherwise recompile every call).
_COMPILED: dict[tuple, Any] = {}
_COMPILED_MAX = 16


def _blocks_key(blocks: Mapping[str, GroupBlocks], layers: Mapping[str, Layer]) -> tuple:
    groups = sorted({g for lay in layers.values() for g in (lay.in_group, lay.out_group) if g})
    return tuple(
        (g, *(np.asarray(a, np.int64).tobytes() for a in
              (blocks[g].merged_a, blocks[g].merged_b, blocks[g].only_a, blocks[g].only_b)))
        for g in groups
    )


def _cached(key: tuple, build):
    fn = _COMPILED.get(key)
    if fn is None:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        fn = _COMPILED[key] = build()
    return fn


# ----------------------------------------------------------------- statistics
GRAM_METHODS = ("patches", "shifts")


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
    per_tap = [jnp.einsum(f"n{sp}c,n{sp}o->co", w, yw, precision=precision)
               for w in _windows(layer, xp, out_spatial)]
    c = jnp.stack(per_tap, axis=1).reshape(layer.c_in * layer.taps, -1)  # channel-major
    if layer.bias:
        c = jnp.concatenate([c, jnp.sum(yw.reshape(-1, yw.shape[-1]), axis=0)[None]], axis=0)
    return c


def _shifts_apply(layer: Layer) -> bool:
    """The shift-structured Gram covers 2-D convs with stride and dilation 1."""
    return (layer.kind == "conv" and len(layer.kernel_size) == 2 and layer.taps > 1
            and all(s == 1 for s in layer.strides) and all(d == 1 for d in layer.dilation))


def _shift_gram(layer: Layer, xp, xpw, precision):
    """Patch Gram of a stride-1 conv from shifted products of its input map.

    Block ``(t, t')`` of the Gram sums ``xpw[u] ⊗ xp[u + δ]`` (``δ = t' − t``)
    over the window of positions ``u`` that kernel offset ``t`` sees. One
    product map per shift (``(2k−1)²`` shifts, half of them by symmetry)
    replaces the ``taps²`` blocks of ``patchesᵀ patches``; window sums of
    the maps (two 1-D box sums) then give every block. ``xp``: the padded
    input ``[N, Hp, Wp, C]``; ``xpw``: the same weighted per example.
    """
    ky, kx = layer.kernel_size
    _, hp, wp, c = xp.shape
    ho, wo = hp - ky + 1, wp - kx + 1
    deltas = [(dy, dx) for dy in range(-(ky - 1), ky) for dx in range(-(kx - 1), kx) if (dy, dx) >= (0, 0)]
    # Zero margins let every shift read one [Hp, Wp] range; the margins only
    # meet offset pairs that do not exist.
    big = jnp.pad(xp, ((0, 0), (ky - 1, ky - 1), (kx - 1, kx - 1), (0, 0)))
    shifted = jnp.stack(
        [big[:, ky - 1 + dy:ky - 1 + dy + hp, kx - 1 + dx:kx - 1 + dx + wp] for dy, dx in deltas]
    )
    prod = jnp.einsum("nyxc,enyxd->eyxcd", xpw, shifted, precision=precision)
    ones = (1,) * 5
    win = jax.lax.reduce_window(prod, 0.0, jax.lax.add, (1, ho, 1, 1, 1), ones, "VALID")
    win = jax.lax.reduce_window(win, 0.0, jax.lax.add, (1, 1, wo, 1, 1), ones, "VALID")
    # win[e, ty, tx] is block (t, t + δ_e); a pair with δ < 0 is the
    # transpose of its mirror.
    index = {d: e for e, d in enumerate(deltas)}
    taps = ky * kx
    e_idx, ty_idx, tx_idx = (np.zeros((taps, taps), np.int32) for _ in range(3))
    neg = np.zeros((taps, taps), bool)
    for t, t2 in itertools.product(range(taps), repeat=2):
        (ay, ax), (by, bx) = divmod(t, kx), divmod(t2, kx)
        d = (by - ay, bx - ax)
        neg[t, t2] = d < (0, 0)
        src, d = ((by, bx), (-d[0], -d[1])) if neg[t, t2] else ((ay, ax), d)
        e_idx[t, t2], ty_idx[t, t2], tx_idx[t, t2] = index[d], *src
    blocks = win[e_idx, ty_idx, tx_idx]  # [taps, taps, C, C]
    blocks = jnp.where(neg[:, :, None, None], jnp.swapaxes(blocks, -1, -2), blocks)
    g = blocks.transpose(2, 0, 3, 1).reshape(c * taps, c * taps)  # channel-major rows and columns
    if layer.bias:
        sums = jnp.stack([w.sum((0, 1, 2)) for w in _windows(layer, xpw, (ho, wo))], 1).reshape(-1)
        g = jnp.concatenate([g, sums[None]], axis=0)
        g = jnp.concatenate([g, jnp.append(sums, 0.0)[:, None]], axis=1)
    return g


def batch_sums(
    layer: Layer, x, y, mask, init: Mapping[str, Any] | None = None, *,
    gram: str = "patches", precision: Any = _HI, target_gram: bool = False,
) -> dict[str, Any]:
    """One batch's contribution to :func:`layer_statistics` for one layer.

    Args:
      layer: the layer.
      x: its merged input ``[N, *spatial, C_in]`` (fp32).
      y: its merged target ``[N, *out_spatial, C_out]``.
      mask: ``[N]`` example weights (0 for padding).
      init: optional ``{"kernel", "bias"}``, W0 (masked).
      gram: ``"patches"`` (``XᵀX`` of the patch rows) or ``"shifts"`` (from
        shifted products of the input map, :func:`_shift_gram`; stride-1 2-D
        convs, other layers use patches). Shifts need ~13/81 of the
        multiply-adds of a 3x3 conv's patch Gram, but as position-batched
        products they ran 1.4-7x slower than the patch GEMM on CPU (slowest
        on small maps, where padding dominates); patches are the default
        until an accelerator shows otherwise.
      precision: matmul precision.
      target_gram: also return ``"target_gram" [C_out, C_out]`` (Σ ỸᵀỸ).

    Returns:
      ``{"gram", "cross", "target_sq", "count"}`` (+ ``"init_grad"``,
      ``"init_sq"`` with ``init``), shapes as in :func:`layer_statistics`.
    """
    if gram not in GRAM_METHODS:
        raise ValueError(f"gram must be one of {GRAM_METHODS}, got {gram!r}")
    use_shifts = gram == "shifts" and _shifts_apply(layer)
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
        out["target_gram"] = jnp.matmul((y2 * w[:, None]).T, y2, precision=precision)
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
    out["gram"] = jnp.matmul(rw.T, rows, precision=precision)
    out["cross"] = jnp.matmul(rw.T, y2, precision=precision)
    if init is not None:
        # From the rows already built, not a conv: XLA:CPU convs over maps of
        # a few positions run ~100x below its GEMM speed.
        w0 = weights_to_matrix(layer, init["kernel"], init.get("bias"))
        err = jnp.matmul(rows, w0, precision=precision) - y2
        out["init_grad"] = jnp.matmul(rw.T, err, precision=precision)
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


@functools.partial(jax.jit, donate_argnums=0)
def _add(acc, new):
    return jax.tree.map(jnp.add, acc, new)


# ------------------------------------------------------------- memory bound
# The bound is on one chunk's running sums. While a batch is added, its own
# sums for the chunk are live too, so a pass peaks at about twice the chunk,
# plus the two models' activations and recorded features for one batch.
# Per-merge statistics at 224 px take 2.95 GiB for a budget-2.0 ResNet-50 and
# 5.43 GiB for a ResNet-101 (pair statistics: 2.65 and 4.85 GiB; see
# :func:`statistics_memory`). A 6 GiB bound keeps both in one pass (as fast as
# without a bound) at a peak of ~11 GiB, leaving ~5 GiB of a 16 GB device for
# the models and activations; a 12 GiB bound would let a larger model's pass
# peak at ~24 GiB. Larger models, widths or images take several passes.
DEFAULT_MAX_MEMORY_BYTES = 6 << 30


class StatisticsOverBound(ValueError):
    """One layer's statistics alone exceed the memory bound.

    Attributes: ``layer`` (its name), ``nbytes`` (its statistics' bytes),
    ``bound`` (the bound).
    """

    def __init__(self, layer: str, nbytes: int, bound: int):
        super().__init__(
            f"layer {layer}: its least-squares statistics take {nbytes} bytes, over "
            f"max_memory_bytes={bound}; fit it by gradient descent or raise the bound"
        )
        self.layer, self.nbytes, self.bound = layer, nbytes, bound


def _chunk_sizes(sizes: Sequence[int], bound: int | None) -> list[list[int]]:
    """Greedy consecutive partition of ``sizes`` into runs summing to at most
    ``bound`` (the fewest runs for consecutive ones); an item over the bound
    is a run of its own. Returns item indices per run."""
    runs: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if runs and (bound is None or total + n <= bound):
            runs[-1].append(i)
            total += n
        else:
            runs.append([i])
            total = n
    return runs


def memory_chunks(
    layers: Mapping[str, Layer], max_memory_bytes: int | None, *, init: bool = True,
    target_gram: bool = False,
) -> list[list[str]]:
    """Split layers, in their order, into consecutive chunks whose statistics
    fit ``max_memory_bytes`` (:func:`statistics_bytes`; ``None``: one chunk).

    Returns layer names per chunk (no chunk for no layers).

    Raises:
      StatisticsOverBound: a layer alone exceeds the bound.
    """
    names = list(layers)
    sizes = [statistics_bytes(layers[n], init=init, target_gram=target_gram) for n in names]
    if max_memory_bytes is not None:
        if max_memory_bytes <= 0:
            raise ValueError(f"max_memory_bytes must be positive or None, got {max_memory_bytes}")
        for n, b in zip(names, sizes, strict=True):
            if b > max_memory_bytes:
                raise StatisticsOverBound(n, b, int(max_memory_bytes))
    return [[names[i] for i in run] for run in _chunk_sizes(sizes, max_memory_bytes)]


def memory_report(
    layers: Mapping[str, Layer], chunks: Sequence[Sequence[str]], max_memory_bytes: int | None, *,
    init: bool = True, target_gram: bool = False,
) -> dict[str, Any]:
    """What a chunked statistics pass holds: ``{"chunks", "passes",
    "peak_statistics_bytes" (the largest chunk), "total_statistics_bytes",
    "chunk_bytes": [per chunk], "bound"}``."""
    per = [sum(statistics_bytes(layers[n], init=init, target_gram=target_gram) for n in c)
           for c in chunks]
    return {"chunks": len(chunks), "passes": len(chunks),
            "peak_statistics_bytes": max(per, default=0), "total_statistics_bytes": sum(per),
            "chunk_bytes": per, "bound": max_memory_bytes}


def _one_shot_error(what: str, n_chunks: int, total: int, bound: int | None) -> ValueError:
    return ValueError(
        f"{what}: the statistics ({total} bytes) exceed max_memory_bytes={bound} and take "
        f"{n_chunks} passes over the data, which a one-shot iterator cannot give; pass the "
        "batches as a list or as a callable returning a fresh iterator, or raise max_memory_bytes"
    )


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
    precision: Any = _HI,
    gram: str = "patches",
    target_gram: bool = False,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Sums for the closed-form solve of every merged layer, one pass over data
    per chunk of layers.

    Per batch, both source models run with their features recorded; for every
    layer, X̃ and Ỹ are built (module docstring) and the sums below accumulate
    in fp32, each device summing its shard of the batch, then ``psum``.

    Memory: the layers are split, in forward order, into consecutive chunks
    whose sums fit ``max_memory_bytes`` (:func:`memory_chunks`), and each chunk
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
        (:func:`weights_of`), the W0 the solve and residuals are taken
        relative to.
      mesh: a 1-D data mesh (all local devices by default).
      layers: only these layer names (default: every conv/dense layer).
      precision: matmul precision of the sums (fp32 ``HIGHEST`` by default).
      gram: how conv Grams are formed, ``"patches"`` or ``"shifts"``
        (:func:`batch_sums`).
      target_gram: also accumulate ``"target_gram" [C_out, C_out]`` (Σ ỸᵀỸ).
      max_memory_bytes: bound on one chunk's sums (fp32 bytes,
        :func:`statistics_bytes`); ``None``: every layer in one pass.
      progress: show a progress bar.

    Returns:
      layer name -> ``{"layer": Layer, "gram": [dim, dim], "cross": [dim, C_out],
      "target_sq": [C_out] (Σ Ỹ²), "count": [] (rows)}``, plus with ``init``:
      ``"init": [dim, C_out]`` (W0), ``"init_grad": [dim, C_out]``
      (Σ X̃ᵀ(X̃W0 − Ỹ)) and ``"init_sq": [C_out]`` (Σ (X̃W0 − Ỹ)²).

    Raises:
      ValueError: no data, a layer least squares cannot handle, a one-shot
        iterator where several passes are needed;
        :class:`StatisticsOverBound` (a ``ValueError``) for a layer whose sums
        alone exceed ``max_memory_bytes`` (raised before any pass).
    """
    if gram not in GRAM_METHODS:
        raise ValueError(f"gram must be one of {GRAM_METHODS}, got {gram!r}")
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


# ---------------------------------------------------------------------- solve
def _allowed_sets(layer: Layer):
    """``(first output, end output, allowed rows)`` per output block."""
    mask = matrix_mask(layer)
    mo, ao, bo = layer.out_splits
    return [(lo, lo + n, np.flatnonzero(mask[:, lo])) for lo, n in ((0, mo), (mo, ao), (mo + ao, bo)) if n]


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
    """All output blocks of one layer; ``sets`` as from :func:`_allowed_sets`
    (hashable). With ``init`` (W0) the unknown is ``D = W − W0``:
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
    return w


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
    with jax.default_matmul_precision("highest"):
        for name, s in stats.items():
            layer = s["layer"]
            relative = "init" in s
            centre = ridge_centre or ("init" if relative else "zero")
            if centre == "init" and not relative:
                raise ValueError(f"layer {name}: ridge_centre='init' needs statistics taken with init")
            sets = tuple((lo, hi, tuple(int(i) for i in idx)) for lo, hi, idx in _allowed_sets(layer))
            args = (None, s["init"], s["init_grad"]) if relative else (s["cross"], None, None)
            w = _solve_matrix(s["gram"], *args, sets, float(ridge), centre, "cholesky")
            # NaN from Cholesky means the matrix is not positive definite (no
            # ridge on a rank-deficient Gram, or round-off); the pseudo-inverse
            # then gives the least-squares solution of smallest norm.
            fb = not bool(jnp.all(jnp.isfinite(w)))
            if fb:
                w = _solve_matrix(s["gram"], *args, sets, float(ridge), centre, "eigh")
            if not bool(jnp.all(jnp.isfinite(w))):
                raise ValueError(f"layer {name}: the least-squares solution is not finite (features overflow?)")
            out[name] = {**matrix_to_weights(layer, w), "fallback": bool(fb)}
    return out


@jax.jit
def _sse_plain(gram, cross, target_sq, w):
    gw = jnp.matmul(gram, w, precision=_HI)
    return jnp.sum(w * gw) - 2.0 * jnp.sum(w * cross) + jnp.sum(target_sq)


@jax.jit
def _sse_relative(gram, init, init_grad, init_sq, w):
    # Taken relative to W0, so round-off scales with the change, not with Σ Ỹ².
    d = w - init
    return jnp.sum(init_sq) + 2.0 * jnp.sum(d * init_grad) + jnp.sum(d * jnp.matmul(gram, d, precision=_HI))


def residuals(stats: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean squared error of each layer of ``stats`` with the given weights.

    ``Σ ‖X̃W − Ỹ‖² / (rows · C_out)`` from the accumulated sums, for every layer
    present in both ``stats`` and ``weights`` (``{"kernel", "bias"}``).
    """
    out = {}
    for name, s in stats.items():
        if name not in weights:
            continue
        layer = s["layer"]
        w = weights_to_matrix(layer, weights[name]["kernel"], weights[name].get("bias"))
        if "init" in s:
            sse = _sse_relative(s["gram"], s["init"], s["init_grad"], s["init_sq"], w)
        else:
            sse = _sse_plain(s["gram"], s["cross"], s["target_sq"], w)
        out[name] = float(sse) / (float(s["count"]) * layer.c_out)
    return out


# ----------------------------------------------------------- gradient descent
_CONV_DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def layer_apply(layer: Layer, x, weights: Mapping[str, Any]):
    """The merged layer on its merged input ``x [N, ..., C_in] -> [N, ..., C_out]`` (fp32)."""
    k = weights["kernel"]
    if layer.kind == "conv":
        y = jax.lax.conv_general_dilated(
            x, k, layer.strides, layer.padding, rhs_dilation=layer.dilation,
            dimension_numbers=_CONV_DIMS[len(layer.kernel_size)], precision=_HI,
        )
    else:
        y = jnp.matmul(x, k, precision=_HI)
    if layer.bias:
        y = y + weights["bias"]
    return y


def _sse_fn(module_a, module_b, layers, blocks, with_grad):
    """Per-shard ``Σ‖X̃W − Ỹ‖² / C_out`` and rows per layer (and its gradient)."""

    def fn(replicated, x, mask):
        va, vb, params = replicated
        fa, fb = _features(module_a, va, x), _features(module_b, vb, x)
        data = {n: _layer_data(lay, blocks, fa, fb) for n, lay in layers.items()}

        def loss(params):
            sse, count = {}, {}
            for n, lay in layers.items():
                xin, y = data[n]
                pred = layer_apply(lay, xin, params[n])
                err = (pred - y).reshape(-1, lay.c_out)
                w = _row_weights(mask, err.shape[0])
                sse[n] = jnp.sum(w[:, None] * err * err) / lay.c_out
                count[n] = jnp.sum(w)
            return sum(sse.values()), (sse, count)

        if not with_grad:
            return dict(zip(("sse", "count"), loss(params)[1], strict=True))
        grads, (sse, count) = jax.grad(loss, has_aux=True)(params)
        return {"grad": grads, "sse": sse, "count": count}

    return fn


def feature_residuals(
    module_a, variables_a, module_b, variables_b, spec, blocks, weights: Mapping[str, Mapping[str, Any]],
    batches: Iterable[Any], *, mesh: jax.sharding.Mesh | None = None, progress: bool = False,
) -> dict[str, float]:
    """Mean squared error of each layer in ``weights`` measured directly on data.

    One sharded pass: ``Σ ‖layer(X̃) − Ỹ‖² / (rows · C_out)`` per layer, with
    the layer applied as a conv (no Gram). Arguments as for
    :func:`layer_statistics`; ``weights``: layer name -> ``{"kernel", "bias"}``.
    """
    first, batches = _peek(batches, "least squares")
    layers = _select(find_layers(module_a, variables_a, spec, blocks, _images(first)[:1]), weights)
    mesh = mesh or distributed.data_mesh()
    key = ("residuals", module_a, module_b, tuple(layers.values()), _blocks_key(blocks, layers), mesh)
    step = _cached(key, lambda: distributed.batch_sum(_sse_fn(module_a, module_b, layers, blocks, False), mesh))
    params = {n: dict(weights[n]) for n in layers}
    params = {n: {k: v for k, v in p.items() if k in ("kernel", "bias")} for n, p in params.items()}
    acc = None
    for batch in tqdm(batches, desc="least-squares residuals", disable=not progress, leave=False):
        x, mask = distributed.shard_batch(_images(batch), mesh)
        s = step((variables_a, variables_b, params), x, mask)
        acc = s if acc is None else _add(acc, s)
    return {n: float(acc["sse"][n]) / float(acc["count"][n]) for n in layers}


def _gradient_step(module_a, module_b, layers, blocks, mesh, opt):
    """One compiled masked optimizer step on one sharded batch."""
    sums = distributed.batch_sum(_sse_fn(module_a, module_b, layers, blocks, True), mesh)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, masks, va, vb, x, mask):
        s = sums((va, vb, params), x, mask)
        grads = {n: jax.tree.map(lambda g, n=n: g / s["count"][n], s["grad"][n]) for n in params}
        grads = jax.tree.map(jnp.multiply, grads, masks)
        upd, opt_state = opt.update(grads, opt_state, params)
        params = jax.tree.map(jnp.multiply, optax.apply_updates(params, upd), masks)
        loss = sum(s["sse"][n] / s["count"][n] for n in params) / len(params)
        return params, opt_state, loss

    return update


def gradient_descent(
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec: Mapping[str, Any],
    blocks: Mapping[str, GroupBlocks],
    init: Mapping[str, Mapping[str, Any]],
    batches: Sequence[Any],
    *,
    steps: int = 400,
    learning_rate: float = 5e-4,
    optimizer: optax.GradientTransformation | None = None,
    layers: Iterable[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Fit the merged layers by gradient descent on the masked per-layer MSE.

    Every layer minimises ``Σ ‖X̃W − Ỹ‖² / (rows · C_out)`` on one batch per
    step (cycling through ``batches``), from the source models' features, all
    layers at once (they are independent). Forbidden weights (A-only outputs
    reading B-only inputs and vice versa) stay exactly zero: the gradient and
    the parameters are both masked. Each step is one compiled function,
    sharded over the batch like :func:`layer_statistics`.

    Args:
      init: layer name -> ``{"kernel", "bias"}``, the starting weights (the
        partial merge, :func:`weights_of`); also selects the layers unless
        ``layers`` is given.
      batches: a sequence of images ``[N, H, W, C]`` (or ``(images, labels)``).
      steps, learning_rate: the paper's code: Adam, 5e-4, cosine decay, 400 steps.
      optimizer: replaces Adam with the cosine schedule.
      Others as for :func:`layer_statistics`.

    Returns:
      ``(weights, losses)``: layer name -> ``{"kernel", "bias"}``, and the
      ``[steps]`` batch losses (mean over layers of each layer's MSE) before
      each update.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("least squares needs at least one batch of data")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    chosen = _select(
        find_layers(module_a, variables_a, spec, blocks, _images(batches[0])[:1]),
        init if layers is None else layers,
    )
    params = {}
    masks = {}
    for n, lay in chosen.items():
        params[n] = {"kernel": jnp.asarray(init[n]["kernel"], jnp.float32)}
        if tuple(params[n]["kernel"].shape) != lay.kernel_shape:
            raise ValueError(f"layer {n}: initial kernel {params[n]['kernel'].shape}, expected {lay.kernel_shape}")
        if lay.bias:
            params[n]["bias"] = jnp.asarray(init[n]["bias"], jnp.float32)
        m = jnp.asarray(channel_mask(lay), jnp.float32)
        masks[n] = {"kernel": jnp.broadcast_to(m, lay.kernel_shape)}
        if lay.bias:
            masks[n]["bias"] = jnp.ones((lay.c_out,), jnp.float32)
    params = jax.tree.map(jnp.multiply, params, masks)
    opt = optimizer or optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    mesh = mesh or distributed.data_mesh()
    key = ("gradient", module_a, module_b, tuple(chosen.values()), _blocks_key(blocks, chosen), mesh,
           (steps, learning_rate) if optimizer is None else optimizer)
    update = _cached(key, lambda: _gradient_step(module_a, module_b, chosen, blocks, mesh, opt))
    opt_state = opt.init(params)
    shards = [distributed.shard_batch(_images(b), mesh) for b in batches]
    losses = []
    for i in tqdm(range(steps), desc="least squares (gradient)", disable=not progress, leave=False):
        x, mask = shards[i % len(shards)]
        params, opt_state, loss = update(params, opt_state, masks, variables_a, variables_b, x, mask)
        losses.append(loss)
    return params, np.asarray(jnp.stack(losses))


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
    batches: Iterable[Any],
    *,
    mode: str = "closed_form",
    ridge: float = 1e-4,
    ridge_centre: str = "init",
    max_gram_bytes: int = 1 << 30,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
    steps: int = 400,
    learning_rate: float = 5e-4,
    mesh: jax.sharding.Mesh | None = None,
    precision: Any = _HI,
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
      mesh, precision, progress: as for :func:`layer_statistics`.

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
    first, next_pass, one_shot = _data_passes(batches, "least squares")
    example = _images(first)[:1]
    layers = find_layers(module_a, variables_a, spec, blocks, example)
    _check_geometry(layers, find_layers(merged_module, merged_variables, {}, {}, example))
    init = weights_of(merged_variables, layers)
    if mode == "gd":
        closed, descent = {}, dict(layers)
    else:
        closed = {n: lay for n, lay in layers.items() if lay.gram_bytes <= max_gram_bytes
                  and (max_memory_bytes is None or statistics_bytes(lay) <= max_memory_bytes)}
        descent = {n: lay for n, lay in layers.items() if n not in closed}
    chunks = memory_chunks(closed, max_memory_bytes)
    memory = memory_report(closed, chunks, max_memory_bytes)
    if descent and one_shot:
        # Several passes follow (gradient steps cycle through the batches):
        # keep the data, as gradient_descent would.
        data = list(next_pass())
        next_pass, one_shot = (lambda: data), False
    if one_shot and len(chunks) > 1:
        raise _one_shot_error("least squares", len(chunks), memory["total_statistics_bytes"],
                              max_memory_bytes)
    mesh = mesh or distributed.data_mesh()
    seconds: dict[str, float] = {}
    report_layers: dict[str, dict[str, Any]] = {}
    solution: dict[str, dict[str, Any]] = {}
    for chunk in chunks:
        t0 = time.perf_counter()
        stats = layer_statistics(
            module_a, variables_a, module_b, variables_b, spec, blocks, next_pass(),
            init={n: init[n] for n in chunk}, mesh=mesh, layers=chunk, precision=precision,
            max_memory_bytes=max_memory_bytes, progress=progress,
        )
        jax.block_until_ready(stats)
        seconds["statistics"] = seconds.get("statistics", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        part = solve(stats, ridge=ridge, ridge_centre=ridge_centre)
        jax.block_until_ready(part)
        seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - t0
        before, after = residuals(stats, init), residuals(stats, part)
        solution.update(part)
        for n in chunk:
            report_layers[n] = {"method": "closed_form", "before": before[n], "after": after[n],
                                "fallback": part[n]["fallback"]}
        del stats  # the next chunk's sums take its place on the device
    if descent:
        t0 = time.perf_counter()
        d_init = {n: init[n] for n in descent}
        fitted, _ = gradient_descent(
            module_a, variables_a, module_b, variables_b, spec, blocks, d_init, next_pass(),
            steps=steps, learning_rate=learning_rate, mesh=mesh, progress=progress,
        )
        jax.block_until_ready(fitted)
        seconds["gradient"] = time.perf_counter() - t0
        kw = {"mesh": mesh, "progress": progress}
        models_ab = (module_a, variables_a, module_b, variables_b, spec, blocks)
        before = feature_residuals(*models_ab, d_init, next_pass(), **kw)
        after = feature_residuals(*models_ab, fitted, next_pass(), **kw)
        solution.update(fitted)
        for n in descent:
            report_layers[n] = {"method": "gd", "before": before[n], "after": after[n], "fallback": False}
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
            m.kind, m.kernel_size, m.strides, m.padding, m.dilation, m.bias
        ):
            raise ValueError(f"layer {n} has another geometry in the merged model")
        if s.kernel_shape != m.kernel_shape:
            raise ValueError(
                f"params/{n}/kernel of the merged model has shape {m.kernel_shape}, the blocks give "
                f"{s.kernel_shape}"
            )


# ------------------------------------------------------- memory, analytically
MEMORY_BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)


def _with_splits(layer: Layer, separate: Mapping[str, int], full: bool) -> Layer:
    """``layer`` sized for ``separate[g]`` units per model kept separate in
    each group (``full``: the pair statistics' layout, every unit separate)."""
    def splits(group, n):
        if group is None:
            return (n, 0, 0)
        if full:
            return (0, n, n)
        s = separate[group]
        return (n - s, s, s)

    return dataclasses.replace(layer, in_splits=splits(layer.in_group, layer.in_splits[0]),
                               out_splits=splits(layer.out_group, layer.out_splits[0]))


def _memory_row(layers: Mapping[str, Layer], bound: int | None, **kw) -> dict[str, Any]:
    sizes = {n: statistics_bytes(lay, **kw) for n, lay in layers.items()}
    largest = max(sizes, key=sizes.get)
    return {
        "total_bytes": sum(sizes.values()),
        "gram_bytes": sum(lay.gram_bytes for lay in layers.values()),
        "largest_bytes": sizes[largest],
        "largest_layer": largest,
        "chunks": len(_chunk_sizes(list(sizes.values()), bound)),
        "over_bound": [n for n, b in sizes.items() if bound is not None and b > bound],
    }


def statistics_memory(
    module,
    variables: Mapping[str, Any],
    spec: Mapping[str, Any],
    input_shape: Sequence[int],
    *,
    budgets: Sequence[float] = MEMORY_BUDGETS,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES,
) -> dict[str, Any]:
    """Least-squares statistics memory of a merge per budget, without running the model.

    For each budget, uniform ratios (:func:`pleas_jax.budget.uniform_ratios`)
    give the merged widths, and each layer's statistics take
    :func:`statistics_bytes` (per-merge, with the ``init`` terms, as
    :func:`least_squares` accumulates them). The pair statistics
    (:func:`pleas_jax.pair_least_squares.pair_statistics`) are the same at
    every budget: the budget-2 layout without ``init`` terms, with a target
    Gram. Only shapes are read, and the forward pass is traced, not run.

    Args:
      module, variables: a source model; ``jax.ShapeDtypeStruct`` leaves do
        (``jax.eval_shape(module.init, ...)``).
      spec: its permutation spec.
      input_shape: one image ``(H, W, C)`` or a batch ``(N, H, W, C)``; the
        statistics do not depend on the batch size.
      budgets: budgets in ``[1, 2]``.
      max_memory_bytes: the bound the chunk counts are taken for.

    Returns:
      ``{"input_shape": (H, W, C), "bound": max_memory_bytes, "budgets": [{"budget",
      "ratio", "total_bytes", "gram_bytes", "largest_bytes", "largest_layer",
      "chunks", "over_bound"}, ...], "pair": {the same keys but budget and
      ratio}}``: total bytes of every layer's statistics (what one pass
      without a bound holds), the Grams' share, the largest layer, the number
      of chunks (passes) under the bound, and the layers over it (per-merge:
      fitted by gradient descent; pair: an error).
    """
    from pleas_jax import budget as budget_lib  # budget never imports this module

    shape = tuple(int(d) for d in input_shape)
    shape = shape[1:] if len(shape) == 4 else shape
    example = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    table = budget_lib.layer_table(module, variables, spec, shape)
    # Geometry once, at budget 1 (every unit merged); widths per budget below.
    none = np.arange(0)
    merged_all = {g: GroupBlocks(np.arange(grp.size), np.arange(grp.size), none, none)
                  for g, grp in spec.items()}
    base = find_layers(module, variables, spec, merged_all, example)
    rows = []
    for b in budgets:
        ratios = budget_lib.uniform_ratios(table, spec, float(b))
        separate = budget_lib.separate_units(spec, ratios)
        sized = {n: _with_splits(lay, separate, False) for n, lay in base.items()}
        rows.append({"budget": float(b), "ratio": float(next(iter(ratios.values()), 0.0)),
                     **_memory_row(sized, max_memory_bytes, init=True)})
    full = {n: _with_splits(lay, {}, True) for n, lay in base.items()}
    return {"input_shape": shape, "bound": max_memory_bytes, "budgets": rows,
            "pair": _memory_row(full, max_memory_bytes, init=False, target_gram=True)}
