"""Images read on demand: the lazy arrays behind large ``folder:`` and ``tfds:`` specs.

:func:`read_images` decodes files (RGB, squashed or resized and centre-cropped
by :func:`fit`, float32 in ``[0, 1]``) on a few threads; :class:`LazyImages`
stands for the array of a list of files (or of any :class:`ImageReader`, such
as a tfds split) and decodes only what is indexed. :class:`DataError` is the error of every data spec that cannot be
read (:mod:`pleas_jax.data` re-exports it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class DataError(ValueError):
    """A data spec that cannot be read; the message says why."""


def check_crop(crop: float | None) -> float | None:
    """``crop`` as a float in ``(0, 1]``, or ``None`` (squash).

    Raises:
      ValueError: anything else.
    """
    if crop is None:
        return None
    if isinstance(crop, bool) or not isinstance(crop, int | float) or not 0 < crop <= 1:
        raise ValueError(f"crop must be a fraction in (0, 1] or None, got {crop!r}")
    return float(crop)


def crop_box(height: int, width: int, size: int, crop: float) -> tuple[int, int, int, int]:
    """Where torchvision's eval transform puts an ``height x width`` image:
    ``Resize(int(size / crop))`` (shorter side, aspect kept) then
    ``CenterCrop(size)``. Returns ``(resized height, resized width, top, left)``
    of the ``size x size`` window (``crop=0.875``, ``size=224``: 256 then 224)."""
    short = int(size / crop + 1e-9)
    if height <= width:
        h, w = short, int(short * width / height)
    else:
        h, w = int(short * height / width), short
    return h, w, int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def fit(im, size: int, crop: float | None = None):
    """A PIL image at ``size x size``: squashed (``crop=None``), or resized
    and centre-cropped as torchvision evaluates ImageNet models
    (:func:`crop_box`; bilinear, as ``transforms.Resize`` on PIL images)."""
    from PIL import Image

    if crop is None:
        return im.resize((size, size), Image.Resampling.BILINEAR)
    h, w, top, left = crop_box(im.height, im.width, size, crop)
    if (h, w) != (im.height, im.width):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    return im.crop((left, top, left + size, top + size))


def as_mode(im, mode: str):
    """A PIL image converted to ``mode`` (``"RGB"`` or ``"L"``). 16-bit
    grayscale images (PIL modes ``I;16*`` and ``I``) are scaled to 8 bits first:
    PIL's own conversion clips them, so mid-grey would read as white."""
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im, np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8))
    return im.convert(mode)


def read_image(path: Path, size: int, crop: float | None = None) -> np.ndarray:
    """One image file as float32 ``[size, size, 3]`` in ``[0, 1]`` (RGB; :func:`fit`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            out = np.asarray(fit(as_mode(im, "RGB"), size, crop))
    except Exception as e:  # PIL raises several kinds for a bad file
        raise DataError(f"cannot read image {path}: {e}") from None
    return out.astype(np.float32) / 255.0


def decode_on_threads(decode: Callable[[Any], np.ndarray], items: Sequence) -> np.ndarray:
    """``np.stack([decode(item) for item in items])`` on up to 8 threads (PIL
    releases the GIL while it decodes and resizes)."""
    workers = min(len(items), os.cpu_count() or 1, 8)
    if workers == 1:
        return np.stack([decode(item) for item in items])
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(decode, items)))


def read_images(paths: Sequence[Path], size: int, crop: float | None = None) -> np.ndarray:
    """Image files as float32 ``[n, size, size, 3]``, decoded on a few threads."""
    if not paths:
        return np.zeros((0, size, size, 3), np.float32)
    return decode_on_threads(lambda p: read_image(p, size, crop), paths)


@runtime_checkable
class ImageReader(Protocol):
    """Where :class:`LazyImages` reads from: ``len(reader)`` images of
    ``reader.channels`` channels; ``reader.read(indices, size)`` decodes
    those, float32 ``[n, size, size, channels]`` in ``[0, 1]``."""

    channels: int

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int], size: int) -> np.ndarray: ...


class ImageFiles:
    """An :class:`ImageReader` over image files (decoded as RGB, :func:`fit` with ``crop``)."""

    channels = 3

    def __init__(self, files: Sequence[Path], crop: float | None = None):
        self.files = tuple(files)
        self.crop = check_crop(crop)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: Sequence[int], size: int) -> np.ndarray:
        """Files ``indices`` as float32 ``[n, size, size, 3]`` in ``[0, 1]``."""
        return read_images([self.files[i] for i in indices], size, self.crop)


class LazyImages:
    """Images ``[N, S, S, C]`` read from their files (or records) when indexed.

    It stands for the float32 array of the (normalised) images wherever this
    package reads images: ``len(x)``, ``x.shape``, ``x[i]``, ``x[a:b]``,
    ``x[int array]`` and ``x[bool mask]`` return numpy arrays and decode only
    those images; ``np.asarray(x)`` decodes them all. :meth:`take` and
    :meth:`normalized` return lazy views.

    Args:
      files: the image files (``C = 3``), or an :class:`ImageReader`.
      size: side ``S`` the images are resized to.
      index: which of ``files``, in order (default: all).
      mean, std: ``[C]`` normalisation applied on reading, or ``None``.
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(
        self, files: Sequence[Path] | ImageReader, size: int, *, index=None, mean=None, std=None
    ):
        self._reader = files if isinstance(files, ImageReader) else ImageFiles(files)
        self._size = int(size)
        self._index = np.arange(len(self._reader)) if index is None else np.asarray(index, np.int64)
        self._mean, self._std = mean, std

    def __len__(self) -> int:
        return len(self._index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self._index), self._size, self._size, self._reader.channels)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, normalised={self._mean is not None})"

    def take(self, key) -> LazyImages:
        """A lazy view of the images ``key`` selects (as ``x[key]`` would)."""
        return LazyImages(
            self._reader, self._size, index=self._index[key], mean=self._mean, std=self._std
        )

    def normalized(self, mean, std) -> LazyImages:
        """A lazy view whose images come out as ``(x - mean) / std``; with
        ``None``, as read (in ``[0, 1]``)."""
        if mean is None or std is None:
            return LazyImages(self._reader, self._size, index=self._index)
        return LazyImages(
            self._reader,
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
        x = self._reader.read(self._index[key], self._size)
        if self._mean is not None:
            x = ((x - self._mean) / self._std).astype(np.float32)
        return x

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)


# An image set as the library reads it: a float32 array [N, H, W, C], or lazy
# images that stand in for one (decoded when indexed).
Images = np.ndarray | LazyImages
