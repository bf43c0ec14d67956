"""Padding, masking and multi-host argument handling."""

import jax.numpy as jnp
import numpy as np
import pytest

from pleas_jax import distributed


def test_pad_batch_masks_padding():
    x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    xp, mask = distributed.pad_batch(x, 4)
    assert xp.shape == (8, 2) and mask.tolist() == [1] * 7 + [0]
    np.testing.assert_array_equal(xp[:7], x)
    xp, mask = distributed.pad_batch(x, 7)
    assert xp.shape == (7, 2) and mask.sum() == 7
    with pytest.raises(ValueError, match="at least one example"):
        distributed.pad_batch(np.zeros((0, 3)), 2)


def test_is_padded_agrees_with_shard_batch():
    mesh = distributed.data_mesh()
    for n in (1, 2, 3, 7, 8):
        _, mask = distributed.shard_batch(np.zeros((n, 2), np.float32), mesh)
        assert distributed.is_padded(n, mesh) == (float(np.asarray(mask).min()) == 0.0), n


def test_batch_sum_equals_plain_sum():
    mesh = distributed.data_mesh()
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    f = distributed.batch_sum(lambda w, xs, m: {"s": (xs * m[:, None] * w).sum(0)}, mesh)
    xs, mask = distributed.shard_batch(x, mesh)
    out = f(jnp.float32(2.0), xs, mask)
    np.testing.assert_allclose(out["s"], 2 * x.sum(0), rtol=1e-6)


def test_multihost_args():
    assert distributed.multihost_args({}) == {}
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "2",
    }
    assert distributed.multihost_args(env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 2,
    }
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        distributed.multihost_args({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="integers"):
        distributed.multihost_args({**env, "JAX_PROCESS_ID": "x"})
    with pytest.raises(ValueError, match="outside"):
        distributed.multihost_args({**env, "JAX_PROCESS_ID": "4"})
    for bad in ("10.0.0.1", "10.0.0.1:", ":1234", "host:port", "host:0", "host:70000", "[::1]"):
        with pytest.raises(ValueError, match="must be host:port"):
            distributed.multihost_args({**env, "JAX_COORDINATOR_ADDRESS": bad})
    for good in ("localhost:8476", "[::1]:1234", "node-3.cluster:65535"):
        args = distributed.multihost_args({**env, "JAX_COORDINATOR_ADDRESS": good})
        assert args["coordinator_address"] == good
    assert distributed.initialize_multihost({}) is False


def test_map_programs_runs_on_threads_in_cost_order_and_returns_in_item_order():
    import threading

    import jax

    solve = jax.jit(lambda g, b: jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(g), b))
    rng = np.random.default_rng(0)
    items = []
    for n in (3, 40, 7, 120, 1):
        a = rng.normal(size=(n, n + 2)).astype(np.float32)
        items.append(
            (a @ a.T + n * np.eye(n, dtype=np.float32), rng.normal(size=(n, 2)).astype(np.float32))
        )
    started, threads = [], set()
    both: threading.Barrier | None = threading.Barrier(2, timeout=30)  # the two costliest at once

    def fn(item):
        started.append(len(item[0]))
        threads.add(threading.get_ident())
        if len(item[0]) in (40, 120) and both is not None:
            both.wait()
        return solve(*item)

    # Second implementation: numpy's solver, item by item.
    want = [np.linalg.solve(g.astype(np.float64), b) for g, b in items]
    out = distributed.map_programs(fn, items, cost=lambda it: len(it[0]), threads=2)
    for got, w in zip(out, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-3, atol=1e-4)
    assert sorted(started[:2]) == [40, 120] and len(threads) == 2  # the costliest first, together
    started.clear()
    threads.clear()
    both = None
    loop = distributed.map_programs(fn, items, threads=1)
    assert started == [3, 40, 7, 120, 1] and len(threads) == 1
    for a, b in zip(loop, out, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def fails(item):
        if len(item[0]) == 7:
            raise ValueError("layer 7 failed")
        return solve(*item)

    with pytest.raises(ValueError, match="layer 7 failed"):
        distributed.map_programs(fails, items, threads=2)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        distributed.map_programs(fn, items, threads=0)
