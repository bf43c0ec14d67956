"""Least squares by gradient descent: the mode that needs no Gram.

:func:`gradient_descent` minimises the same masked per-layer mean squared
error as the closed-form solve, with optax, from features recomputed per
batch, as the paper's code does; :func:`feature_residuals` measures that
error directly on data. :func:`pleas_jax.least_squares.least_squares` uses
both for mode ``"gd"`` and for layers whose statistics would exceed a
memory bound.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from pleas_jax import distributed
from pleas_jax.ls_data import (
    _add,
    _blocks_key,
    _cached,
    _features,
    _images,
    _layer_data,
    _peek,
    _select,
)
from pleas_jax.ls_layers import channel_mask, find_layers, layer_apply
from pleas_jax.partial import GroupBlocks

# Images the gradient mode keeps on the devices across its steps: 3,200
# 224 px RGB images in fp32 are 1.9 GB; past this they are sent per step.
RESIDENT_BYTES = 4 << 30


def _row_weights(mask, n_rows):
    # Rows are example-major, so each example's mask repeats over its positions.
    return jnp.repeat(mask.astype(jnp.float32), n_rows // mask.shape[0])


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
    module_a,
    variables_a,
    module_b,
    variables_b,
    spec,
    blocks,
    weights: Mapping[str, Mapping[str, Any]],
    batches: Iterable[Any],
    *,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean squared error of each layer in ``weights`` measured directly on data.

    One sharded pass: ``Σ ‖layer(X̃) − Ỹ‖² / (rows · C_out)`` per layer, with
    the layer applied as a conv (no Gram). Arguments as for
    :func:`pleas_jax.ls_statistics.layer_statistics`; ``weights``: layer
    name -> ``{"kernel", "bias"}``.
    """
    first, batches = _peek(batches, "least squares")
    layers = _select(find_layers(module_a, variables_a, spec, blocks, _images(first)[:1]), weights)
    mesh = mesh or distributed.data_mesh()
    key = (
        "residuals",
        module_a,
        module_b,
        tuple(layers.values()),
        _blocks_key(blocks, layers),
        mesh,
    )
    step = _cached(
        key, lambda: distributed.batch_sum(_sse_fn(module_a, module_b, layers, blocks, False), mesh)
    )
    params = {n: dict(weights[n]) for n in layers}
    params = {n: {k: v for k, v in p.items() if k in ("kernel", "bias")} for n, p in params.items()}
    acc = None
    for batch in tqdm(batches, desc="least-squares residuals", disable=not progress, leave=False):
        x, mask = distributed.shard_batch(_images(batch), mesh)
        s = step((variables_a, variables_b, params), x, mask)
        acc = s if acc is None else _add(acc, s)
    assert acc is not None  # _peek found a first batch
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
    resident_bytes: int | None = RESIDENT_BYTES,
    progress: bool = False,
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Fit the merged layers by gradient descent on the masked per-layer MSE.

    Every layer minimises ``Σ ‖X̃W − Ỹ‖² / (rows · C_out)`` on one batch per
    step (cycling through ``batches``), from the source models' features, all
    layers at once (they are independent). Forbidden weights (A-only outputs
    reading B-only inputs and vice versa) stay exactly zero: the gradient and
    the parameters are both masked. Each step is one compiled function,
    sharded over the batch like :func:`pleas_jax.ls_statistics.layer_statistics`.

    Args:
      init: layer name -> ``{"kernel", "bias"}``, the starting weights (the
        partial merge, :func:`pleas_jax.ls_layers.weights_of`); also selects the layers unless
        ``layers`` is given.
      batches: a sequence of images ``[N, H, W, C]`` (or ``(images, labels)``).
      steps, learning_rate: the paper's code: Adam, 5e-4, cosine decay, 400 steps.
      optimizer: replaces Adam with the cosine schedule.
      resident_bytes: batches whose images take at most this many bytes in all
        are put on the devices once and reused every cycle; more are sent
        again at each step (slower, but the data need not fit the devices).
        ``None``: always resident.
      Others as for :func:`pleas_jax.ls_statistics.layer_statistics`.

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
            raise ValueError(
                f"layer {n}: initial kernel {params[n]['kernel'].shape}, expected {lay.kernel_shape}"
            )
        if lay.bias:
            params[n]["bias"] = jnp.asarray(init[n]["bias"], jnp.float32)
        m = jnp.asarray(channel_mask(lay), jnp.float32)
        masks[n] = {"kernel": jnp.broadcast_to(m, lay.kernel_shape)}
        if lay.bias:
            masks[n]["bias"] = jnp.ones((lay.c_out,), jnp.float32)
    params = jax.tree.map(jnp.multiply, params, masks)
    opt = optimizer or optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    mesh = mesh or distributed.data_mesh()
    key = (
        "gradient",
        module_a,
        module_b,
        tuple(chosen.values()),
        _blocks_key(blocks, chosen),
        mesh,
        (steps, learning_rate) if optimizer is None else optimizer,
    )
    update = _cached(key, lambda: _gradient_step(module_a, module_b, chosen, blocks, mesh, opt))
    opt_state = opt.init(params)
    images = [_images(b) for b in batches]
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in images)
    resident = resident_bytes is None or total <= resident_bytes
    shards = [distributed.shard_batch(x, mesh) for x in images] if resident else None
    losses = []
    for i in tqdm(range(steps), desc="least squares (gradient)", disable=not progress, leave=False):
        j = i % len(images)
        x, mask = shards[j] if shards is not None else distributed.shard_batch(images[j], mesh)
        params, opt_state, loss = update(
            params, opt_state, masks, variables_a, variables_b, x, mask
        )
        losses.append(loss)
    return params, np.asarray(jnp.stack(losses))
