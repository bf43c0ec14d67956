"""Analytic vs XLA-counted FLOPs of partially merged ResNets at several budgets.

For each architecture and budget, the uniform allocation for that budget
(:func:`pleas_jax.budget.uniform_ratios`) is built as a real merged model
(identity matching, random weights, :func:`pleas_jax.partial.partial_merge`)
and its FLOPs are counted by XLA, as lowered and (optionally) as compiled for
this machine's backend. Prints a JSON list, one entry per architecture.

    .venv/bin/python bench/flops.py                      # resnet18 + resnet50, 224 px
    .venv/bin/python bench/flops.py --archs resnet18 --size 64 --no-compiled
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pleas_jax import budget, models, partial
from pleas_jax.spec import derive_spec

BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)


def rows_for(arch: str, size: int, budgets, compiled: bool, seed: int = 0) -> dict:
    model = models.resnet(arch, 1000)
    small = jnp.zeros((1, 32, 32, 3))  # parameters do not depend on the input size
    va = model.init(jax.random.key(seed), small)
    vb = model.init(jax.random.key(seed + 1), small)
    spec = derive_spec(model, va, small)
    table = budget.layer_table(model, va, spec, (size, size, 3))
    perm = {g: np.arange(grp.size) for g, grp in spec.items()}
    rows = []
    for b in budgets:
        ratios = budget.uniform_ratios(table, spec, b)
        r = next(iter(ratios.values()))
        merged, mv = partial.partial_merge(model, spec, partial.full_blocks(spec, perm, r), va, vb)
        analytic = 2 * budget.macs(table, spec, ratios, count_padding=False)
        t0 = time.perf_counter()
        lowered = budget.xla_flops(merged, mv, (size, size, 3))
        row = {
            "budget": b,
            "ratio": r,
            "relative_compute": budget.relative_compute(table, spec, ratios),
            "gmacs": budget.macs(table, spec, ratios) / 1e9,
            "analytic_gflops": analytic / 1e9,
            "xla_gflops": lowered / 1e9,
            "xla_over_analytic": lowered / analytic,
            "params_stored": budget.params(table, spec, ratios).stored,
            "params_nonzero": budget.params(table, spec, ratios).nonzero,
            "lower_s": round(time.perf_counter() - t0, 2),
        }
        stored = sum(int(np.size(x)) for x in jax.tree.leaves(mv["params"]))
        if stored != row["params_stored"]:
            raise AssertionError(
                f"{arch} at {b}: {stored} stored parameters, analytic {row['params_stored']}"
            )
        if compiled:
            t0 = time.perf_counter()
            c = budget.xla_flops(merged, mv, (size, size, 3), compiled=True)
            row["xla_compiled_gflops"] = c / 1e9
            row["xla_compiled_over_analytic"] = c / analytic
            row["compile_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return {"arch": arch, "size": size, "backend": jax.default_backend(), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--no-compiled", dest="compiled", action="store_false")
    args = p.parse_args()
    out = [rows_for(a, args.size, args.budgets, args.compiled) for a in args.archs]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
