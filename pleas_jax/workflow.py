"""Checkpoint-level workflows: what the ``pleas-jax`` commands and the demo do.

- :func:`train_checkpoint`: train a source model on a data spec and save it
  with its recipe (data, image size, normalisation, seed, test accuracy).
- :func:`load_model`: a checkpoint as a :class:`Model` (module, variables,
  separate heads if any, metadata).
- :func:`dataset_for`: a data spec read the way a model was trained (same
  image size and input normalisation).
- :func:`merge_batches`: the training images a merge sees.
- :func:`predict`, :func:`evaluate`: logits and test accuracy of a model or of
  one of its heads.
- :func:`merge_checkpoints`: merge two checkpoints into a new one (written
  whole or not at all) and report what the merge did.

Errors a user can fix raise :class:`RunError` (or
:class:`pleas_jax.data.DataError`, :class:`pleas_jax.checkpoint.CheckpointError`)
with a message that names the offending path or spec.

Example::

    train_checkpoint("ckpt/a", data="mnist5k[0-4]", width=16, epochs=8, seed=0)
    train_checkpoint("ckpt/b", data="mnist5k[5-9]", width=16, epochs=8, seed=1)
    merge_checkpoints("ckpt/a", "ckpt/b", "ckpt/ab", data="mnist5k", budget=1.5)
    model = load_model("ckpt/ab")
    evaluate(model, dataset_for(model, "mnist5k[0-4]"), head="a")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pleas_jax import checkpoint, models
from pleas_jax import data as data_lib
from pleas_jax import heads as heads_lib
from pleas_jax import train as train_lib
from pleas_jax.merge import merge

_log = logging.getLogger(__name__)

HEADS_CHOICES = ("auto", "shared", "separate")


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


# ------------------------------------------------------------------ helpers
def _check_out(out: Path, overwrite: bool) -> None:
    # Checked before any slow work, so a typo costs nothing.
    if out.exists() and not overwrite:
        raise RunError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists():
        # checkpoint.save refuses this too, but only after the training or merge.
        try:
            checkpoint.load_metadata(out)
        except checkpoint.CheckpointError:
            raise RunError(
                f"{out}: exists and is not a pleas-jax checkpoint; refusing to replace it"
            ) from None
    if not out.parent.is_dir():
        raise RunError(f"{out}: parent directory {out.parent} does not exist")


def _check_json_out(path: str | os.PathLike) -> None:
    """A JSON file can be written at ``path`` (checked before slow work)."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path}: is a directory; name the JSON file to write")
    if not path.parent.is_dir():
        raise RunError(f"{path}: parent directory {path.parent} does not exist")


