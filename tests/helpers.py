"""Small models and variables shared by the tests."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax.tree import flatten, unflatten


def init(module, size=32, seed=0, channels=3):
    """Variables for ``module`` on ``[1, size, size, channels]`` inputs.

    Shapes come from ``jax.eval_shape(module.init)``; values are drawn like
    Flax's defaults (kernels ~ N(0, 1/fan_in), BN scale 1, biases and means 0,
    variances 1) with numpy, because running ``init`` op by op or compiling it
    costs seconds per model on a CPU.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(seed), jnp.zeros((1, size, size, channels)))

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            v = rng.normal(0.0, 1.0 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
        elif name in ("scale", "var"):
            v = np.ones(s.shape)
        else:
            v = np.zeros(s.shape)
        return jnp.asarray(v, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def apply(module, variables, *args, **kwargs) -> jax.Array:
    """``module.apply(variables, *args, **kwargs)`` where it gives the output
    alone: Flax types ``apply``'s result as the output or ``(output, state)``."""
    out = module.apply(variables, *args, **kwargs)
    assert isinstance(out, jax.Array), type(out)
    return out


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
    return np.asarray(
        jax.random.normal(jax.random.key(seed), (n, size, size, channels)), np.float32
    )


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resnet20_pair(width=8, size=16, batches=4, batch_size=32):
    """Two random ResNet-20s (10 classes, BN statistics randomized) with their
    spec and ``batches`` image batches ``[batch_size, size, size, 3]``:
    ``(module, variables_a, variables_b, spec, batches)``."""
    from pleas_jax import models
    from pleas_jax.spec import derive_spec

    m = models.resnet20(num_classes=10, width=width)
    va = randomize_norms(init(m, size), 1)
    vb = randomize_norms(init(m, size, seed=2), 3)
    spec = derive_spec(m, va, np.zeros((1, size, size, 3), np.float32))
    return m, va, vb, spec, [images(batch_size, size, seed=s) for s in range(batches)]


def run_on_cpu_devices(script: str, n: int = 8, timeout: int = 600) -> dict:
    """Run ``script`` (Python source; ``{root}`` is the repository root) in a
    fresh interpreter with ``n`` simulated CPU devices, and return the JSON
    object printed on its last line. The device count is fixed when JAX
    starts, hence the subprocess."""
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [sys.executable, "-c", script.format(root=ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def max_relative_difference(one, other, skip=()) -> float:
    """Largest ``|a - b| / max|a|`` over matching leaves of two ``{key: {name: array}}``."""
    worst = 0.0
    for k in one:
        for name, a in one[k].items():
            if name in skip:
                continue
            a, b = np.asarray(a, np.float64), np.asarray(other[k][name], np.float64)
            worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12)))
    return worst


@functools.cache
def source_table(arch, size, num_classes=1000, width=None):
    """``(module, shapes, spec, table)`` of a source ResNet at ``size`` px: the
    accounting reads only shapes, so the variables are abstract
    (``jax.ShapeDtypeStruct``; nothing is compiled)."""
    from pleas_jax import layer_shapes, models
    from pleas_jax.spec import derive_spec

    model = models.resnet(arch, num_classes, width=width)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    spec = derive_spec(model, shapes, x)
    return model, shapes, spec, layer_shapes.layer_table(model, shapes, spec, (size, size, 3))
