"""BatchNorm statistics of a merged model, recomputed on data.

Merged units average their pair's weights, so the running statistics they
inherit no longer describe their inputs. Every BatchNorm's running mean and
variance is recomputed as the population moments of its input over all the
examples given, with the network in training mode (each BN normalises with its
batch's statistics while they are gathered, as PyTorch's ``reset_bn_stats``
recipe does). The moments are accumulated as sums over every batch, so the
result is a cumulative average over the data, not an exponential one, and the
variance is the population (biased) variance.

Each batch is one jitted call. A batch whose size divides the device count is
split across devices (XLA then reduces the batch statistics globally, so the
result does not depend on the device count); others run replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from pleas_jax import distributed
from pleas_jax.models.layers import FEATURES
from pleas_jax.tree import flatten, unflatten


@functools.lru_cache(maxsize=16)
def _moments_fn(module):
    # Cached per module (modules compare by value): merges that yield the same
    # merged architecture, e.g. several methods at one budget, compile once.
    @jax.jit
    def moments(variables, x):
        _, state = module.apply(variables, x, train=True, mutable=[FEATURES, "batch_stats"])
        bn = set(flatten(variables["batch_stats"]))
        out = {}
        for path, v in flatten(state[FEATURES]).items():
            if path[-1] != "in" or (*path[:-1], "mean") not in bn:
                continue
            v = v.astype(jnp.float32).reshape(-1, v.shape[-1])
            mean = v.mean(0)
            # Centred second moments: E[x^2] - E[x]^2 cancels badly in float32.
            out[path[:-1]] = (mean, ((v - mean) ** 2).sum(0), v.shape[0])
        return out

    return moments


def _combine(total, n_total, batch, n):
    """Chan et al.'s pairwise update of (mean, sum of squared deviations), float64."""
    if total is None:
        return batch
    (m1, s1), (m2, s2) = total, batch
    delta = m2 - m1
    n_all = n_total + n
    return m1 + delta * (n / n_all), s1 + s2 + delta**2 * (n_total * n / n_all)


def recompute_batch_norm(
    module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """New ``batch_stats`` from the population moments of each BN's input.

    Args:
      module: a model whose BatchNorm layers are :class:`pleas_jax.models.BatchNorm`.
      variables: its variables (``params`` and ``batch_stats``).
      batches: iterable of images ``[N, H, W, C]`` or ``(images, labels)``.
      mesh: device mesh (all local devices by default).
      progress: show a progress bar.

    Returns:
      ``variables`` with every ``batch_stats/.../mean`` and ``var`` replaced
      (``[C]`` each); other leaves are the same objects.
    """
    if "batch_stats" not in variables:
        return dict(variables)
    mesh = mesh or distributed.data_mesh()
    sharded = NamedSharding(mesh, P(distributed.DATA_AXIS))
    moments = _moments_fn(module)
    total: dict | None = None
    count: dict = {}
    for batch in tqdm(batches, desc="BatchNorm statistics", disable=not progress, leave=False):
        x = np.asarray(batch[0] if isinstance(batch, tuple | list) else batch)
        if x.ndim == 0 or x.shape[0] == 0:
            continue
        if x.shape[0] % mesh.devices.size == 0:
            x = jax.device_put(x, sharded)
        total = total or {}
        for layer, (mean, m2, n) in moments(variables, x).items():
            part = (np.asarray(mean, np.float64), np.asarray(m2, np.float64))
            total[layer] = _combine(total.get(layer), count.get(layer, 0), part, int(n))
            count[layer] = count.get(layer, 0) + int(n)
    if total is None:
        raise ValueError("recomputing BatchNorm statistics needs at least one non-empty batch")
    stats = dict(flatten(variables["batch_stats"]))
    found = set()
    for layer, (mean, m2) in total.items():
        stats[(*layer, "mean")] = jnp.asarray(mean, jnp.float32)
        stats[(*layer, "var")] = jnp.asarray(m2 / count[layer], jnp.float32)
        found.add(layer)
    missing = {p[:-1] for p in stats} - found
    if missing:
        names = ", ".join("/".join(p) for p in sorted(missing))
        raise ValueError(f"no input was recorded for the BatchNorm layer(s) {names}")
    return {**variables, "batch_stats": unflatten(stats)}
