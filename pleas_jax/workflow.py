"""Checkpoint-level workflows: what the ``pleas-jax`` commands and the demo do.

- :func:`train_checkpoint`: train a source model on a data spec and save it
  with its recipe (data, image size, normalisation, seed, test accuracy).
- :func:`merge_batches`: the training images a merge sees.
- :func:`merge_checkpoints`: merge two checkpoints into a new one (written
  whole or not at all) and report what the merge did.
- Reading and scoring checkpoints (:class:`Model`, :func:`load_model`,
  :func:`dataset_for`, :func:`predict`, :func:`evaluate`) lives in
  :mod:`pleas_jax.scoring`; they are re-exported here.

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

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pleas_jax import checkpoint, models
from pleas_jax import data as data_lib
from pleas_jax import train as train_lib
from pleas_jax.merge import merge
from pleas_jax.scoring import (
    MODEL_CROP,
    Model,
    RunError,
    check_test_split,
    crop_for,
    dataset_for,
    ensemble_logits,
    evaluate,
    input_convention,
    load_model,
    predict,
    trained_classes,
)

__all__ = [
    "HEADS_CHOICES",
    "MODEL_CROP",
    "Model",
    "RunError",
    "check_pair",
    "crop_for",
    "dataset_for",
    "ensemble_logits",
    "evaluate",
    "heads_mode",
    "input_convention",
    "jsonable",
    "load_model",
    "merge_batches",
    "merge_checkpoints",
    "predict",
    "train_checkpoint",
    "write_json",
]

_log = logging.getLogger(__name__)

HEADS_CHOICES = ("auto", "shared", "separate")


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
    try:
        checkpoint.check_parent(out)  # missing parents are created when it is saved
    except checkpoint.CheckpointError as e:
        raise RunError(str(e)) from None


def _check_json_out(path: str | os.PathLike, overwrite: bool = False) -> None:
    """A JSON file can be written at ``path`` (checked before slow work)."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path}: is a directory; name the JSON file to write")
    if path.exists() and not overwrite:
        raise RunError(f"{path}: already exists (pass --overwrite to replace it)")
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
    check_test_split(dataset)
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
# ------------------------------------------------------------------- merging
def merge_batches(
    dataset: data_lib.Dataset, images: int | None, batch_size: int, *, seed: int = 0
) -> list[np.ndarray]:
    """The first ``images`` of a seeded shuffle of the training split, as batches
    ``[batch_size, H, W, C]`` (the last may be smaller). Shuffled because bundled
    sets are often sorted by class. Asking for more images than the split
    holds logs a warning and uses them all."""
    if images is not None and images < 1:
        raise RunError(f"--images must be positive, got {images}")
    if images is not None and images > len(dataset.x_train):
        _log.warning(
            "%r has %d training images, fewer than the %d asked for; the merge uses all of them",
            dataset.name,
            len(dataset.x_train),
            images,
        )
    return list(
        data_lib.batches(dataset.x_train, None, batch_size, shuffle=True, seed=seed, limit=images)
    )


def check_pair(a: Model, b: Model, *, image_size: int | None = None) -> None:
    """Raise :class:`RunError` unless ``a`` and ``b`` can be merged: the same
    architecture and widths, the same input channels, and the same image size
    unless ``image_size`` overrides both. Logs a warning where they read images
    differently (:attr:`Model.crop`, :attr:`Model.normalization`): a merge reads
    its data as ``a`` does, so ``b`` then sees inputs unlike its training's."""
    for m in (a, b):
        if m.heads is not None:
            raise RunError(f"{m.name} is already a merge with separate heads; merge source models")
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
    if a.crop != b.crop:
        _log.warning(
            "%s reads images %s but %s %s; the merge reads them as %s does",
            a.name,
            _reading(a),
            b.name,
            _reading(b),
            a.name,
        )
    if not _same_normalization(a.normalization, b.normalization):
        _log.warning(
            "%s and %s were trained on differently normalised inputs (%s vs %s); the "
            "merge normalises its data as %s does",
            a.name,
            b.name,
            _norm_text(a.normalization),
            _norm_text(b.normalization),
            a.name,
        )


def _reading(m: Model) -> str:
    return "resized whole" if m.crop is None else f"centre-cropped ({m.crop:g})"


def _same_normalization(na, nb) -> bool:
    # Statistics recomputed on the same data differ in the last digits only.
    if na is None or nb is None:
        return na is nb
    return all(
        len(x) == len(y) and np.allclose(x, y, rtol=1e-3, atol=1e-4)
        for x, y in zip(na, nb, strict=True)
    )


def _norm_text(norm) -> str:
    if norm is None:
        return "each data set's own statistics"
    mean, std = (", ".join(f"{v:.3g}" for v in x) for x in norm)
    return f"mean [{mean}], std [{std}]"


def heads_mode(a: Model, b: Model, heads: str = "auto") -> str:
    """``"shared"`` or ``"separate"``; ``"auto"`` picks separate heads when the
    checkpoints were trained on different classes (or class counts)."""
    if heads not in HEADS_CHOICES:
        raise RunError(f"heads must be one of {HEADS_CHOICES}, got {heads!r}")
    if heads != "auto":
        return heads
    same = a.module.num_classes == b.module.num_classes and trained_classes(a) == trained_classes(b)
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
    Nothing is written unless the merge completes; ``report`` (a JSON file;
    an existing one only with ``overwrite``) is written just before the
    checkpoint, and removed again if the checkpoint cannot be saved.

    Returns:
      the merge report (JSON-able).

    Raises:
      RunError, DataError, CheckpointError: bad paths, data, or a pair that
        cannot be merged; all before any slow work.
    """
    out = Path(out)
    _check_out(out, overwrite)
    if report is not None:
        _check_json_out(report, overwrite)
    if not 1.0 <= budget <= 2.0 or math.isnan(budget):
        raise RunError(f"budget must lie in [1, 2] (compute relative to one model), got {budget}")
    model_a, model_b = load_model(a), load_model(b)
    check_pair(model_a, model_b, image_size=image_size)
    mode = heads_mode(model_a, model_b, heads)
    if mode == "shared" and heads_mode(model_a, model_b) != "shared":
        ka, kb = (trained_classes(m) or m.module.num_classes for m in (model_a, model_b))
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
    # The images the merge saw, next to what it did with them.
    rep = {"images": sum(len(x) for x in batches), **jsonable(result.report)}
    source = lambda m: {  # noqa: E731
        "path": m.name,
        **{k: m.metadata[k] for k in ("data", "classes", "test_accuracy") if k in m.metadata},
    }
    info = {
        "merged_from": {"a": source(model_a), "b": source(model_b)},
        "data": data,
        "images": rep["images"],
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
    classes_a = trained_classes(model_a)
    if mode == "shared" and classes_a is not None:
        info["classes"] = list(classes_a)
    if mode == "separate":
        info["head_classes"] = {"a": trained_classes(model_a), "b": trained_classes(model_b)}
    # The report first: a checkpoint without its report would block the rerun
    # ("already exists"); a new report whose checkpoint fails is removed.
    fresh_report = report is not None and not Path(report).exists()
    if report is not None:
        write_json(report, rep)
    try:
        checkpoint.save(
            out, result.module, result.variables, heads=result.heads, overwrite=overwrite, **info
        )
    except BaseException:
        if fresh_report:
            Path(report).unlink(missing_ok=True)  # type: ignore[arg-type]
        raise
    return rep