def jsonable(x):
    """``x`` with numpy/jax scalars and arrays as plain Python (for JSON)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically (temp file, then rename)."""
    path = Path(path)
    text = json.dumps(jsonable(value), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.tmp-", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it a plain open's mode.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _classes(model: Model, head: str | None = None) -> tuple[int, ...] | None:
    """The original labels ``model`` (or its separate ``head``) was trained on,
    where its metadata records them."""
    if head is None:
        classes = model.metadata.get("classes")
    else:
        classes = (model.metadata.get("head_classes") or {}).get(head)
    return None if classes is None else tuple(classes)


def _check_test_split(dataset: data_lib.Dataset) -> None:
    if len(dataset.y_test) == 0:
        raise RunError(
            f"{dataset.name!r} has no test images (too few images per class for a "
            f"{data_lib.TEST_FRACTION:g} test fraction); nothing to score a model on"
        )


# ------------------------------------------------------------------ training
def train_checkpoint(
    out: str | os.PathLike,
    *,
    data: str,
    arch: str = "resnet20",
    width: int | None = None,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 0.05,
    weight_decay: float = 5e-4,
    augment: bool = False,
    image_size: int = data_lib.DEFAULT_SIZE,
    overwrite: bool = False,
    progress: bool = False,
    **metadata: Any,
) -> dict[str, Any]:
    """Train ``arch`` on ``data``'s training split and save it to ``out``.

    The checkpoint's metadata records the data spec, its classes, the image
    size and input normalisation, the training recipe and the test accuracy,
    plus any extra ``metadata`` (e.g. the command that ran it).

    Returns:
      the metadata written (``test_accuracy`` included).

    Raises:
      RunError: ``out`` exists (without ``overwrite``) or its parent does not.
      DataError: a bad data spec.
      ValueError: an unknown architecture.
    """
    out = Path(out)
    _check_out(out, overwrite)
    dataset = data_lib.load(data, image_size=image_size)
    _check_test_split(dataset)
    module = models.resnet(arch, num_classes=dataset.num_classes, width=width)
    recipe = {
        "arch": arch,
        "width": module.stem_width,
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "augment": augment,
    }
    variables = train_lib.train(
        module,
        dataset,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        augment=augment,
        seed=seed,
        progress=progress,
    )
    model = Model(module, variables, name=str(out))
    info = {
        "data": data,
        "classes": list(dataset.classes),
        "image_size": image_size,
        "normalization": {"mean": dataset.mean.tolist(), "std": dataset.std.tolist()},
        "training": recipe,
        "test_accuracy": evaluate(model, dataset),
        "test_examples": len(dataset.y_test),
        **metadata,
    }
    checkpoint.save(out, module, variables, overwrite=overwrite, **info)
    return info


# --------------------------------------------------------------- evaluation
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
    _check_test_split(dataset)
    trained = _classes(model, head if model.heads is not None else None)
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


# ------------------------------------------------------------------- merging
def merge_batches(
    dataset: data_lib.Dataset, images: int | None, batch_size: int, *, seed: int = 0
) -> list[np.ndarray]:
    """The first ``images`` of a seeded shuffle of the training split, as batches
    ``[batch_size, H, W, C]`` (the last may be smaller). Shuffled because bundled
    sets are often sorted by class."""
    if images is not None and images < 1:
        raise RunError(f"--images must be positive, got {images}")
    return list(
        data_lib.batches(dataset.x_train, None, batch_size, shuffle=True, seed=seed, limit=images)
    )


def check_pair(a: Model, b: Model, *, image_size: int | None = None) -> None:
    """Raise :class:`RunError` unless ``a`` and ``b`` can be merged: the same
    architecture and widths, the same input channels, and the same image size
    unless ``image_size`` overrides both. Logs a warning where they read images
    differently (:attr:`Model.crop`): a merge reads its data as ``a`` does."""
    ca, cb = dict(a.module.config()), dict(b.module.config())
    for c in (ca, cb):
        c.pop("num_classes")
    for key in ca:
        if ca[key] != cb.get(key):
            raise RunError(
                f"cannot merge {a.name} and {b.name}: different architectures or widths "
                f"({key} is {ca[key]} in A but {cb.get(key)} in B)"
            )
    if a.channels != b.channels:
        raise RunError(
            f"cannot merge {a.name} and {b.name}: {a.channels}- and {b.channels}-channel inputs"
        )
    if image_size is None and a.image_size != b.image_size:
        raise RunError(
            f"cannot merge {a.name} and {b.name}: trained on {a.image_size}px and "
            f"{b.image_size}px images"
        )
    for m in (a, b):
        if m.heads is not None:
            raise RunError(f"{m.name} is already a merge with separate heads; merge source models")
    if a.crop != b.crop:
        _log.warning(
            "%s reads images %s but %s %s; the merge reads them as %s does",
            a.name,
            _reading(a),
            b.name,
            _reading(b),
            a.name,
        )


def _reading(m: Model) -> str:
    return "resized whole" if m.crop is None else f"centre-cropped ({m.crop:g})"


def heads_mode(a: Model, b: Model, heads: str = "auto") -> str:
    """``"shared"`` or ``"separate"``; ``"auto"`` picks separate heads when the
    checkpoints were trained on different classes (or class counts)."""
    if heads not in HEADS_CHOICES:
        raise RunError(f"heads must be one of {HEADS_CHOICES}, got {heads!r}")
    if heads != "auto":
        return heads
    same = a.module.num_classes == b.module.num_classes and _classes(a) == _classes(b)
    return "shared" if same else "separate"


def merge_checkpoints(
    a: str | os.PathLike,
    b: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str,
    budget: float,
    matching: str = "activation",
    ratios: str = "uniform",
    unit_multiple: int | None = None,
    least_squares: str | None = "closed_form",
    heads: str = "auto",
    images: int | None = 1000,
    batch_size: int = 250,
    image_size: int | None = None,
    crop: float | str | None = MODEL_CROP,
    gd_steps: int = 400,
    matching_dtype: str | None = None,
    matching_precision: str = "highest",
    ls_precision: str = "highest",
    report: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **metadata: Any,
) -> dict[str, Any]:
    """Merge checkpoints ``a`` and ``b`` with :func:`pleas_jax.merge` into ``out``.

    The merge sees ``images`` training images of ``data`` (a seeded shuffle),
    read at A's image size (or ``image_size``) with A's input normalisation
    and crop (or ``crop``; :attr:`Model.image_size`, :attr:`Model.normalization`,
    :attr:`Model.crop`), which the merged checkpoint records. ``out`` holds the
    merged model (a backbone plus heads ``"a"``/``"b"`` for separate label
    spaces) and metadata: the sources, data, settings and the merge report.
    Nothing is written unless the merge completes; ``report`` (a JSON file)
    is written just before the checkpoint.

    Returns:
      the merge report (JSON-able).

    Raises:
      RunError, DataError, CheckpointError: bad paths, data, or a pair that
        cannot be merged; all before any slow work.
    """
    out = Path(out)
    _check_out(out, overwrite)
    if report is not None:
        _check_json_out(report)
    if not 1.0 <= budget <= 2.0 or math.isnan(budget):
        raise RunError(f"budget must lie in [1, 2] (compute relative to one model), got {budget}")
    model_a, model_b = load_model(a), load_model(b)
    check_pair(model_a, model_b, image_size=image_size)
    mode = heads_mode(model_a, model_b, heads)
    if mode == "shared" and heads_mode(model_a, model_b) != "shared":
        ka, kb = (_classes(m) or m.module.num_classes for m in (model_a, model_b))
        raise RunError(
            f"a shared head needs the same classes, but {a} was trained on {ka} and {b} on "
            f"{kb}; use --heads separate"
        )
    crop = crop_for(model_a, crop)
    dataset = dataset_for(model_a, data, image_size=image_size, crop=crop)
    batches = merge_batches(dataset, images, batch_size)
    result = merge(
        (model_a.module, model_a.variables),
        (model_b.module, model_b.variables),
        batches,
        float(budget),
        matching=matching,
        ratios=ratios,
        unit_multiple=unit_multiple,
        least_squares=least_squares,
        heads=mode,
        gd_steps=gd_steps,
        matching_dtype=matching_dtype,
        matching_precision=matching_precision,
        ls_precision=ls_precision,
        progress=progress,
    )
    rep = jsonable(result.report)
    source = lambda m: {  # noqa: E731
        "path": m.name,
        **{k: m.metadata[k] for k in ("data", "classes", "test_accuracy") if k in m.metadata},
    }
    info = {
        "merged_from": {"a": source(model_a), "b": source(model_b)},
        "data": data,
        "images": sum(len(x) for x in batches),
        "image_size": image_size or model_a.image_size,
        "merge": {
            "budget": float(budget),
            "matching": matching,
            "ratios": ratios,
            "unit_multiple": unit_multiple,
            "least_squares": least_squares,
            "heads": mode,
            "gd_steps": gd_steps,
            "matching_dtype": matching_dtype,
            "matching_precision": matching_precision,
            "ls_precision": ls_precision,
        },
        "report": rep,
        **metadata,
    }
    if model_a.normalization is not None:
        mean, std = model_a.normalization
        info["normalization"] = {"mean": mean, "std": std}
    # Every later use of the merged model reads images as the merge did.
    info["crop"] = crop
    classes_a = _classes(model_a)
    if mode == "shared" and classes_a is not None:
        info["classes"] = list(classes_a)
    if mode == "separate":
        info["head_classes"] = {"a": _classes(model_a), "b": _classes(model_b)}
    # The report first: a checkpoint without its report would block the rerun
    # ("already exists"); a report without its checkpoint is overwritten by it.
    if report is not None:
        write_json(report, rep)
    checkpoint.save(
        out, result.module, result.variables, heads=result.heads, overwrite=overwrite, **info
    )
    return rep


def ensemble_logits(models_: Sequence[Model], x: data_lib.Images) -> np.ndarray:
    """The ensemble's logits: the mean of the models' logits (what a merge at
    budget 2 reproduces)."""
    return np.mean([predict(m, x) for m in models_], axis=0)
