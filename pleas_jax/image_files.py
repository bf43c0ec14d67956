"""Image files read on demand: the lazy arrays behind large ``folder:`` specs.

:func:`read_images` decodes files (RGB, resized, float32 in ``[0, 1]``) on a
few threads; :class:`LazyImages` stands for the array of a list of files and
decodes only what is indexed. :class:`DataError` is the error of every data
spec that cannot be read (:mod:`pleas_jax.data` re-exports it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data spec that cannot be read; the message says why."""


def read_image(path: Path, size: int) -> np.ndarray:
    """One image file as float32 ``[size, size, 3]`` in ``[0, 1]`` (RGB, bilinear)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            out = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    except Exception as e:  # PIL raises several kinds for a bad file
        raise DataError(f"cannot read image {path}: {e}") from None
    return out.astype(np.float32) / 255.0


def read_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """Image files as float32 ``[n, size, size, 3]``, decoded on a few threads
    (PIL releases the GIL while it decodes and resizes)."""
    if not paths:
        return np.zeros((0, size, size, 3), np.float32)
    workers = min(len(paths), os.cpu_count() or 1, 8)
    if workers == 1:
        return np.stack([read_image(p, size) for p in paths])
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(lambda p: read_image(p, size), paths)))


class LazyImages:
    """Images ``[N, S, S, 3]`` of a folder, read from their files when indexed.

    It stands for the float32 array of the (normalised) images wherever this
    package reads images: ``len(x)``, ``x.shape``, ``x[i]``, ``x[a:b]``,
    ``x[int array]`` and ``x[bool mask]`` return numpy arrays and decode only
    those images; ``np.asarray(x)`` decodes them all. :meth:`take` and
    :meth:`normalized` return lazy views.

    Args:
      files: the image files.
      size: side ``S`` the images are resized to.
      index: which of ``files``, in order (default: all).
      mean, std: ``[3]`` normalisation applied on reading, or ``None``.
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, files: Sequence[Path], size: int, *, index=None, mean=None, std=None):
        self._files = tuple(files)
        self._size = int(size)
        self._index = np.arange(len(self._files)) if index is None else np.asarray(index, np.int64)
        self._mean, self._std = mean, std

    def __len__(self) -> int:
        return len(self._index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._index), self._size, self._size, 3)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, normalised={self._mean is not None})"

    def take(self, key) -> LazyImages:
        """A lazy view of the images ``key`` selects (as ``x[key]`` would)."""
        return LazyImages(
            self._files, self._size, index=self._index[key], mean=self._mean, std=self._std
        )

    def normalized(self, mean, std) -> LazyImages:
        """A lazy view whose images come out as ``(x - mean) / std``; with
        ``None``, as read (in ``[0, 1]``)."""
        if mean is None or std is None:
            return LazyImages(self._files, self._size, index=self._index)
        return LazyImages(
            self._files,
            self._size,
            index=self._index,
            mean=np.asarray(mean, np.float32),
            std=np.asarray(std, np.float32),
        )

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            raise TypeError("LazyImages index the first axis only; take x[i] and index the array")
        if isinstance(key, int | np.integer):
            return self[np.asarray([key])][0]
        x = read_images([self._files[i] for i in self._index[key]], self._size)
        if self._mean is not None:
            x = ((x - self._mean) / self._std).astype(np.float32)
        return x

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)


# An image set as the library reads it: a float32 array [N, H, W, C], or lazy
# images that stand in for one (decoded when indexed).
Images = np.ndarray | LazyImages
