"""The user's cache directory, and arrays kept there under a content key.

Some inputs are slow to derive and never change while their source does not:
the labels of a 1.28M-record tfds split take a minute or more to read. They
are stored here as ``.npy`` files named by a hash of everything they were
derived from (paths, sizes and modification times of the source files), so a
changed source misses the cache instead of reading stale values. The cache is
best effort: a directory that cannot be written costs a warning, never a
failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def root() -> Path:
    """``$PLEAS_JAX_CACHE``, else ``$XDG_CACHE_HOME/pleas-jax``, else ``~/.cache/pleas-jax``."""
    if os.environ.get("PLEAS_JAX_CACHE"):
        return Path(os.environ["PLEAS_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pleas-jax"


def file_stamps(paths: list[Path]) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of each path, in name order: what a key should hold
    so that rewriting any of the files changes it."""
    out = []
    for p in sorted(paths, key=lambda p: p.name):
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def key(parts: Any) -> str:
    """A stable hash of JSON-able ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def path(kind: str, parts: Any, base: Path | None = None) -> Path:
    """Where the array for ``parts`` lives: ``BASE/KIND/HASH.npy``."""
    return (base if base is not None else root()) / kind / f"{key(parts)}.npy"


def load(kind: str, parts: Any, base: Path | None = None) -> np.ndarray | None:
    """The array stored for ``parts``, or ``None`` when there is none or it cannot be read."""
    p = path(kind, parts, base)
    try:
        return np.load(p, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable cache file %s (%s)", p, e)
        return None


def store(kind: str, parts: Any, array: np.ndarray, base: Path | None = None) -> Path | None:
    """Write ``array`` for ``parts`` atomically (temp file, then rename).

    Returns the path, or ``None`` (with a warning) when the cache cannot be written.
    """
    p = path(kind, parts, base)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.tmp-", suffix=".npy", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(array), allow_pickle=False)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("cannot write cache file %s (%s); set PLEAS_JAX_CACHE to a writable dir", p, e)
        return None
    return p
