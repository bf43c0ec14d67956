"""One conv layer's least-squares Gram per batch: patch vs shift Grams, per precision.

    python bench/gram.py                              # resnet50's 3x3 convs at 64 px, batch 32
    python bench/gram.py --size 224 --batch-size 128 --precision highest bf16_3x   # a GPU

For each stride-1 3x3 conv shape of a resnet50 merged at ``--budget`` (input
channels ``C·(1 + r)`` of the uniform ratio r that budget needs, map side
``size / 4 ... size / 32``), times ``batch_sums`` (the Gram, cross term and
target sums of one batch) with ``gram="patches"``, ``"shifts"`` and ``"auto"``
at each ``--precision``, best of ``--repeat`` steady calls, and reports the
largest difference of each Gram from the fp32 patch Gram (relative to its
largest entry). Prints one JSON object.
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

from pleas_jax.ls_layers import Layer  # noqa: E402
from pleas_jax.ls_statistics import _shift_saving, batch_sums  # noqa: E402
from pleas_jax.products import PRECISION_MODES  # noqa: E402

# resnet50's stride-1 3x3 convs: (input channels of one model, map side / image side)
SHAPES = [(64, 4), (128, 8), (256, 16), (512, 32)]


def _measure(layer, x, y, mask, precisions, repeat):
    """``({"gram/precision": seconds}, {"gram/precision": error vs the fp32 patch Gram})``."""
    ref = jax.jit(lambda x, y, m: batch_sums(layer, x, y, m, gram="patches")["gram"])(x, y, mask)
    ref = np.asarray(ref, np.float64)
    seconds, errors = {}, {}
    for prec in precisions:
        for gram in ("patches", "shifts", "auto"):
            fn = jax.jit(
                lambda x, y, m, gram=gram, prec=prec: batch_sums(
                    layer, x, y, m, gram=gram, precision=prec
                )
            )
            key = f"{gram}/{prec}"
            seconds[key] = best_of(lambda fn=fn: fn(x, y, mask), repeat)[2]
            g = np.asarray(fn(x, y, mask)["gram"], np.float64)
            errors[key] = float(np.abs(g - ref).max() / np.abs(ref).max())
    return seconds, errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budget", type=float, default=1.5, help="in [1, 2]: widths C·(budget)")
    p.add_argument("--precision", nargs="+", default=["highest"], choices=PRECISION_MODES)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    if not 1.0 <= a.budget <= 2.0:
        p.error("--budget must lie in [1, 2]")
    rng = np.random.default_rng(0)
    rows = []
    for c_one, down in SHAPES:
        c, hw = int(round(c_one * a.budget)), max(a.size // down, 1)
        layer = Layer(
            "c",
            "conv",
            (3, 3),
            (1, 1),
            ((1, 1), (1, 1)),
            (1, 1),
            False,
            None,
            None,
            (c, 0, 0),
            (c, 0, 0),
        )
        x = jnp.asarray(np.maximum(rng.normal(size=(a.batch_size, hw, hw, c)), 0), jnp.float32)
        y = jnp.asarray(rng.normal(size=(a.batch_size, hw, hw, c)), jnp.float32)
        mask = jnp.ones((a.batch_size,), jnp.float32)
        saving = _shift_saving(layer, (hw, hw), a.batch_size)
        row = {"channels": c, "map": hw, "estimated_saving": saving}
        row["seconds"], row["gram_error"] = _measure(layer, x, y, mask, a.precision, a.repeat)
        print(f"gram.py: {c} channels, {hw}x{hw}: {row['seconds']}", file=sys.stderr)
        rows.append(row)
    out = {
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "config": vars(a),
        "layers": rows,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
