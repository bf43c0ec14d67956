"""End-to-end and per-stage PLeaS benchmark against the bare forward pass.

Builds two randomly initialised ResNets of the same architecture (two seeds, or
one model and a random perturbation of it), then times every stage of the
pipeline as :func:`pleas_jax.merge.merge` chains it: spec derivation, the
accounting layer table, weight matching, activation statistics, assignment
(scores + linear assignment), and per budget: ratios + partial merge, least
squares (statistics + solve), BatchNorm recompute and the whole ``merge(...)``
call. Every stage runs twice after clearing JAX's compilation caches: the first
call includes tracing and compilation, the second is the steady state. The
lower bound is the bare jitted forward pass of both source models over the same
batches (timed after a warm-up); every steady-state time is also reported as a
ratio to it. Prints one JSON object (also written to ``--out``).

With ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set,
every process runs this script, ``jax.distributed`` starts first, the mesh
spans all processes' devices and process 0 prints the report.

Timings do not depend on the weights' values, but degenerate features would
time a degenerate problem, so BatchNorm layers get trained-like affine
parameters and running statistics measured on the data.

    python bench/run.py                                       # resnet18, 64 px, CPU
    python bench/run.py --arch resnet20 --width 4 --size 8 --images 32 --budgets 1 2
    python bench/run.py --devices 4                           # 4 simulated CPU devices
    PYTHONPATH=$PWD python3 bench/run.py --arch resnet50 --size 224 --images 3200 \\
        --batch-size 128 --budgets 1.0 1.5                    # GPU (see bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import timing
from timing import memory, timed_twice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("resnet18", "resnet50", "resnet101", "resnet20")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; parsed before JAX is imported (``--devices`` must be
    in the environment when JAX starts)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", choices=ARCHS)
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="base width (default: 64 for ImageNet ResNets, 16 for resnet20)",
    )
    p.add_argument(
        "--classes", type=int, default=None, help="classifier outputs (default: 1000, resnet20: 10)"
    )
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument(
        "--models",
        default="random",
        choices=["random", "perturbed"],
        help="two seeds, or model A and A plus relative noise --perturbation",
    )
    p.add_argument(
        "--perturbation",
        type=float,
        default=0.1,
        help="noise std relative to each parameter leaf's std (--models perturbed)",
    )
    p.add_argument(
        "--matching",
        default="activation",
        choices=["activation", "weight"],
        help="the matching the per-stage pipeline and the whole merge use",
    )
    p.add_argument("--ratios", default="uniform", choices=["uniform", "zip", "optimized"])
    p.add_argument(
        "--unit-multiple",
        type=int,
        default=None,
        help="round separate-unit counts down to multiples of this "
        "(pleas_jax.budget.align_ratios, merge(unit_multiple=...))",
    )
    p.add_argument("--similarity", default="distance", choices=["distance", "correlation", "inner"])
    p.add_argument("--max-iter", type=int, default=100, help="weight matching sweeps")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of the models in the activation statistics stage and "
        "merge()'s matching (accumulation stays fp32); bfloat16 also reports "
        "the deviation from fp32 statistics",
    )
    p.add_argument(
        "--matching-precision",
        default="highest",
        choices=["highest", "bf16_3x", "bfloat16"],
        help="matmul precision of the activation statistics' cross moments of fp32 "
        "features (pleas_jax.products); not highest also reports the deviation "
        "from highest",
    )
    p.add_argument(
        "--ls-precision",
        default="highest",
        choices=["highest", "bf16_3x", "bfloat16"],
        help="matmul precision of the least-squares sums (pleas_jax.products): fp32, "
        "three bf16 products per fp32 product, or one",
    )
    p.add_argument(
        "--max-memory-bytes",
        type=int,
        default=-1,
        help="least-squares statistics bound per pass, passed to least_squares and "
        "merge (-1: the library's default; 0: no bound, one pass)",
    )
    p.add_argument(
        "--statistics",
        default="per_merge",
        choices=["per_merge", "pair"],
        help="merge()'s least-squares statistics (the per-stage least squares is always per merge)",
    )
    p.add_argument(
        "--xla-flops",
        action="store_true",
        help="let merge() cross-check FLOPs with XLA (off: not part of merging)",
    )
    p.add_argument(
        "--warm",
        action="store_true",
        help="do not clear JAX's compilation caches before each stage: a first "
        "call then compiles only what no earlier stage compiled (quicker, "
        "for smoke tests; first-call figures understate compilation)",
    )
    p.add_argument(
        "--devices", type=int, default=None, help="run on this many simulated CPU devices"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.size < 1:
        p.error("--images, --batch-size and --size must be positive")
    for b in args.budgets:
        if not 1.0 <= b <= 2.0:
            p.error(f"budgets lie in [1, 2], got {b}")
    if args.devices is not None and args.devices < 1:
        p.error("--devices must be positive")
    return args


def configure_devices(n: int | None) -> None:
    """Ask for ``n`` simulated CPU devices; JAX reads this once, when it starts,
    so a process that already imported JAX is started again."""
    if n is None:
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        os.execv(sys.executable, [sys.executable, *sys.argv])


# --------------------------------------------------------------------- models
def random_variables(module, size: int, seed: int) -> dict:
    """Variables of ``module`` drawn with numpy from the shapes of ``eval_shape``
    (running ``init`` op by op costs seconds per model on a CPU). Kernels are
    ~N(0, 1/fan_in); BatchNorm scales U(0.5, 1.5) and shifts U(0, 0.3), as in a
    trained net, so units stay alive; running statistics are placeholders for
    :func:`measured_norms`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(seed), jnp.zeros((1, size, size, 3)))

    def fill(path, s):
        keys = [getattr(k, "key", str(k)) for k in path]
        name, collection = keys[-1], keys[0]
        if name == "kernel":
            v = rng.standard_normal(s.shape, np.float32) / np.sqrt(np.prod(s.shape[:-1]))
        elif collection == "params" and name == "scale":
            v = rng.uniform(0.5, 1.5, s.shape)
        elif collection == "params" and name == "bias":
            v = rng.normal(0.0, 0.1, s.shape) if "fc" in keys else rng.uniform(0.0, 0.3, s.shape)
        elif name == "var":
            v = np.ones(s.shape)
        else:
            v = np.zeros(s.shape)
        return jnp.asarray(v, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def perturbed(variables: dict, scale: float, seed: int) -> dict:
    """``variables['params']`` plus Gaussian noise of ``scale`` times each leaf's std:
    a second model close to the first (a fine-tuned-like pair)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def noisy(leaf):
        a = np.asarray(leaf)
        std = float(a.std()) or 1.0
        return jnp.asarray(a + scale * std * rng.standard_normal(a.shape), leaf.dtype)

    return {**variables, "params": jax.tree.map(noisy, variables["params"])}


def measured_norms(module, variables: dict, batches) -> dict:
    """Running statistics measured on ``batches``: with placeholder statistics,
    deep features of a random net vanish or explode and the Grams would be
    degenerate."""
    from pleas_jax.batch_norm import recompute_batch_norm

    return recompute_batch_norm(module, variables, batches)


def build_models(args):
    """``(module, variables_a, variables_b, batches)`` for the configuration."""
    import numpy as np

    from pleas_jax import models

    classes = args.classes
    if classes is None:
        classes = 10 if args.arch == "resnet20" else 1000
    module = models.resnet(args.arch, num_classes=classes, width=args.width)
    rng = np.random.default_rng(args.seed + 2)
    x = rng.standard_normal((args.images, args.size, args.size, 3), np.float32)
    batches = [x[i : i + args.batch_size] for i in range(0, args.images, args.batch_size)]
    va = random_variables(module, args.size, args.seed)
    if args.models == "random":
        vb = random_variables(module, args.size, args.seed + 1)
    else:
        vb = perturbed(va, args.perturbation, args.seed + 1)
    va = measured_norms(module, va, batches[:2])
    vb = measured_norms(module, vb, batches[:2])
    return module, va, vb, batches


def forward_times(module, va, vb, batches, mesh) -> dict:
    """The lower bound: a jitted forward of A and B over every batch.

    Batches come from host memory and are placed on the mesh once per batch
    for both models, as the statistics passes do; ``device_resident_s`` is the
    same with every batch already on the devices.
    """
    import jax

    from pleas_jax import distributed

    f = jax.jit(lambda v, x: module.apply(v, x))

    def from_host():
        out = []
        for xb in batches:
            x, _ = distributed.shard_batch(xb, mesh)
            out.append((f(va, x), f(vb, x)))
        return out

    _, t = timed_twice(from_host, name="forward")
    resident = [distributed.shard_batch(xb, mesh)[0] for xb in batches]
    jax.block_until_ready(resident)
    _, t_res = timed_twice(
        lambda: [(f(va, x), f(vb, x)) for x in resident],
        cold=False,
        name="forward, device-resident",
    )
    return {**t, "device_resident_s": t_res["steady_s"]}


def memory_bound(args):
    """``--max-memory-bytes`` as the library takes it: its default, ``None`` or a bound."""
    if args.max_memory_bytes < 0:
        import inspect

        from pleas_jax.least_squares import least_squares

        return inspect.signature(least_squares).parameters["max_memory_bytes"].default
    return args.max_memory_bytes or None


def least_squares_stage(
    module,
    va,
    vb,
    spec,
    blocks,
    merged_module,
    merged,
    batches,
    mesh,
    max_memory_bytes,
    precision="highest",
):
    """Least squares exactly as :func:`pleas_jax.merge.merge` calls it with
    per-merge statistics (closed form, default ridge, the data as a callable
    returning the batches); the one place to adapt when its internals change.

    Returns ``(merged variables, {sub-stage: seconds}, memory report or None)``
    with the split the function reports itself (``statistics``, ``solve``, ...).
    """
    from pleas_jax.least_squares import least_squares

    variables, report = least_squares(
        module,
        va,
        module,
        vb,
        spec,
        blocks,
        merged_module,
        merged,
        lambda: batches,
        mode="closed_form",
        max_memory_bytes=max_memory_bytes,
        mesh=mesh,
        precision=precision,
        progress=False,
    )
    seconds = {k: float(v) for k, v in report.get("seconds", {}).items()}
    return variables, seconds, report.get("memory")


def statistics_memory(module, va, spec, shape, budgets, bound):
    """The library's own per-budget least-squares statistics memory
    (:func:`pleas_jax.least_squares.statistics_memory`, shapes only), or
    ``None`` where this version lacks it."""
    from pleas_jax import least_squares as _  # noqa: F401  (the submodule, not the function)

    mod = sys.modules["pleas_jax.least_squares"]
    fn = getattr(mod, "statistics_memory", None)
    if fn is None:
        return None
    return fn(module, va, spec, shape, budgets=budgets, max_memory_bytes=bound)


def gram_bytes(table, spec, ratios) -> dict:
    """Closed-form least-squares Gram memory of the merged model, analytic.

    Each conv/dense layer's Gram is ``[dim, dim]`` fp32 with ``dim = C_in * taps
    (+1 for a bias)``, ``C_in`` the merged input width (``n + s`` for a group of
    ``n`` units with ``s`` kept separate per model), ``taps`` the kernel's
    spatial size. Returns the sum over layers and the largest one (the bound
    when layers are streamed one at a time).
    """
    import math

    from pleas_jax import budget

    sep = budget.separate_units(spec, ratios)
    sizes = []
    for la in table.layers:
        c_in = la.c_in + (sep[la.in_group] if la.in_group is not None else 0)
        dim = c_in * math.prod(la.kernel_size) + int(la.bias)
        sizes.append(4 * dim * dim)
    return {
        "gram_bytes": int(sum(sizes)),
        "largest_gram_bytes": int(max(sizes)),
        "layers": len(sizes),
    }


# ---------------------------------------------------------------------- main
def run(args) -> dict:
    """Every measurement for one configuration, as a JSON-able dict."""
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pleas_jax import budget, distributed, partial
    from pleas_jax.batch_norm import recompute_batch_norm
    from pleas_jax.matching import lap
    from pleas_jax.matching.activations import activation_statistics, statistics_to_scores
    from pleas_jax.matching.weights import weight_matching
    from pleas_jax.merge import merge
    from pleas_jax.spec import derive_spec

    timing.COLD = not args.warm
    # Several hosts: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
    # start jax.distributed here, before any other JAX work; the mesh then spans
    # every process's devices (each process builds the same models and images).
    multihost = distributed.initialize_multihost()
    t_setup = time.perf_counter()
    module, va, vb, batches = build_models(args)
    mesh = distributed.data_mesh()
    example = batches[0][:1]
    setup_s = time.perf_counter() - t_setup

    forward = forward_times(module, va, vb, batches, mesh)
    fw = forward["steady_s"]
    stages: dict[str, dict] = {}

    def record(name, t, **extra):
        stages[name] = {**t, "over_forward": t["steady_s"] / fw, **extra}
        return stages[name]

    spec, t = timed_twice(lambda: derive_spec(module, va, example), sync=lambda s: 0, name="spec")
    record("spec", t, groups=len(spec))
    table, t = timed_twice(
        lambda: budget.layer_table(module, va, spec, example.shape[1:]),
        sync=lambda s: 0,
        name="layer table",
    )
    record("layer_table", t)
    host_lap: list[float] = []

    def timed_solver(scores):
        # The assignments run on the host; on an accelerator they are most of
        # weight matching's time.
        t0 = time.perf_counter()
        out = lap.scipy_solver(scores)
        host_lap.append(time.perf_counter() - t0)
        return out

    def matched():
        host_lap.clear()  # count the last call's assignments only
        return weight_matching(spec, va, vb, max_iter=args.max_iter, solver=timed_solver)

    wm, t = timed_twice(matched, name="weight matching")
    record("weight_matching", t, assignments=len(host_lap), assignment_s=sum(host_lap))
    # The same with one group at a time: what solving independent groups in
    # threads saves where the host has cores to spare.
    _, t = timed_twice(
        lambda: weight_matching(spec, va, vb, max_iter=args.max_iter, threads=1),
        name="weight matching, one thread",
    )
    record("weight_matching_one_thread", t)

    stats, t = timed_twice(
        lambda: activation_statistics(
            module,
            va,
            module,
            vb,
            spec,
            batches,
            args.similarity,
            mesh=mesh,
            dtype=args.dtype,
            precision=args.matching_precision,
        ),
        name="activation statistics",
    )
    record(
        "activation_statistics",
        t,
        dtype=args.dtype,
        precision=args.matching_precision,
        steady_s_per_1000_images=t["steady_s"] * 1000.0 / args.images,
    )

    def assign(st):
        scores = statistics_to_scores(st, args.similarity)
        return lap.solve_all({g: scores[g] for g in spec}), scores

    (perm_act, scores), t = timed_twice(lambda: assign(stats), sync=lambda r: 0, name="assignment")
    record("assignment", t)

    matching_check = None
    if args.dtype == "bfloat16" or args.matching_precision != "highest":
        # bf16 compute or products must leave the matching within tolerance
        # of fp32's.
        stats32, t = timed_twice(
            lambda: activation_statistics(
                module, va, module, vb, spec, batches, args.similarity, mesh=mesh
            ),
            name="activation statistics fp32",
        )
        record("activation_statistics_fp32", t, dtype="float32")
        perm32, scores32 = assign(stats32)
        rel = max(
            float(np.max(np.abs(scores[g] - scores32[g])) / max(np.max(np.abs(scores32[g])), 1e-12))
            for g in spec
        )
        agree = sum(int(np.sum(perm_act[g] == perm32[g])) for g in spec)
        matching_check = {
            "max_relative_score_difference": rel,
            "permutation_agreement": agree / sum(spec[g].size for g in spec),
        }
    if args.dtype == "bfloat16":
        m_fw = module.clone(dtype=jnp.bfloat16)
        forward["bfloat16_steady_s"] = forward_times(m_fw, va, vb, batches, mesh)["steady_s"]

    if args.matching == "activation":
        perm, costs = perm_act, scores
    else:
        perm, costs = wm

    bound = memory_bound(args)
    ls_memory = statistics_memory(module, va, spec, example.shape[1:], args.budgets, bound)
    pair_stats = None
    if args.statistics == "pair":
        from pleas_jax.pair_least_squares import pair_statistics

        pair_stats, t = timed_twice(
            lambda: pair_statistics(
                module,
                va,
                module,
                vb,
                spec,
                batches,
                mesh=mesh,
                precision=args.ls_precision,
                max_memory_bytes=bound,
            ),
            sync=lambda r: r.sums,
            name="pair statistics",
        )
        record(
            "pair_statistics",
            t,
            bytes=pair_stats.nbytes,
            steady_s_per_1000_images=t["steady_s"] * 1000.0 / args.images,
        )
    rows = []
    for i, b in enumerate(args.budgets):
        row: dict = {"budget": b}
        if ls_memory is not None:
            row["statistics_memory"] = ls_memory["budgets"][i]
        sens = None
        if args.ratios == "optimized":
            sens = budget.sensitivity_from_costs(spec, perm, costs)

        def merge_partial(b=b, sens=sens):
            ratios = budget.ratios_for_budget(args.ratios, table, spec, b, weights=sens)
            if args.unit_multiple is not None:
                ratios = budget.align_ratios(spec, ratios, args.unit_multiple)
            blocks = partial.make_blocks(spec, perm, costs, ratios)
            return ratios, blocks, *partial.partial_merge(module, spec, blocks, va, vb)

        (ratios, blocks, merged_module, merged), t = timed_twice(
            merge_partial, sync=lambda r: r[3], name=f"budget {b}: partial merge"
        )
        row["partial_merge"] = {**t, "over_forward": t["steady_s"] / fw}
        row["achieved_budget_stages"] = budget.relative_compute(table, spec, ratios)
        row.update(gram_bytes(table, spec, ratios))

        split: list[dict] = []  # what least squares reports, first and second call
        ls_mem: list = []

        def ls(
            merged_module=merged_module, merged=merged, blocks=blocks, split=split, ls_mem=ls_mem
        ):
            out, seconds, mem = least_squares_stage(
                module,
                va,
                vb,
                spec,
                blocks,
                merged_module,
                merged,
                batches,
                mesh,
                bound,
                args.ls_precision,
            )
            split.append(seconds)
            ls_mem.append(mem)
            return out

        fitted, t = timed_twice(ls, name=f"budget {b}: least squares")
        # Time least squares spends outside its own statistics and solve
        # (layer discovery, geometry checks, residuals, writing the solution).
        other = t["steady_s"] - sum(split[1].values())
        row["least_squares"] = {
            **t,
            "over_forward": t["steady_s"] / fw,
            "reported_first_call": split[0],
            "reported_steady": split[1],
            "steady_outside_reported_s": other,
            "reported_memory": ls_mem[-1],
        }
        if pair_stats is not None:
            from pleas_jax.pair_least_squares import fit

            _, t = timed_twice(
                lambda blocks=blocks, merged=merged: fit(pair_stats, blocks, merged),
                sync=lambda r: r[0],
                name=f"budget {b}: pair fit",
            )
            row["pair_fit"] = {**t, "over_forward": t["steady_s"] / fw}
        _, t = timed_twice(
            lambda mm=merged_module, fitted=fitted: recompute_batch_norm(
                mm, fitted, batches, mesh=mesh
            ),
            name=f"budget {b}: batch norm",
        )
        row["batch_norm"] = {**t, "over_forward": t["steady_s"] / fw}

        result, t = timed_twice(
            lambda b=b: merge(
                (module, va),
                (module, vb),
                batches,
                b,
                matching=args.matching,
                ratios=args.ratios,
                unit_multiple=args.unit_multiple,
                similarity=args.similarity,
                max_iter=args.max_iter,
                matching_dtype=args.dtype,
                matching_precision=args.matching_precision,
                ls_precision=args.ls_precision,
                statistics=args.statistics,
                max_memory_bytes=bound,
                count_xla_flops=args.xla_flops,
                mesh=mesh,
                progress=False,
            ),
            sync=lambda r: r.variables,
            name=f"budget {b}: merge",
        )
        row["merge"] = {
            **t,
            "over_forward": t["steady_s"] / fw,
            "first_call_over_forward": t["first_call_s"] / fw,
            "stage_seconds_steady": result.report["seconds"],
        }
        row["achieved_budget"] = float(result.report["achieved_budget"])
        row["macs"] = int(result.report["macs"])
        row["macs_source"] = int(result.report["macs_source"])
        row["memory"] = memory()
        rows.append(row)
        del result, fitted, merged

    return {
        "device_kind": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "n_devices": len(jax.devices()),
        "n_processes": jax.process_count(),
        "multihost": multihost,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "max_memory_bytes": bound,
        "pair_statistics_memory": None if ls_memory is None else ls_memory["pair"],
        "model_setup_s": setup_s,
        "forward": forward,
        "stages": stages,
        "budgets": rows,
        "matching_check": matching_check,
        "memory": memory(),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_devices(args.devices)
    sys.path.insert(0, ROOT)
    out = run(args)
    import jax

    if jax.process_index() != 0:
        return out  # one report per job, from process 0
    text = json.dumps(out, indent=1)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    print(text)
    return out


if __name__ == "__main__":
    main()
