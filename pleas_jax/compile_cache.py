"""JAX's on-disk compilation cache, set up for merges.

A merge compiles a handful of large programs (both source models' forward
passes fused with the sums of every layer) and many small ones, and a fresh
process compiles them all again. With the cache on, a later process that
merges models of the same shapes loads them from disk instead. On this
project's 2-core CPU, a resnet20 merge (width 16, 32 px, 256 images, budget
1.5) took 30.0 s in a fresh process and 13.6 s in the next one.

The cache holds executable code: keep it in a directory only you can write
(JAX's own warning). JAX reads the directory from ``JAX_COMPILATION_CACHE_DIR``
too; :func:`enable` also stores the programs that compile in under a second,
which JAX skips by default and which a merge has many of.

    from pleas_jax import compile_cache
    compile_cache.enable("~/.cache/pleas-jax/xla")   # before any JAX work
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable(directory: str | os.PathLike) -> Path:
    """Keep every compiled program in ``directory`` (created if missing).

    Best called before the process compiles anything. Called again (or after
    JAX set a cache up at its first compilation), the cache moves to
    ``directory`` from then on.

    Args:
      directory: where the cache lives; ``~`` is expanded.

    Returns:
      the directory, absolute.

    Raises:
      ValueError: ``directory`` exists and is not a directory, or cannot be
        created or written (JAX would warn once per program it compiles).
    """
    import tempfile

    from jax.experimental.compilation_cache import compilation_cache

    path = Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"compilation cache {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Creating (and at once deleting) a file is the check that JAX could write.
        tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-").close()
    except OSError as e:
        raise ValueError(
            f"compilation cache {path}: cannot create or write it ({e.strerror or e})"
        ) from e
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # JAX reads the directory once, when it first sets its cache up; a reset
    # makes the next compilation set it up again, here.
    compilation_cache.reset_cache()
    return path
