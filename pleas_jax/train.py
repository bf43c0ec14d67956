"""Plain supervised training and evaluation of the source models.

SGD with Nesterov momentum, a cosine learning-rate schedule and weight decay,
softmax cross-entropy, BatchNorm in training mode. One jitted step per batch;
the result depends only on the seed (initialisation, shuffling, augmentation).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from pleas_jax import data as data_lib


def train(
    module,
    dataset: data_lib.Dataset,
    *,
    epochs: int = 8,
    batch_size: int = 128,
    learning_rate: float = 0.05,
    weight_decay: float = 5e-4,
    augment: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``module`` from a seeded initialisation on ``dataset``'s training split.

    Returns:
      variables ``{"params", "batch_stats"}``.

    Raises:
      ValueError: ``epochs`` or ``batch_size`` below 1, a negative ``seed``
        (numpy's shuffles take none), a ``learning_rate`` not above 0, a
        negative ``weight_decay``, or an empty training split.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay}")
    x, y = dataset.x_train, dataset.y_train
    if len(x) == 0:
        raise ValueError(f"{dataset.name!r}: the training split is empty")
    if len(x) < batch_size:
        batch_size = len(x)
    variables = module.init(jax.random.key(seed), jnp.zeros((1, *x.shape[1:]), jnp.float32))
    params, stats = variables["params"], variables.get("batch_stats", {})
    steps = epochs * (len(x) // batch_size)
    schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1))
    opt = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=0.9, nesterov=True),
    )
    opt_state = opt.init(params)

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        def loss_fn(p):
            logits, new = module.apply(
                {"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, new["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    bar = tqdm(total=steps, desc="train", disable=not progress, leave=False)
    for epoch in range(epochs):
        for xb, yb in data_lib.batches(
            x,
            y,
            batch_size,
            shuffle=True,
            seed=seed * 1000 + epoch,
            augment=augment,
            drop_last=True,
        ):
            params, stats, opt_state, loss = step(params, stats, opt_state, xb, yb)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
    bar.close()
    return {"params": params, "batch_stats": stats}


def predict(module, variables, x: data_lib.Images, batch_size: int = 256) -> np.ndarray:
    """Inference outputs ``[N, ...]`` for images ``x [N, H, W, C]``, batch by batch."""
    fn = jax.jit(lambda v, xb: module.apply(v, xb))
    outs = [np.asarray(fn(variables, xb)) for xb in data_lib.batches(x, None, batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,))


def accuracy(logits: np.ndarray | jax.Array, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits [N, K]`` against ``labels [N]``."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))
