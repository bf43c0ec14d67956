"""The source models: finding them in the release's tree, and loading them.

Checkpoints follow the PyTorch release's tree (``experiments/download_checkpoints.sh``
fetches it)::

    ROOT/{model_type}/{dataset}/{variant}/              fine-grained sets
    ROOT/{model_type}/domainnet/{domain}/{variant}/     DomainNet

with ``model_type`` in rn18, rn50, rn101 and ``variant`` in v1a, v1b, v2a, v2b. A
variant directory is used, in this order, as: a pleas-jax checkpoint itself (what
``pleas-jax convert-tree SRC DST`` writes into ``DST``); ``{variant}/pleas_jax/``, a
checkpoint converted beside the release's file; or ``{variant}/model.pth``, converted
on the fly into ``{variant}/pleas_jax/`` (needs torch and ``converters``).

A loaded source model carries in its metadata how to read its inputs
(:func:`load_source`); :func:`model_type` names its architecture for the run's
record; :func:`features_model` is its backbone alone, for probes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.release import (
    DOMAINNET,
    DOMAINS,
    ENV_CHECKPOINTS,
    IMAGENET_NORMALIZATION,
    MODEL_TYPES,
    RELEASE_CROP,
    RELEASE_IMAGE_SIZE,
    ExperimentError,
    _pleas,
)

if TYPE_CHECKING:
    from pleas_jax import workflow as wf


# ------------------------------------------------------------ checkpoints
def checkpoints_root(given: str | None) -> Path:
    """``--checkpoints``, else ``$MODEL_CHECKPOINTS_DIR``.

    Raises:
      ExperimentError: neither is set, or the directory does not exist.
    """
    root = given or os.environ.get(ENV_CHECKPOINTS)
    if not root:
        raise ExperimentError(
            f"no checkpoint tree: pass --checkpoints DIR or set {ENV_CHECKPOINTS} (get the "
            "paper's with experiments/download_checkpoints.sh, or pass --a/--b checkpoints "
            "made by `pleas-jax train` or `pleas-jax convert`)"
        )
    path = Path(root)
    if not path.is_dir():
        raise ExperimentError(
            f"{path}: no such checkpoint tree (download it with "
            "experiments/download_checkpoints.sh, or convert one with `pleas-jax convert-tree`)"
        )
    return path


def release_dir(root: Path, model_type: str, dataset: str, variant: str) -> Path:
    """``root/{model_type}/{dataset}/{variant}``; DomainNet domains are
    ``domainnet/{domain}``."""
    sub = f"{DOMAINNET}/{dataset}" if dataset in DOMAINS else dataset
    return root / model_type / sub / variant


def _is_checkpoint(path: Path) -> bool:
    checkpoint = _pleas()[0]
    return (path / checkpoint.METADATA_FILE).is_file() and (path / checkpoint.ARRAYS_DIR).is_dir()


def resolve_checkpoint(
    root: Path,
    model_type: str,
    dataset: str,
    variant: str,
    *,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """The pleas-jax checkpoint of one model of the release's tree, converting
    ``model.pth`` on the fly when no converted checkpoint exists.

    Raises:
      ExperimentError: nothing usable in the variant directory, or a failed conversion.
    """
    where = release_dir(root, model_type, dataset, variant)
    for candidate in (where, where / "pleas_jax"):
        if _is_checkpoint(candidate):
            return candidate
    pth = where / "model.pth"
    if not pth.is_file():
        raise ExperimentError(
            f"{where}: no checkpoint (neither a pleas-jax checkpoint nor model.pth); download "
            "the paper's with experiments/download_checkpoints.sh, or write one there with "
            "`pleas-jax convert` or `pleas-jax train`"
        )
    try:
        from converters.tree import convert_checkpoint
    except ImportError as e:
        raise ExperimentError(
            f"{pth}: converting the release's torch checkpoint needs PyTorch and "
            f"converters.tree ({e}); install pleas-jax[torch], or convert the tree first with "
            "`pleas-jax convert-tree`"
        ) from None
    log(f"converting {pth} -> {where / 'pleas_jax'}")
    try:
        convert_checkpoint(pth, where / "pleas_jax", verify=True)
    except Exception as e:  # ConversionError and torch's own errors alike
        raise ExperimentError(f"{pth}: conversion failed: {e}") from None
    return where / "pleas_jax"


def load_source(path: str | os.PathLike, image_size: int | None = None) -> wf.Model:
    """A source checkpoint as a :class:`pleas_jax.workflow.Model` whose metadata
    says how to read its inputs.

    The release's models were trained on ImageNet-normalised 224 px images
    and evaluated on the central 224 px of images resized to 256 px; a
    conversion that does not record its inputs (one made before ``pleas-jax
    convert`` recorded them) gets those filled in, whatever its stem.
    ``image_size`` overrides the checkpoint's.

    Raises:
      ExperimentError: not a checkpoint (with how to get one).
    """
    checkpoint, _, wf = _pleas()
    try:
        model = wf.load_model(path)
    except checkpoint.CheckpointError as e:
        raise ExperimentError(
            f"{e}; make one with `pleas-jax train` or `pleas-jax convert`, or download the "
            "paper's with experiments/download_checkpoints.sh"
        ) from None
    meta = dict(model.metadata)
    converted = meta.get("converted_from") == "torch"
    if "normalization" not in meta and converted:
        meta["normalization"] = IMAGENET_NORMALIZATION
    if "crop" not in meta and converted:
        meta["crop"] = RELEASE_CROP
    if image_size is not None:
        meta["image_size"] = int(image_size)
    elif "image_size" not in meta and converted:
        meta["image_size"] = RELEASE_IMAGE_SIZE
    if model.module.num_classes is None:
        raise ExperimentError(
            f"{path}: a backbone without classifier; experiments merge "
            "source models with their heads"
        )
    return dataclasses.replace(model, metadata=meta)


def source_paths(args, dataset_a: str, dataset_b: str, log=lambda s: None) -> tuple[Path, Path]:
    """Checkpoint paths of models A and B: ``--a/--b``, else the tree."""
    if args.a is not None:
        return Path(args.a), Path(args.b)
    root = checkpoints_root(args.checkpoints)
    va, vb = args.variants
    return (
        resolve_checkpoint(root, args.model_type, dataset_a, va, log=log),
        resolve_checkpoint(root, args.model_type, dataset_b, vb, log=log),
    )


def model_type(model: wf.Model) -> str:
    """The architecture a run records and the report tabulates by: the release's
    name of it (``rn18``, ``rn50``, ``rn101``), else pleas-jax's (``resnet20``,
    ``resnet34``, ...), else ``custom`` (a structure no preset has).

    Read from the model, not from ``--model-type``: checkpoints given with
    ``--a/--b``, or a user's in the tree's ``rn18/``, need not be ResNet-18s.
    """
    from pleas_jax import models

    arch = models.arch_name(model.module)
    release = {name: short for short, name in MODEL_TYPES.items()}
    return release.get(arch, arch) if arch is not None else "custom"


def features_model(model: wf.Model) -> wf.Model:
    """A source model without its classifier: it returns pooled features ``[N, C]``."""
    params = {k: v for k, v in model.variables["params"].items() if k != "fc"}
    return dataclasses.replace(
        model,
        module=model.module.clone(num_classes=None),
        variables={**model.variables, "params": params},
    )
