"""A checkpoint as a model you can run: reading it, its data, its predictions.

- :class:`Model`: module, variables, separate heads if any, and metadata,
  with how the model reads images (:attr:`Model.image_size`,
  :attr:`Model.normalization`, :attr:`Model.crop`).
- :func:`load_model`: a checkpoint as a :class:`Model`.
- :func:`dataset_for`: a data spec read the way a model was trained (same
  image size, input normalisation and crop).
- :func:`predict`, :func:`evaluate`, :func:`ensemble_logits`: logits and test
  accuracy of a model, of one of its heads, or of an ensemble.

Errors a user can fix raise :class:`RunError` with a message that names the
offending checkpoint or data spec. :mod:`pleas_jax.workflow` builds training
and merging on these and re-exports them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from pleas_jax import checkpoint
from pleas_jax import data as data_lib
from pleas_jax import heads as heads_lib
from pleas_jax import train as train_lib


class RunError(ValueError):
    """A workflow that cannot run as asked; the message says which input is wrong."""


@dataclasses.dataclass(frozen=True)
class Model:
    """A model read from a checkpoint (or held in memory).

    Attributes:
      module, variables: the Flax module and its ``{"params", "batch_stats"}``.
      heads: ``{"a": head, "b": head}`` for a merged backbone with separate
        label spaces (``module`` then returns pooled features), else ``None``.
      metadata: the checkpoint's metadata (``data``, ``classes``,
        ``image_size``, ``normalization``, ...); may be empty.
      name: where it came from, for messages.
    """

    module: Any
    variables: Mapping[str, Any]
    heads: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = "model"

    def _input(self, key: str, convention: int, default: Any) -> Any:
        # The checkpoint's record (None included), else torchvision's
        # convention for a converted checkpoint, else ``default``.
        if key in self.metadata:
            return self.metadata[key]
        if self.metadata.get("converted_from") == "torch":
            return input_convention(self.module)[convention]
        return default

    @property
    def image_size(self) -> int:
        """Image side the model reads: the checkpoint's ``image_size``, else
        :func:`input_convention`'s for a converted checkpoint, else 32."""
        return int(self._input("image_size", 0, data_lib.DEFAULT_SIZE))

    @property
    def normalization(self) -> tuple[list[float], list[float]] | None:
        """``(mean, std)`` per channel of its training inputs: the checkpoint's
        ``normalization`` (``None`` recorded: the data's own statistics), else
        :func:`input_convention`'s for a converted checkpoint, else ``None``."""
        norm = self._input("normalization", 1, None)
        return None if norm is None else (list(norm["mean"]), list(norm["std"]))

    @property
    def crop(self) -> float | None:
        """How images reach :attr:`image_size` for it (``crop`` of
        :func:`pleas_jax.data.load`): the checkpoint's ``crop``, else
        :func:`input_convention`'s for a converted checkpoint, else ``None``
        (resized whole, as ``pleas-jax train`` reads them)."""
        crop = self._input("crop", 2, None)
        return None if crop is None else float(crop)

    @property
    def channels(self) -> int:
        """Image channels the stem conv reads."""
        return int(self.variables["params"]["conv1"]["kernel"].shape[-2])


def input_convention(module) -> tuple[int, dict[str, list[float]] | None, float | None]:
    """How a torchvision-layout ResNet reads its inputs when its checkpoint does
    not say: ``(image_size, normalization, crop)``.

    An ImageNet stem (7x7/2 conv, max-pool) means torchvision's recipe: the
    central 224 px of images resized to 256 px, normalised with ImageNet's
    statistics (:data:`pleas_jax.data.IMAGENET_NORMALIZATION`,
    :data:`~pleas_jax.data.IMAGENET_CROP`). A CIFAR stem means 32 px images
    resized whole and no recorded statistics (``None``: each data spec's own).
    ``pleas-jax convert`` records these unless told otherwise; checkpoints
    converted before it did fall back to them.
    """
    if getattr(module, "stem", None) == "imagenet":
        return data_lib.IMAGENET_SIZE, data_lib.IMAGENET_NORMALIZATION, data_lib.IMAGENET_CROP
    return data_lib.DEFAULT_SIZE, None, None


def trained_classes(model: Model, head: str | None = None) -> tuple[int, ...] | None:
    """The original labels ``model`` (or its separate ``head``) was trained on,
    where its metadata records them."""
    if head is None:
        classes = model.metadata.get("classes")
    else:
        classes = (model.metadata.get("head_classes") or {}).get(head)
    return None if classes is None else tuple(classes)


def check_test_split(dataset: data_lib.Dataset) -> None:
    """Raise :class:`RunError` if ``dataset`` has no test images to score on."""
    if len(dataset.y_test) == 0:
        raise RunError(
            f"{dataset.name!r} has no test images (too few images per class for a "
            f"{data_lib.TEST_FRACTION:g} test fraction); nothing to score a model on"
        )


def load_model(path: str | os.PathLike) -> Model:
    """The checkpoint at ``path`` as a :class:`Model`."""
    module, variables = checkpoint.load(path)
    heads = checkpoint.load_heads(path)
    return Model(module, variables, heads, checkpoint.load_metadata(path), str(path))


# ``crop`` of dataset_for and merge_checkpoints: the model's own (Model.crop).
MODEL_CROP = "default"  # what the command line's --crop says when not given


