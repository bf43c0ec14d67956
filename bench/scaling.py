"""Scaling of the activation-statistics pass over 1, 2, 4, 8 simulated CPU devices.

Each device count runs in its own interpreter (JAX fixes the device count when
it starts) on the same models and the same images, split over a 1-D data mesh.
Reports, per count, the first call (with compilation) and the steady-state
seconds of :func:`pleas_jax.matching.activations.activation_statistics` and of
the bare forward pass of both models, and the steady-state speed-up over one
device. Prints one JSON object (also written to ``--out``).

Simulated devices share the host's cores, so the speed-up is bounded by the
cores XLA can use (on a 2-core machine, ~1x at best); the figure to watch on
real hardware is how close it comes to the device count.

    python bench/scaling.py                                   # resnet18, 32 px, 128 images
    python bench/scaling.py --arch resnet50 --size 64 --images 512 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_args(a) -> list[str]:
    """The ``bench/run.py`` arguments that describe the models and data."""
    out = [
        "--arch",
        a.arch,
        "--size",
        str(a.size),
        "--images",
        str(a.images),
        "--batch-size",
        str(a.batch_size),
        "--similarity",
        a.similarity,
        "--seed",
        str(a.seed),
    ]
    if a.width is not None:
        out += ["--width", str(a.width)]
    return out


def worker(a) -> dict:
    """Time the statistics pass on this process's devices (set up by the parent)."""
    sys.path.insert(0, HERE)
    import run  # bench/run.py: models, data and timing shared with the main benchmark

    args = run.parse_args(_run_args(a))
    sys.path.insert(0, run.ROOT)
    import jax

    from pleas_jax import distributed
    from pleas_jax.matching.activations import activation_statistics
    from pleas_jax.spec import derive_spec

    module, va, vb, batches = run.build_models(args)
    mesh = distributed.data_mesh()
    spec = derive_spec(module, va, batches[0][:1])
    forward = run.forward_times(module, va, vb, batches, mesh)
    _, t = run.timed_twice(
        lambda: activation_statistics(
            module, va, module, vb, spec, batches, a.similarity, mesh=mesh
        )
    )
    return {
        "devices": len(jax.devices()),
        "device_kind": jax.devices()[0].device_kind,
        "statistics": t,
        "forward": forward,
        "statistics_over_forward": t["steady_s"] / forward["steady_s"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--similarity", default="distance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-counts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--timeout", type=int, default=1800, help="seconds per device count")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        print(json.dumps(worker(a)))
        return {}

    rows = []
    for n in a.device_counts:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
        passed = sys.argv[1:] if argv is None else list(argv)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", *passed]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        if res.returncode != 0:
            raise SystemExit(f"scaling: the {n}-device run failed:\n{res.stderr[-3000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - t0
        rows.append(row)
    base = next((r for r in rows if r["devices"] == 1), rows[0])
    for r in rows:
        r["speedup"] = base["statistics"]["steady_s"] / r["statistics"]["steady_s"]
        r["forward_speedup"] = base["forward"]["steady_s"] / r["forward"]["steady_s"]
    out = {
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "worker", "timeout")},
        "host_cpus": os.cpu_count(),
        "rows": rows,
    }
    text = json.dumps(out, indent=1)
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(a.out + ".tmp", a.out)
    print(text)
    return out


if __name__ == "__main__":
    main()
