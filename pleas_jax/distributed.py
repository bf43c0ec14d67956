"""Device meshes and the one pattern every statistics pass uses.

Statistics over data (activation cross-moments, least-squares Grams, BatchNorm
moments) are sums over examples. :func:`batch_sum` turns a per-shard function
that sums over its examples into one compiled function over a 1-D ``data``
mesh: each device sums its shard, then ``psum`` reduces across devices. The same
code runs on 1 CPU, 8 simulated CPU devices, several GPUs or a TPU slice.

Batches whose size does not divide the device count are padded with zeros and
carry a mask (1 for real examples, 0 for padding); per-shard functions must
weight every example by the mask, so padding never changes a statistic and no
example is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (by default ``jax.devices()``:
    every device of every process once ``jax.distributed`` is initialised, so
    each process must then pass :func:`shard_batch` the same global batch)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``x [N, ...]`` with zeros to a multiple of ``multiple`` examples.

    Returns:
      ``(x_padded [M, ...], mask [M] float32)`` with ``M = ceil(N / multiple) * multiple``
      and ``mask[i] = 1`` exactly for the ``N`` real examples.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"a batch needs at least one example, got shape {x.shape}")
    n = x.shape[0]
    m = -(-n // multiple) * multiple
    mask = np.zeros((m,), np.float32)
    mask[:n] = 1.0
    if m == n:
        return x, mask
    pad = np.zeros((m - n, *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad]), mask


def is_padded(n: int, mesh: jax.sharding.Mesh) -> bool:
    """Whether :func:`shard_batch` pads a batch of ``n`` examples on ``mesh``
    (a batch that fills every device evenly has no padding to mask)."""
    return n % mesh.devices.size != 0


def shard_batch(x: np.ndarray, mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
    """Pad ``x [N, ...]`` to the mesh size and place it split along the batch axis.

    ``x`` is the whole (global) batch: on a mesh spanning several processes,
    every process passes the same ``x`` and each device takes its slice (jax
    refuses arrays that differ between processes).

    Returns ``(x [M, ...], mask [M])`` as sharded device arrays.
    """
    x, mask = pad_batch(x, mesh.devices.size)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.device_put(x, sharding), jax.device_put(mask, sharding)


def batch_sum(
    fn: Callable[[Any, jax.Array, jax.Array], Any], mesh: jax.sharding.Mesh
) -> Callable[[Any, jax.Array, jax.Array], Any]:
    """Compile ``fn`` as a sum over a batch split across ``mesh``.

    Args:
      fn: ``fn(replicated, x_shard [n, ...], mask_shard [n]) -> pytree`` of sums
        over the shard's examples, each weighted by ``mask_shard``.
      mesh: a mesh from :func:`data_mesh`.

    Returns:
      A jitted ``g(replicated, x [M, ...], mask [M]) -> pytree``: the same sums
      over the whole batch, replicated on every device.
    """

    def per_shard(replicated, x, mask):
        return jax.lax.psum(fn(replicated, x, mask), DATA_AXIS)

    return jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
            out_specs=P(),
        )
    )


def map_programs(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    cost: Callable[[Any], float] | None = None,
    threads: int | None = None,
) -> list:
    """``[fn(item) for item in items]`` for independent compiled programs, on a
    CPU backend run from several threads.

    XLA:CPU runs one program's LAPACK calls (the least-squares Cholesky and
    eigh) on one core (OpenBLAS is kept to one thread, see
    :mod:`pleas_jax`), and programs dispatched from one thread run one after
    another. Dispatched from a pool, independent programs (one solve per
    layer) use every core: four 3072-wide Cholesky solves took 1.22 s in a
    loop and 0.73 s from two threads on this project's 2-core CPU. On GPUs and
    TPUs asynchronous dispatch already queues them, and the plain loop keeps
    device memory at one program's temporaries, so they keep the loop.

    Args:
      fn: called once per item; returns arrays (or a pytree of them). Called
        from several threads at once on a CPU backend; jitted functions are
        safe, but JAX's configuration contexts (``jax.default_matmul_precision``)
        are per thread, so ``fn`` must enter any it relies on.
      items: its arguments.
      cost: an item's expected run time (any scale): with threads, the
        costliest start first, so that the longest does not start last.
      threads: most programs at once on a CPU backend (default: the CPU count,
        at most 8); ``1`` gives the plain loop.

    Returns:
      the results in the order of ``items`` (on CPU, computed); the first
      error a call raised is raised.
    """
    items = list(items)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    workers = 1 if jax.default_backend() != "cpu" else threads or min(os.cpu_count() or 1, 8)
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    import concurrent.futures

    order = (
        range(len(items))
        if cost is None
        else sorted(range(len(items)), key=lambda i: -cost(items[i]))
    )
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # Each worker waits for its program: dispatch alone returns at once,
        # and the programs would then queue up behind each other again.
        futures = {
            i: pool.submit(lambda item: jax.block_until_ready(fn(item)), items[i]) for i in order
        }
        return [futures[i].result() for i in range(len(items))]


def _check_address(address: str) -> None:
    # A missing port would otherwise surface as a gRPC connect timeout minutes
    # later, on every process.
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # IPv6 literal, "[::1]:1234"
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"JAX_COORDINATOR_ADDRESS must be host:port (e.g. 10.0.0.1:1234), got {address!r}"
        )


def multihost_args(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Arguments for ``jax.distributed.initialize`` from the environment.

    Reads ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With none of them set this is a single-host run and
    nothing is started. With some but not all set, raises ``ValueError``
    naming the missing ones.

    Returns the keyword arguments for ``jax.distributed.initialize`` (empty
    for a single host).
    """
    env = os.environ if environ is None else environ
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [n for n in names if env.get(n)]
    if not present:
        return {}
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(
            f"multi-host start needs {', '.join(missing)} as well as {', '.join(present)}"
        )
    try:
        num, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
    if not 0 <= pid < num:
        raise ValueError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={num})")
    _check_address(env["JAX_COORDINATOR_ADDRESS"])
    kwargs = {
        "coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
        "num_processes": num,
        "process_id": pid,
    }
    return kwargs


def initialize_multihost(environ: dict[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when :func:`multihost_args` finds a
    multi-host setup; returns whether it did. Call before any other JAX work."""
    kwargs = multihost_args(environ)
    if kwargs:
        jax.distributed.initialize(**kwargs)
    return bool(kwargs)
