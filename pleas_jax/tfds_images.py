"""TensorFlow Datasets splits read with ``tfds.data_source``: labels now, images when indexed.

``tfds.data_source`` gives random access to a prepared dataset's
``array_record`` files without TensorFlow. :class:`TfdsImages` reads a split's
records with the image feature left encoded (``tfds.decode.SkipDecoding``) and
decodes only the examples that are indexed, with PIL on a few threads, so a
merge on ImageNet decodes its 1,000 images, not the 1.28M of the split.
:class:`~pleas_jax.image_files.LazyImages` stands for the split's image
array over it. tensorflow-datasets is imported here only, when a ``tfds:``
spec is read.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pleas_jax import user_cache
from pleas_jax.image_files import DataError, as_mode, check_crop, decode_on_threads, fit

# Records are read (and labels collected) this many at a time.
CHUNK = 1024
# Reading the labels of a split larger than this shows a progress bar.
PROGRESS_RECORDS = 100_000
# The labels of a split this large (over a second to read) are kept in the
# user's cache (pleas_jax.user_cache), keyed by the split's files.
CACHE_RECORDS = 20_000


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "tfds: sources need tensorflow-datasets: pip install 'pleas-jax[tfds]'"
        ) from None
    return tfds


def open_split(
    name: str, split: str, data_dir: str | None, where: str = "TFDS_DATA_DIR (or data_dir)"
) -> Any:
    """``tfds.data_source`` of one split with its ``image`` feature left encoded.

    ``where`` names, in the error for a missing dataset, how the caller is told
    the data directory.

    Raises:
      DataError: the dataset or split is not prepared under ``data_dir`` (no
        download is attempted), or it lacks an ``image`` or ``label`` feature.
    """
    tfds = _tfds()

    def source(decoders):
        return tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, decoders=decoders
        )

    try:
        plain = source(None)
        features = plain.dataset_info.features
        missing = [k for k in ("image", "label") if k not in features]
        if missing:
            raise DataError(
                f"tfds dataset {name!r} has no {missing[0]!r} feature (it has "
                f"{sorted(features)}); tfds: specs read an 'image' and a 'label'"
            )
        # An Image feature stores PNG/JPEG bytes; skipping its decoding lets
        # labels be read without decoding any image.
        if isinstance(features["image"], tfds.features.Image):
            return source({"image": tfds.decode.SkipDecoding()})
        return plain
    except DataError:
        raise
    except Exception as e:  # tfds raises many kinds for a missing or unreadable dataset
        raise open_error(name, split, e, where) from None


def open_error(
    name: str, split: str, error: Exception, where: str = "TFDS_DATA_DIR (or data_dir)"
) -> DataError:
    """The error for a dataset ``tfds.data_source`` could not open: what to run.

    ``where`` names how the caller is told the data directory.
    """
    first = str(error).splitlines()[0] if str(error) else ""
    if "TFRECORD" in first.upper():
        # tfds build writes TFRecord files by default; only array_record files
        # can be read by index.
        return DataError(
            f"tfds dataset {name!r} is stored as TFRecord files, which tfds.data_source "
            "cannot read by index; convert it with `tfds convert_format "
            "--dataset_version_dir=DIR --out_file_format=array_record` or rebuild it "
            f"with `tfds build {name} --file_format=array_record`"
        )
    return DataError(
        f"cannot open tfds dataset {name!r} split {split!r} ({type(error).__name__}: {first}); "
        f"prepare it with `tfds build {name} --file_format=array_record` and point "
        f"{where} at the directory that holds it"
    )


def decode_image(value, channels: int, size: int, crop: float | None = None) -> np.ndarray:
    """An encoded image (bytes) or a decoded ``[H, W(, C)]`` uint8 array as
    float32 ``[size, size, channels]`` in ``[0, 1]`` (PIL; squashed, or
    resized and centre-cropped: :func:`~pleas_jax.image_files.fit`)."""
    from PIL import Image

    im: Image.Image
    if isinstance(value, bytes):
        im = Image.open(io.BytesIO(value))
        im.load()
    else:
        a = np.asarray(value, np.uint8)
        im = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
    im = as_mode(im, "L" if channels == 1 else "RGB")
    # PIL, not jax.image.resize: a dataset has an image size per example, and
    # a jitted resize would compile once per size.
    out = np.asarray(fit(im, size, crop), np.float32) / 255.0
    return out[..., None] if out.ndim == 2 else out


class TfdsImages:
    """The images of one tfds split, for :class:`~pleas_jax.image_files.LazyImages`.

    Args:
      source: from :func:`open_split`.
      channels: 1 (grayscale) or 3 (RGB): what every image is converted to.
      crop: ``None`` squashes every image to the requested size; a fraction
        resizes and centre-crops (:func:`~pleas_jax.image_files.fit`).
    """

    def __init__(self, source: Any, channels: int, crop: float | None = None):
        self.source = source
        self.channels = int(channels)
        self.crop = check_crop(crop)

    @classmethod
    def open(
        cls,
        name: str,
        split: str,
        data_dir: str | None,
        crop: float | None = None,
        where: str = "TFDS_DATA_DIR (or data_dir)",
    ) -> TfdsImages:
        """A split of a prepared dataset (:func:`open_split`, with ``where``);
        grayscale where its image feature is declared ``[H, W, 1]``, else RGB."""
        source = open_split(name, split, data_dir, where)
        shape = tuple(getattr(source.dataset_info.features["image"], "shape", None) or ())
        return cls(source, 1 if shape[-1:] == (1,) and len(shape) == 3 else 3, crop)

    def held_out_split(self) -> str:
        """The dataset's held-out split: ``test``, else ``validation`` (ImageNet's).

        Raises:
          DataError: it has neither.
        """
        info = self.source.dataset_info
        for s in ("test", "validation"):
            if s in info.splits:
                return s
        raise DataError(
            f"tfds dataset {info.name!r} has no test or validation split (it has "
            f"{sorted(info.splits)}); name the split to read, tfds:{info.name}:SPLIT"
        )

    def __len__(self) -> int:
        return len(self.source)

    def _records(self, indices: Sequence[int]) -> list:
        out: list = []
        for lo in range(0, len(indices), CHUNK):
            out += self.source.__getitems__([int(i) for i in indices[lo : lo + CHUNK]])
        return out

    def labels(self) -> np.ndarray:
        """Every example's label, ``[N]`` int32 (reads each record, decodes no image).

        A split of more than :data:`PROGRESS_RECORDS` records shows a progress
        bar: ImageNet's 1.28M take a minute or more. A split of at least
        :data:`CACHE_RECORDS` is read once: its labels are kept in the user's
        cache (:func:`pleas_jax.user_cache.root`) under a key of the dataset's
        directory, split and files (names, sizes, modification times), so a
        rebuilt dataset is read again.
        """
        n = len(self)
        stamp = self._cache_key() if n >= CACHE_RECORDS else None
        if stamp is not None:
            cached = user_cache.load("tfds-labels", stamp)
            if cached is not None and cached.shape == (n,) and cached.dtype == np.int32:
                return cached
        out = self._read_labels()
        if stamp is not None:
            user_cache.store("tfds-labels", stamp, out)
        return out

    def _cache_key(self) -> dict | None:
        """What the labels are derived from, or ``None`` when the files cannot be listed."""
        info = self.source.dataset_info
        try:
            where = Path(str(info.data_dir)).resolve()
            files = [p for p in where.iterdir() if ".array_record" in p.name]
            files.append(where / "dataset_info.json")
            return {
                "dir": str(where),
                "split": str(self.source.split),
                "records": len(self),
                "files": user_cache.file_stamps(files),
            }
        except OSError:  # a remote or unusual data_dir: read the labels every time
            return None

    def _read_labels(self) -> np.ndarray:
        from tqdm.auto import tqdm

        n = len(self)
        out = np.empty(n, np.int32)
        name = f"{self.source.dataset_info.name}:{self.source.split}"
        with tqdm(
            total=n, desc=f"labels of {name}", unit="record", disable=n <= PROGRESS_RECORDS
        ) as bar:
            for lo in range(0, n, CHUNK):
                chunk = self._records(range(lo, min(lo + CHUNK, n)))
                out[lo : lo + len(chunk)] = [int(ex["label"]) for ex in chunk]
                bar.update(len(chunk))
        return out

    def read(self, indices: Sequence[int], size: int) -> np.ndarray:
        """Examples ``indices`` as float32 ``[n, size, size, channels]`` in ``[0, 1]``."""
        return self.labeled(indices, size)[0]

    def labeled(self, indices: Sequence[int], size: int) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``indices``: images as :meth:`read` gives them, and labels ``[n]`` int32."""
        if len(indices) == 0:
            return np.zeros((0, size, size, self.channels), np.float32), np.zeros(0, np.int32)
        examples = self._records(list(indices))
        labels = np.asarray([int(ex["label"]) for ex in examples], np.int32)

        def one(i):
            try:
                return decode_image(examples[i]["image"], self.channels, size, self.crop)
            except Exception as e:  # PIL raises several kinds for bad bytes
                raise DataError(
                    f"cannot decode example {int(indices[i])} of {self.source!r}: {e}"
                ) from None

        return decode_on_threads(one, range(len(examples))), labels
