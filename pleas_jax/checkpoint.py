"""Save and load a model (module + variables) as an orbax checkpoint with metadata.

A checkpoint is a directory::

    OUT/
      pleas_jax.json   what the arrays are: format, pleas-jax version, arch name,
                       the module config (ResNet.config()), num_classes, and any
                       caller metadata (e.g. the source file's sha256)
      arrays/          the variables pytree, written by orbax (and, for a merged
                       backbone with separate label spaces, its heads)

A merged model with separate heads is a backbone (``num_classes=None``) plus
named heads ``{"a": {"kernel": [C, K_a], "bias": [K_a]}, "b": ...}``: pass them
as ``save(..., heads=...)`` and read them back with :func:`load_heads`.

It is written whole or not at all: everything goes to a temporary directory
beside ``OUT`` that is renamed into place at the end and removed on any failure.

Example::

    save("ckpt/resnet50", module, variables, source_sha256="...")
    module, variables = load("ckpt/resnet50")
    load_metadata("ckpt/resnet50")["arch"]      # "resnet50"

    save("ckpt/merged", backbone, variables, heads={"a": head_a, "b": head_b})
    load_heads("ckpt/merged")["a"]["kernel"].shape    # (C, K_a)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pleas_jax import models
from pleas_jax.tree import flatten, path_str, to_dict

FORMAT = "pleas-jax checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "pleas_jax.json"
ARRAYS_DIR = "arrays"
HEADS = "heads"  # the arrays' collection (and metadata field) holding separate heads
_RESERVED = (
    "format",
    "format_version",
    "pleas_jax_version",
    "arch",
    "config",
    "num_classes",
    HEADS,
)
# Shapes are traced at this input size; parameters do not depend on it.
_TRACE_SIZE = 64
_STEM_KERNEL = ("params", "conv1", "kernel")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the path."""


