"""Least-squares benchmark: statistics pass and closed-form solve per budget.

For each budget, the uniform allocation (:func:`pleas_jax.budget.uniform_ratios`)
with the identity matching gives the blocks; the benchmark times the sharded
statistics pass (:func:`pleas_jax.least_squares.layer_statistics`, relative to
the partial-merge weights, as :func:`pleas_jax.least_squares.least_squares`
runs it) and the block-constrained solve, each as a first call (with
compilation) and as the best of later calls (compiled steps are reused).
Optionally times the gradient mode. Prints one JSON object. Models are
randomly initialised; timings do not depend on the weights' values.

    python bench/least_squares.py                                   # resnet18, 64 px, CPU
    python bench/least_squares.py --arch resnet50 --size 224 --images 3200 --batch-size 128  # GPU
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
from timing import best_of, peak_device_bytes  # noqa: E402

from pleas_jax import budget, models, partial  # noqa: E402
from pleas_jax.batch_norm import recompute_batch_norm  # noqa: E402
from pleas_jax.least_squares import (  # noqa: E402
    find_layers,
    gradient_descent,
    layer_statistics,
    residuals,
    solve,
    weights_of,
)
from pleas_jax.spec import derive_spec  # noqa: E402
from pleas_jax.tree import flatten, unflatten  # noqa: E402


def _model(arch, classes, size, seed, batches):
    """A random model whose features stay alive: BatchNorm affine parameters
    as a trained net has them, running statistics measured on the data (with
    arbitrary statistics, deep features of a random net die and the Grams are
    zero, which would time a degenerate problem)."""
    m = models.resnet(arch, num_classes=classes)
    v = m.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)
    flat = flatten(v["params"])
    for path, leaf in flat.items():
        if leaf.ndim == 1 and path[-1] == "scale":
            flat[path] = jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        elif leaf.ndim == 1 and path[-1] == "bias" and path[0] != "fc":
            flat[path] = jnp.asarray(rng.uniform(0.0, 0.3, leaf.shape), leaf.dtype)
    v = {"params": unflatten(flat), "batch_stats": v["batch_stats"]}
    return m, recompute_batch_norm(m, v, batches)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--repeat", type=int, default=1, help="timed calls after the first")
    p.add_argument(
        "--gram",
        default="auto",
        choices=["auto", "patches", "shifts"],
        help="how conv Grams are formed",
    )
    p.add_argument("--gd-steps", type=int, default=0, help="also time the gradient mode")
    a = p.parse_args(argv)

    x = np.asarray(jax.random.normal(jax.random.key(2), (a.images, a.size, a.size, 3)), np.float32)
    batches = [x[i : i + a.batch_size] for i in range(0, a.images, a.batch_size)]
    ma, va = _model(a.arch, a.classes, a.size, 0, batches[:2])
    mb, vb = _model(a.arch, a.classes, a.size, 1, batches[:2])
    spec = derive_spec(ma, va, x[:1])
    table = budget.layer_table(ma, va, spec, (a.size, a.size, 3))
    perm = {g: np.arange(grp.size) for g, grp in spec.items()}
    per_k = 1000.0 / a.images

    rows = []
    for b in a.budgets:
        ratios = budget.uniform_ratios(table, spec, b)
        r = float(next(iter(ratios.values())))
        blocks = partial.full_blocks(spec, perm, r)
        _, vm = partial.partial_merge(ma, spec, blocks, va, vb)
        layers = find_layers(ma, va, spec, blocks, x[:1])
        w0 = weights_of(vm, layers)

        stats, st_first, st_best = best_of(
            lambda blocks=blocks, w0=w0: layer_statistics(
                ma, va, mb, vb, spec, blocks, batches, init=w0, gram=a.gram
            ),
            a.repeat,
        )
        sol, so_first, so_best = best_of(lambda stats=stats: solve(stats), a.repeat)
        before, after = residuals(stats, w0), residuals(stats, sol)
        row = {
            "budget": b,
            "ratio": r,
            "layers": len(layers),
            "largest_gram_dim": max(lay.dim for lay in layers.values()),
            "gram_mbytes_total": sum(lay.gram_bytes for lay in layers.values()) / 2**20,
            "statistics_seconds": st_best,
            "statistics_seconds_per_1000_images": st_best * per_k,
            "statistics_first_call_seconds": st_first,
            "solve_seconds": so_best,
            "solve_first_call_seconds": so_first,
            "statistics_plus_solve_seconds": st_best + so_best,
            "cholesky_fallbacks": sum(bool(s["fallback"]) for s in sol.values()),
            "mean_residual_before": float(np.mean(list(before.values()))),
            "mean_residual_after": float(np.mean(list(after.values()))),
        }
        if a.gd_steps:
            _, gd_first, gd_best = best_of(
                lambda blocks=blocks, w0=w0: gradient_descent(
                    ma, va, mb, vb, spec, blocks, w0, batches, steps=a.gd_steps
                )[0],
                a.repeat,
            )
            row.update(gd_steps=a.gd_steps, gd_seconds=gd_best, gd_first_call_seconds=gd_first)
        row["peak_device_bytes"] = peak_device_bytes()
        rows.append(row)
        del stats, sol

    print(
        json.dumps(
            {
                "device": str(jax.devices()[0].device_kind),
                "n_devices": len(jax.devices()),
                "arch": a.arch,
                "size": a.size,
                "images": a.images,
                "batch_size": a.batch_size,
                "gram": a.gram,
                "budgets": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
