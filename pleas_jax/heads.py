"""Classifier heads of a merged model.

Shared label space: the merged model keeps one classifier, refit by least
squares like every other layer (its target is the average of both models'
logits; see :mod:`pleas_jax.least_squares`). Different label spaces: the merged
backbone is read by each source model's own head, routed to the merged channel
order, or by a linear probe trained on frozen merged features.

A head is ``{"kernel": [C, K], "bias": [K]}`` over pooled features ``[N, C]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pleas_jax.partial import GroupBlocks

Head = dict[str, jax.Array]


def head_group(spec: Mapping, head: str = "fc") -> str:
    """The group of ``spec`` whose units the classifier ``params/<head>``
    reads (axis 0 of its kernel): the blocks :func:`route_heads` needs.

    Raises:
      ValueError: no group (or several) feeds that classifier.
    """
    found = [g for g in spec if any(tuple(p)[1:2] == (head,) and a == 0 for p, a in spec[g].axes)]
    if len(found) != 1:
        raise ValueError(
            f"expected one group feeding params/{head}/kernel's inputs, found {len(found)}"
        )
    return found[0]


def route_heads(blocks: GroupBlocks, head_a: Mapping, head_b: Mapping) -> tuple[Head, Head]:
    """Each source model's head, reading the merged backbone's features.

    The merged features are ``[merged | A-only | B-only]``; A's head reads the
    merged units in place of A's units of each pair and A's separate units, and
    gives B-only units zero weight (and conversely for B).

    Args:
      blocks: blocks of the group that the heads read (the backbone output:
        ``blocks[head_group(spec)]``, with the spec of the models with their
        classifiers).
      head_a, head_b: ``{"kernel": [n, K_a], "bias": [K_a]}`` and likewise for B.

    Returns:
      ``(head_a, head_b)`` with kernels ``[width, K]``.
    """
    n_m, n_a, n_b = blocks.sizes
    ka, kb = np.asarray(head_a["kernel"]), np.asarray(head_b["kernel"])
    zeros = lambda n, k: np.zeros((n, k.shape[1]), k.dtype)  # noqa: E731
    wa = np.concatenate([ka[blocks.merged_a], ka[blocks.only_a], zeros(n_b, ka)])
    wb = np.concatenate([kb[blocks.merged_b], zeros(n_a, kb), kb[blocks.only_b]])
    return (
        {"kernel": jnp.asarray(wa), "bias": jnp.asarray(head_a["bias"])},
        {"kernel": jnp.asarray(wb), "bias": jnp.asarray(head_b["bias"])},
    )


def apply_head(head: Mapping, features) -> jax.Array:
    """Logits ``[N, K]`` from pooled features ``[N, C]``."""
    return jnp.dot(features, head["kernel"], precision=jax.lax.Precision.HIGHEST) + head["bias"]


def train_linear_probe(
    features,
    labels,
    num_classes: int,
    *,
    epochs: int = 50,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> Head:
    """A linear classifier on frozen features, as the paper probes backbones.

    Adam with a cosine schedule from ``learning_rate`` to ``learning_rate / 10``
    over ``epochs`` passes of shuffled mini-batches; softmax cross-entropy.

    Args:
      features: ``[N, C]`` pooled features.
      labels: ``[N]`` integer labels in ``[0, num_classes)``.

    Returns:
      the trained head.

    Raises:
      ValueError: features and labels that do not fit, labels outside
        ``[0, num_classes)``, ``epochs < 0`` or ``batch_size < 1``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a whole number >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    x = jnp.asarray(features, jnp.float32)
    raw = np.asarray(labels)
    if raw.size and not np.array_equal(raw, np.round(raw)):
        raise ValueError("labels must be whole numbers (class indices)")
    y = jnp.asarray(labels, jnp.int32)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"probe needs features [N, C] and labels [N], got {x.shape} and {y.shape}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    n = x.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    schedule = optax.cosine_decay_schedule(learning_rate, max(total, 1), alpha=0.1)
    opt = optax.adam(schedule)
    head = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
    state = opt.init(head)

    def loss(h, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply_head(h, xb), yb).mean()

    @jax.jit
    def epoch(carry, key):
        order = jax.random.permutation(key, n)[: steps_per_epoch * batch_size]
        order = order.reshape(steps_per_epoch, batch_size)

        def step(c, idx):
            h, s = c
            g = jax.grad(loss)(h, x[idx], y[idx])
            updates, s = opt.update(g, s, h)
            return (optax.apply_updates(h, updates), s), None

        return jax.lax.scan(step, carry, order)[0]

    carry = (head, state)
    for key in jax.random.split(jax.random.key(seed), epochs):
        carry = epoch(carry, key)
    return carry[0]