def crop_for(model: Model, crop: float | str | None = MODEL_CROP) -> float | None:
    """``crop`` checked, with :data:`MODEL_CROP` read as the model's own (:attr:`Model.crop`).

    Raises:
      ValueError: anything but a fraction in ``(0, 1]``, ``None`` or :data:`MODEL_CROP`.
    """
    if isinstance(crop, str):
        if crop != MODEL_CROP:
            raise ValueError(f"crop must be a fraction in (0, 1], None or {MODEL_CROP!r}")
        return model.crop
    return data_lib.check_crop(crop)


def dataset_for(
    model: Model,
    spec: str,
    *,
    image_size: int | None = None,
    crop: float | str | None = MODEL_CROP,
) -> data_lib.Dataset:
    """``spec`` read at the model's image size with its training normalisation
    and its :attr:`Model.crop`; ``image_size`` and ``crop`` (a fraction, or
    ``None`` to resize whole images) override those.

    Raises:
      DataError: a bad spec.
      RunError: images whose channels the model cannot read.
      ValueError: a ``crop`` outside ``(0, 1]``.
    """
    dataset = data_lib.load(
        spec,
        image_size=image_size or model.image_size,
        normalization=model.normalization,
        crop=crop_for(model, crop),
    )
    channels = dataset.x_train.shape[-1]
    if channels != model.channels:
        raise RunError(
            f"{model.name} reads {model.channels}-channel images but {spec!r} has "
            f"{channels}-channel images"
        )
    return dataset


@functools.lru_cache(maxsize=64)
def _apply_fn(module):
    # One compiled function per module: models of equal widths (e.g. every
    # method at one budget) share it.
    return jax.jit(module.apply)


def _dense(module):
    # A merged layer's kernel is full-size with exact zeros in its forbidden
    # blocks, so the dense module computes the same function; on a CPU at
    # these widths one dense conv compiles and runs faster than the blocks.
    return module.clone(splits=()) if getattr(module, "splits", ()) else module


def predict(
    model: Model, x: data_lib.Images, *, head: str | None = None, batch_size: int = 250
) -> np.ndarray:
    """Logits ``[N, K]`` of images ``x [N, H, W, C]`` (an array or lazy images).

    Args:
      head: for a merged backbone with separate heads, which head (``"a"`` or
        ``"b"``) reads its features; must be ``None`` for a model with its own
        classifier.

    Raises:
      RunError: a missing or unexpected ``head``.
    """
    if model.heads is None and head is not None:
        raise RunError(
            f"{model.name} has a single classifier; --head applies only to a merge "
            "with separate heads"
        )
    if model.heads is not None and head not in model.heads:
        raise RunError(
            f"{model.name} is a merged backbone with separate heads "
            f"{sorted(model.heads)}; choose one with --head"
        )
    fn = _apply_fn(_dense(model.module))
    n = len(x)
    outs = []
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        # A short last batch is padded, so every batch reuses one compilation.
        pad = batch_size - len(xb) if n > batch_size else 0
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        out = np.asarray(fn(model.variables, xb))
        outs.append(out[: len(out) - pad])
    out = np.concatenate(outs)
    if head is not None and model.heads is not None:  # checked above: both or neither
        out = np.asarray(heads_lib.apply_head(model.heads[head], out))
    return out


def evaluate(
    model: Model,
    dataset: data_lib.Dataset,
    *,
    head: str | None = None,
    batch_size: int = 250,
    check_classes: bool = True,
) -> float:
    """Top-1 accuracy on ``dataset``'s test split (see :func:`predict` for ``head``).

    Args:
      check_classes: refuse a dataset whose classes (original labels, e.g.
        ``(5, ..., 9)`` for ``digits[5-9]``) differ from those the model (or
        ``head``) was trained on, where its metadata records them: a score of a
        0-4 model on digits 5-9 relabelled 0-4 would mean nothing. ``False``
        scores it anyway (data whose labels mean the same under other numbers).

    Raises:
      RunError: no test images; other classes than the model's (see
        ``check_classes``); the model (or head) predicts a different number
        of classes than the dataset has.
    """
    check_test_split(dataset)
    trained = trained_classes(model, head if model.heads is not None else None)
    if check_classes and trained is not None and trained != tuple(dataset.classes):
        which = model.name if head is None else f"{model.name} head {head!r}"
        raise RunError(
            f"{which} was trained on classes {_span(trained)} but {dataset.name!r} has "
            f"classes {_span(dataset.classes)}; read the same classes (a label subset such as "
            f"[0-4]), or pass --any-classes if these labels mean the same"
        )
    logits = predict(model, dataset.x_test, head=head, batch_size=batch_size)
    if logits.shape[-1] != dataset.num_classes:
        which = model.name if head is None else f"{model.name} head {head!r}"
        raise RunError(
            f"{which} predicts {logits.shape[-1]} classes but {dataset.name!r} has "
            f"{dataset.num_classes}"
        )
    return train_lib.accuracy(logits, dataset.y_test)


def _span(classes: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 4]`` as ``0-4``; other lists as they are (at most 8 shown)."""
    c = list(classes)
    if len(c) > 2 and c == list(range(c[0], c[0] + len(c))):
        return f"{c[0]}-{c[-1]}"
    return str(c if len(c) <= 8 else [*c[:8], "..."])


def ensemble_logits(models_: Sequence[Model], x: data_lib.Images) -> np.ndarray:
    """The ensemble's logits: the mean of the models' logits (what a merge at
    budget 2 reproduces)."""
    return np.mean([predict(m, x) for m in models_], axis=0)
