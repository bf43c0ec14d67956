"""Timing and memory readings shared by the benchmark scripts.

JAX is imported inside the functions: ``run.py`` must parse ``--devices`` and
set ``XLA_FLAGS`` before the first import of JAX in the process.

    from timing import best_of, memory    # scripts run as ``python bench/x.py``
    out, first_s, best_s = best_of(lambda: step(x), repeat=3)
"""

from __future__ import annotations

import resource
import sys
import time

COLD = True  # timed_twice clears compilation caches first (run.py --warm turns it off)


def best_of(fn, repeat: int):
    """``(result, first_s, best_s)``: the first call of ``fn`` (tracing and
    compilation included) and the best of ``repeat`` later ones, each waited
    for with ``jax.block_until_ready``. With ``repeat=0``, ``best_s`` is the
    first call's time."""
    import jax

    if repeat < 0:
        raise ValueError(f"repeat must be at least 0, got {repeat}")
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, first, best if repeat else first


def timed_twice(fn, sync=None, cold: bool | None = None, name: str | None = None):
    """Run ``fn`` twice; ``(result, {"first_call_s", "steady_s"})``.

    With ``cold`` (default: :data:`COLD`), JAX's compilation caches and the
    trace results of :mod:`pleas_jax.tracing` are cleared first, so the first
    call pays tracing and compilation as in a fresh process even when an
    earlier stage compiled the same kernels.
    ``sync(result)`` returns what to wait for (default: the result itself).
    With ``name``, the two times go to stderr as they are measured (long runs
    show where they are).
    """
    import jax

    from pleas_jax import tracing

    sync = sync or (lambda r: r)
    if COLD if cold is None else cold:
        jax.clear_caches()
        tracing.clear()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(sync(out))
        times.append(time.perf_counter() - t0)
    if name:
        print(
            f"bench: {name}: first call {times[0]:.3f} s, steady {times[1]:.3f} s",
            file=sys.stderr,
            flush=True,
        )
    return out, {"first_call_s": times[0], "steady_s": times[1]}


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device, or None where the backend does
    not report it (CPU on some jax versions)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except (AttributeError, RuntimeError, NotImplementedError):
        # Backends without memory statistics: the figure is reported as None
        # (memory() gives the resident set beside it).
        return None
    peak = (stats or {}).get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def memory() -> dict:
    """Peak device memory where the backend reports it, and the process's peak
    resident set (on CPU the device memory is the process's)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    rss = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_device_bytes": peak_device_bytes(), "max_rss_bytes": int(rss)}
