"""Small models and variables shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.tree import flatten, unflatten


def init(module, size=32, seed=0, channels=3):
    """Initialise ``module`` on ``[1, size, size, channels]`` inputs."""
    return module.init(jax.random.key(seed), jnp.zeros((1, size, size, channels)))


def randomize_norms(variables, seed=0):
    """Give every BatchNorm non-trivial affine parameters and running statistics,
    as a trained network has, keeping units alive (positive bias) so that
    features identify them."""
    rng = np.random.default_rng(seed)
    flat = flatten(variables)
    out = {}
    for path, v in flat.items():
        v = np.asarray(v)
        name = path[-1]
        if v.ndim == 1 and name == "scale":
            v = rng.uniform(0.5, 1.5, v.shape)
        elif v.ndim == 1 and name == "bias" and path[0] == "params":
            v = rng.uniform(0.0, 0.3, v.shape) if "fc" not in path else rng.normal(0, 0.1, v.shape)
        elif name == "mean":
            v = rng.normal(0.0, 0.1, v.shape)
        elif name == "var":
            v = rng.uniform(0.5, 1.5, v.shape)
        out[path] = jnp.asarray(v, jnp.float32)
    return unflatten(out)


def images(n, size=32, seed=0, channels=3):
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, size, size, channels)), np.float32)
