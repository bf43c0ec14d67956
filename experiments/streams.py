"""Datasets read split by split in chunks, so the paper's data never has to fit in memory.

``pleas_jax.data.load`` reads a whole data spec into float32 arrays: fine for the
fine-grained sets at small sizes, impossible for DomainNet at 224 px (its four
domains hold 586k images, ~350 GB as float32). :class:`Images` reads a spec
lazily instead:

- ``tfds:NAME[/CONFIG]`` (no label subset) is read with ``tfds.data_source``
  by index (:class:`pleas_jax.tfds_images.TfdsImages`): a merge's sample reads
  only the sampled images, an evaluation streams the split in chunks. Images
  are decoded on a few threads and resized with PIL (bilinear), and
  labels keep the dataset's own ids, so a model sees its whole label space even
  where a chunk lacks some classes. ``tfds:NAME:SPLIT`` serves that one split
  (as merge data, e.g. ``--matching-data tfds:imagenet_v2:test``).
- any other spec (``folder:``, ``npz:``, label subsets) is read with
  :func:`pleas_jax.data.load` and then served the same way (a large folder
  lazily, image by image as indexed; others whole, once).

Images come out raw, ``[N, S, S, C]`` float32 in ``[0, 1]``; each model
normalises them its own way with :func:`prepare`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from experiments.release import ExperimentError

if TYPE_CHECKING:
    from pleas_jax import workflow as wf

CHUNK = 500  # images per chunk: 300 MB of float32 at 224 px


class Images:
    """One data spec's ``train`` and ``test`` splits at ``image_size``, read lazily.

    Args:
      spec: a pleas-jax data spec.
      image_size: side ``S`` of the square images served.
      data_dir: tfds data directory.
      num_classes: the label space of the model reading it; labels must lie in
        ``[0, num_classes)`` (a non-tfds spec that relabels the classes it holds is
        mapped back when they are a subset of that range).
      crop: how images reach ``image_size`` (:attr:`pleas_jax.workflow.Model.crop`:
        ``None`` resizes them whole; the release's models, 0.875: the central
        224 px of images resized to 256 px, as they were evaluated).
    """

    def __init__(
        self,
        spec: str,
        image_size: int,
        data_dir: str | None = None,
        num_classes: int | None = None,
        crop: float | None = None,
    ):
        from pleas_jax import data

        self.spec, self.image_size, self.data_dir = spec, int(image_size), data_dir
        self.crop = data.check_crop(crop)
        self.num_classes = num_classes
        base, subset = data.parse_subset(spec)
        rest = base[5:] if base.startswith("tfds:") else None
        self._tfds_name = rest if rest and subset is None and ":" not in rest else None
        # ``tfds:NAME:SPLIT`` streams SPLIT when sampled (see :func:`sample_spec`).
        self._split = None
        if rest and subset is None and rest.count(":") == 1:
            self._tfds_name, self._split = rest.split(":")
        self._sources: dict[str, Any] = {}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    # ------------------------------------------------------------ sources
    def _tfds(self, split: str):
        if split not in self._sources:
            from pleas_jax.image_files import DataError
            from pleas_jax.tfds_images import TfdsImages

            name = self._tfds_name
            assert name is not None  # only tfds specs reach here
            try:
                self._sources[split] = TfdsImages.open(
                    name, split, self.data_dir, self.crop, where="--data-dir (or TFDS_DATA_DIR)"
                )
            except DataError as e:
                raise ExperimentError(str(e)) from None
        return self._sources[split]

    def _loaded(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            from pleas_jax import data

            try:
                ds = data.load(
                    self.spec, image_size=self.image_size, data_dir=self.data_dir, crop=self.crop
                )
            except data.DataError as e:
                raise ExperimentError(str(e)) from None
            classes = np.asarray(ds.classes)
            if self.num_classes is not None and ds.num_classes != self.num_classes:
                # The spec relabelled the classes it holds 0..n-1: back to their ids.
                if ds.num_classes > self.num_classes or classes.max() >= self.num_classes:
                    raise ExperimentError(
                        f"{self.spec!r} has {ds.num_classes} classes (labels "
                        f"{int(classes.min())}..{int(classes.max())}) but the model predicts "
                        f"{self.num_classes}"
                    )
                relabel = classes
            else:
                relabel = np.arange(ds.num_classes)

            # Undo the spec's own normalisation: each model applies its own. A
            # large folder stays lazy (read by index, as tfds sources are).
            def raw(x):
                if isinstance(x, data.LazyImages):
                    return x.normalized(None, None)
                return (x * ds.std + ds.mean).astype(np.float32)

            self._arrays = {
                "train": (raw(ds.x_train), relabel[ds.y_train].astype(np.int32)),
                "test": (raw(ds.x_test), relabel[ds.y_test].astype(np.int32)),
            }
        return self._arrays

    # ------------------------------------------------------------- access
    def size(self, split: str) -> int:
        """Number of examples in ``split`` (``"train"`` or ``"test"``; for a
        ``tfds:NAME:SPLIT`` spec, SPLIT whatever is asked)."""
        if self._tfds_name is None:
            return len(self._loaded()[split][1])
        return len(self._tfds(self._split or split))

    def read(
        self, split: str, indices: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[n, S, S, C]`` in ``[0, 1]`` and labels ``[n]`` of ``split``.

        Raises:
          ExperimentError: labels outside ``[0, num_classes)``.
        """
        rows = np.asarray(indices, np.int64)
        if self._tfds_name is None:
            x, y = self._loaded()[split]
            return x[rows], y[rows]
        # Records read in one call, images decoded on a few threads.
        x, y = self._tfds(self._split or split).labeled(rows, self.image_size)
        if self.num_classes is not None and len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ExperimentError(
                f"{self.spec!r} has label {int(y.max())} but the model predicts "
                f"{self.num_classes} classes"
            )
        return x, y

    def sample(self, split: str, n: int, seed: int) -> np.ndarray:
        """``n`` images of ``split`` (all if it has fewer), a seeded random choice."""
        size = self.size(split)
        order = np.random.default_rng(seed).permutation(size)[:n]
        return self.read(split, order)[0]

    def chunks(self, split: str, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The whole split in order, as ``(images [<=chunk, S, S, C], labels)``.

        Raises:
          ExperimentError: a ``tfds:NAME:SPLIT`` spec, which has one split only
            (fit for ``--matching-data``, not for a task's training and test data).
        """
        if self._split is not None:
            raise ExperimentError(
                f"{self.spec!r} names one split; a task needs its train and test splits "
                f"(use tfds:{self._tfds_name})"
            )
        size = self.size(split)
        for start in range(0, size, chunk):
            yield self.read(split, range(start, min(start + chunk, size)))


# ----------------------------------------------------------------- models
def with_normalization(model: wf.Model, reference: np.ndarray) -> wf.Model:
    """``model``, with the per-channel statistics of ``reference`` images
    ``[N, S, S, C]`` as its input normalisation when its checkpoint records none."""
    if model.normalization is not None:
        return model
    mean = reference.mean(axis=(0, 1, 2))
    std = reference.std(axis=(0, 1, 2)) + 1e-6
    meta = {**model.metadata, "normalization": {"mean": mean.tolist(), "std": std.tolist()}}
    return dataclasses.replace(model, metadata=meta)


def prepare(model: wf.Model, x: np.ndarray) -> np.ndarray:
    """Raw images ``[N, S, S, C]`` in ``[0, 1]`` normalised as ``model`` expects.

    Raises:
      ExperimentError: a model without normalisation (see :func:`with_normalization`)
        or images with other channels than the model reads.
    """
    if x.shape[-1] != model.channels:
        raise ExperimentError(
            f"{model.name} reads {model.channels}-channel images but the data has {x.shape[-1]}"
        )
    if model.normalization is None:
        raise ExperimentError(f"{model.name}: no input normalisation recorded")
    mean, std = (np.asarray(v, np.float32) for v in model.normalization)
    return ((x - mean) / std).astype(np.float32)


def collect(
    images: Images,
    split: str,
    fns: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    chunk: int = CHUNK,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Stream ``split`` once through every function of ``fns`` (raw images ``[b, S,
    S, C]`` -> outputs ``[b, ...]``, e.g. logits or features).

    Returns:
      ``({name: outputs [N, ...]}, labels [N])``.
    """
    outs: dict[str, list] = {k: [] for k in fns}
    labels = []
    for x, y in images.chunks(split, chunk):
        for k, fn in fns.items():
            outs[k].append(np.asarray(fn(x)))
        labels.append(y)
    if not labels:
        raise ExperimentError(f"{images.spec!r} split {split!r} is empty")
    return {k: np.concatenate(v) for k, v in outs.items()}, np.concatenate(labels)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits [N, K]`` against ``labels [N]``."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


class Sampled(Protocol):
    """What :func:`merge_sample` draws from (:class:`Images`, or anything with its ``sample``)."""

    def sample(self, split: str, n: int, seed: int) -> np.ndarray: ...


def merge_sample(sets: Sequence[Sampled], images: int, seed: int) -> np.ndarray:
    """``images`` raw training images drawn evenly from ``sets`` (a seeded sample
    of each), interleaved by a seeded shuffle so that every batch mixes the tasks."""
    share = [images // len(sets) + (i < images % len(sets)) for i in range(len(sets))]
    parts = [
        s.sample("train", k, seed + i) for i, (s, k) in enumerate(zip(sets, share, strict=True))
    ]
    x = np.concatenate(parts)
    return x[np.random.default_rng(seed).permutation(len(x))]


def to_batches(x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``x [N, ...]`` as consecutive batches ``[batch_size, ...]`` (the last may be smaller)."""
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
