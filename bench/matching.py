"""Matching benchmark: spec tracing, weight matching, activation statistics.

Prints one JSON object. Models are randomly initialised (with trained-like
BatchNorm statistics) since timings do not depend on the weights' values.

    python bench/matching.py                                   # resnet18, 64 px, CPU
    python bench/matching.py --arch resnet50 --size 224 --images 3200 --batch-size 256  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from timing import best_of  # noqa: E402

from pleas_jax import models  # noqa: E402
from pleas_jax.matching.activations import activation_statistics  # noqa: E402
from pleas_jax.matching.weights import weight_matching  # noqa: E402
from pleas_jax.spec import derive_spec  # noqa: E402


def _model(arch, classes, size, seed):
    m = models.resnet(arch, num_classes=classes)
    v = m.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v["batch_stats"]
    )
    return m, {"params": v["params"], "batch_stats": stats}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--similarity", default="distance")
    p.add_argument(
        "--precision",
        default="highest",
        choices=["highest", "bf16_3x", "bfloat16"],
        help="matmul precision of the cross moments (pleas_jax.products)",
    )
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)

    ma, va = _model(a.arch, a.classes, a.size, 0)
    mb, vb = _model(a.arch, a.classes, a.size, 1)
    x = np.asarray(jax.random.normal(jax.random.key(2), (a.images, a.size, a.size, 3)), np.float32)
    batches = [x[i : i + a.batch_size] for i in range(0, a.images, a.batch_size)]

    spec, spec_first, spec_best = best_of(lambda: derive_spec(ma, va, x[:1]), a.repeat)
    _, wm_first, wm_best = best_of(lambda: weight_matching(spec, va, vb), a.repeat)

    def stats():
        s = activation_statistics(
            ma, va, mb, vb, spec, batches, a.similarity, precision=a.precision
        )
        return jax.block_until_ready(s)

    _, st_first, st_best = best_of(stats, a.repeat)

    f = jax.jit(lambda v, xb: ma.apply(v, xb))

    def forward():
        for xb in batches:
            out = (f(va, xb), f(vb, xb))
        return jax.block_until_ready(out)

    _, fw_first, fw_best = best_of(forward, a.repeat)
    per_k = 1000.0 / a.images
    print(
        json.dumps(
            {
                "device": str(jax.devices()[0].device_kind),
                "n_devices": len(jax.devices()),
                "arch": a.arch,
                "size": a.size,
                "images": a.images,
                "batch_size": a.batch_size,
                "groups": len(spec),
                "precision": a.precision,
                "spec_seconds": spec_best,
                "weight_matching_seconds": wm_best,
                "weight_matching_first_call_seconds": wm_first,
                "activation_statistics_seconds": st_best,
                "activation_statistics_seconds_per_1000_images": st_best * per_k,
                "activation_statistics_first_call_seconds": st_first,
                "forward_both_models_seconds": fw_best,
                "statistics_over_forward": st_best / fw_best,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