def _expected_shapes(
    module: models.ResNet, channels: int = 3
) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    x = jax.ShapeDtypeStruct((1, _TRACE_SIZE, _TRACE_SIZE, channels), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return {p: (tuple(s.shape), s.dtype) for p, s in flatten(to_dict(shapes)).items()}


def _input_channels(got: Mapping[tuple[str, ...], Any]) -> int:
    # The config does not record the image channels (3 for RGB, 1 for MNIST);
    # the stem kernel [k, k, C_in, C_out] fixes them.
    stem = got.get(_STEM_KERNEL)
    return int(stem.shape[-2]) if stem is not None and len(stem.shape) == 4 else 3


def _check_arrays(where: str, module: models.ResNet, got: Mapping[tuple[str, ...], Any]) -> None:
    # ``got`` maps paths to anything with .shape; dtypes are checked too, since a
    # float64 leaf would silently change the model's numerics.
    want = _expected_shapes(module, _input_channels(got))
    missing = [p for p in want if p not in got]
    if missing:
        raise CheckpointError(
            f"{where}: arrays lack {path_str(missing[0])!r} ({len(missing)} missing) "
            "that the model config needs"
        )
    extra = [p for p in got if p not in want]
    if extra:
        raise CheckpointError(
            f"{where}: array {path_str(extra[0])!r} ({len(extra)} unexpected) "
            "is not part of the model config"
        )
    for p, (shape, dtype) in want.items():
        if tuple(got[p].shape) != shape:
            raise CheckpointError(
                f"{where}: {path_str(p)!r} has shape {tuple(got[p].shape)} but the model "
                f"config implies {shape}"
            )
        if np.dtype(got[p].dtype) != np.dtype(dtype):
            raise CheckpointError(
                f"{where}: {path_str(p)!r} has dtype {np.dtype(got[p].dtype)}, expected {dtype}"
            )


def _check_heads(where: str, module: models.ResNet, got: Mapping[tuple[str, ...], Any]) -> None:
    # ``got`` maps (head name, "kernel" | "bias") to anything with .shape and .dtype.
    if module.num_classes is not None:
        raise CheckpointError(
            f"{where}: separate heads need a backbone (num_classes=None), but the model "
            f"has its own classifier of {module.num_classes} classes"
        )
    features = module.stream_widths[-1]
    names = sorted({p[0] for p in got})
    if not names:
        raise CheckpointError(f"{where}: heads is empty; pass heads=None for no heads")
    for name in names:
        if sorted(p[1:] for p in got if p[0] == name) != [("bias",), ("kernel",)]:
            raise CheckpointError(f"{where}: head {name!r} must hold exactly 'kernel' and 'bias'")
        kernel, bias = got[(name, "kernel")], got[(name, "bias")]
        k = tuple(kernel.shape)
        if len(k) != 2 or k[0] != features or tuple(bias.shape) != k[1:]:
            raise CheckpointError(
                f"{where}: head {name!r} has kernel {k} and bias {tuple(bias.shape)}; the "
                f"backbone gives {features} features, so expected ({features}, K) and (K,)"
            )
        for leaf, arr in (("kernel", kernel), ("bias", bias)):
            if np.dtype(arr.dtype) != np.float32:
                raise CheckpointError(
                    f"{where}: head {name!r} {leaf} has dtype {np.dtype(arr.dtype)}, expected float32"
                )


def _split_heads(flat: Mapping[tuple[str, ...], Any]) -> tuple[dict, dict]:
    """``(variables' leaves, heads' leaves)`` of a flattened arrays tree."""
    body = {p: v for p, v in flat.items() if p[0] != HEADS}
    heads = {p[1:]: v for p, v in flat.items() if p[0] == HEADS}
    return body, heads


def _write_metadata(file: Path, text: str) -> None:
    # Written after the arrays: a directory with metadata is a finished checkpoint.
    file.write_text(text + "\n")


def save(
    path: str | os.PathLike,
    module: models.ResNet,
    variables: Mapping[str, Any],
    *,
    heads: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    **metadata: Any,
) -> Path:
    """Write ``module`` and ``variables`` to the checkpoint directory ``path``.

    Args:
      path: the checkpoint directory to create; missing parent directories
        are created (and removed again if the save fails).
      module: a :class:`pleas_jax.models.ResNet` (its ``config()`` is stored).
      variables: ``{"params": ..., "batch_stats": ...}`` matching ``module``.
      heads: for a backbone (``module.num_classes is None``), named classifier
        heads ``{name: {"kernel": [C, K], "bias": [K]}}`` over its pooled
        features ``[N, C]`` (a merge with separate label spaces); read back with
        :func:`load_heads`.
      overwrite: replace an existing checkpoint at ``path`` (else it is an
        error); any other existing file or directory is never replaced.
      **metadata: extra JSON-able fields stored in ``pleas_jax.json`` (e.g.
        ``source_sha256``); the names in ``_RESERVED`` are taken.

    Returns:
      ``path`` as a :class:`~pathlib.Path`.

    Raises:
      CheckpointError: ``path`` exists, a parent is a file, variables (or
        heads) that do not match the module, or metadata that is not JSON-able.
    """
    path = Path(path)
    taken = [k for k in metadata if k in _RESERVED]
    if taken:
        raise CheckpointError(f"metadata field {taken[0]!r} is reserved")
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
        # Never delete a directory that is not a checkpoint of ours.
        try:
            load_metadata(path)
        except CheckpointError:
            raise CheckpointError(
                f"{path}: exists and is not a pleas-jax checkpoint; refusing to overwrite it"
            ) from None
    check_parent(path)
    from pleas_jax import __version__  # here: pleas_jax/__init__ imports this module

    head_arrays = None
    if heads is not None:
        head_arrays = jax.tree.map(lambda x: np.array(jax.device_get(x)), to_dict(heads))
        _check_heads(str(path), module, flatten(head_arrays))
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pleas_jax_version": __version__,
        "arch": models.arch_name(module),
        "num_classes": module.num_classes,
        "config": module.config(),
        **metadata,
    }
    if head_arrays is not None:
        info[HEADS] = {n: int(h["kernel"].shape[1]) for n, h in head_arrays.items()}
    try:
        text = json.dumps(info, indent=2, sort_keys=False)
    except TypeError as e:
        raise CheckpointError(f"metadata is not JSON-able: {e}") from None

    # orbax rejects numpy scalars; 0-d arrays are fine. Host copies also free the
    # write from any device placement.
    arrays = jax.tree.map(lambda x: np.array(jax.device_get(x)), to_dict(variables))
    _check_arrays(str(path), module, flatten(arrays))
    if head_arrays is not None:
        arrays = {**arrays, HEADS: head_arrays}

    made = _make_parents(path.parent)
    try:
        # orbax wants absolute paths.
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name[:100]}.tmp-", dir=path.parent))
        tmp = tmp.absolute()
    except BaseException:
        _remove_empty(made)
        raise
    # mkdtemp makes the directory private (0700); the checkpoint should get the
    # mode a plain mkdir would, so that others sharing the machine can read it.
    tmp.chmod(0o777 & ~_umask())
    try:
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        checkpointer.save(tmp / ARRAYS_DIR, args=ocp.args.StandardSave(arrays))
        _write_metadata(tmp / METADATA_FILE, text)
        if path.exists():
            _replace(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    return path


def check_parent(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path``'s parent is a directory or
    can be made one (:func:`save` creates missing parents, as ``mkdir -p``)."""
    path = Path(path)
    up = path.parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise CheckpointError(f"{path}: {up} is not a directory")


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; the ones made, outermost first."""
    missing = []
    up = parent
    while not up.exists():
        missing.append(up)
        up = up.parent
    missing.reverse()
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


def _remove_empty(made: list[Path]) -> None:
    # A failed save leaves nothing behind, not even the folders it made.
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(new: Path, path: Path) -> None:
    # os.replace cannot replace a non-empty directory: move the old checkpoint
    # aside, move the new one in, and only then delete the old one (or move it
    # back if the second rename fails).
    old = Path(tempfile.mkdtemp(prefix=f".{path.name[:100]}.old-", dir=path.parent))
    os.replace(path, old / "ckpt")
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old / "ckpt", path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict of the checkpoint at ``path`` (no arrays are read).

    Raises:
      CheckpointError: ``path`` is missing, not a directory, or not a pleas-jax checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        hint = (
            f" (a PyTorch file: convert it first, pleas-jax convert {path} DIR)"
            if path.suffix in (".pth", ".pt", ".safetensors")
            else ""
        )
        raise CheckpointError(
            f"{path}: not a directory; a pleas-jax checkpoint is a directory{hint}"
        )
    meta_file = path / METADATA_FILE
    if not meta_file.is_file() or not (path / ARRAYS_DIR).is_dir():
        raise CheckpointError(
            f"{path}: not a pleas-jax checkpoint (no {METADATA_FILE} and {ARRAYS_DIR}/ inside)"
        )
    try:
        info = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: not pleas-jax checkpoint metadata")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {info['format_version']} is newer than this pleas-jax "
            f"reads ({FORMAT_VERSION}); upgrade pleas-jax"
        )
    return info


def load(path: str | os.PathLike) -> tuple[models.ResNet, dict]:
    """Read a checkpoint written by :func:`save`.

    Returns:
      ``(module, variables)``: the module rebuilt from its config and
      ``{"params": ..., "batch_stats": ...}`` as jax arrays (any separate heads
      are left out: see :func:`load_heads`).

    Raises:
      CheckpointError: missing directory, not our checkpoint, or arrays whose
        paths/shapes/dtypes do not match the stored module config.
    """
    module, variables, _ = _restore(path)
    return module, variables


def load_heads(path: str | os.PathLike) -> dict[str, dict[str, jax.Array]] | None:
    """The separate heads of the checkpoint at ``path``, or ``None`` if it has none.

    Returns:
      ``{name: {"kernel": [C, K], "bias": [K]}}`` as jax arrays, reading the
      backbone's pooled features ``[N, C]``
      (:func:`pleas_jax.heads.apply_head`).

    Raises:
      CheckpointError: as for :func:`load`.
    """
    return _restore(path)[2]


def _restore(path: str | os.PathLike) -> tuple[models.ResNet, dict, dict | None]:
    path = Path(path)
    info = load_metadata(path)
    try:
        module = models.from_config(info["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config in {METADATA_FILE}: {e}") from None
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        stored = checkpointer.metadata((path / ARRAYS_DIR).absolute()).item_metadata.tree
    except Exception as e:
        raise CheckpointError(
            f"{path}: unreadable {ARRAYS_DIR}/ ({type(e).__name__}: {e})"
        ) from None
    # Check against the config before reading any array data.
    body, head_leaves = _split_heads(flatten(to_dict(stored)))
    _check_arrays(str(path), module, body)
    if (HEADS in info) != bool(head_leaves):
        raise CheckpointError(
            f"{path}: {METADATA_FILE} and {ARRAYS_DIR}/ disagree on whether there are heads"
        )
    if head_leaves:
        _check_heads(str(path), module, head_leaves)
    arrays = jax.tree.map(
        jnp.asarray, to_dict(checkpointer.restore((path / ARRAYS_DIR).absolute()))
    )
    heads = arrays.pop(HEADS, None)
    return module, arrays, heads
