"""Convert the PLeaS release's tree of PyTorch checkpoints into a tree of orbax checkpoints.

The paper's checkpoints (``experiments/download_checkpoints.py`` fetches them) lie as::

    SRC/{model_type}/{dataset}/{variant}/model.pth             {'model': state_dict}
    SRC/{model_type}/domainnet/{domain}/{variant}/model.pth    a plain state_dict

with ``model_type`` in rn18, rn50, rn101 and ``variant`` in v1a, v1b, v2a, v2b.
:func:`convert_tree` mirrors that tree: the checkpoint converted from
``SRC/<rel>/model.pth`` is the orbax checkpoint directory ``DST/<rel>/`` (holding
``pleas_jax.json`` and ``arrays/``), e.g. ``SRC/rn18/cub/v1a/model.pth`` ->
``DST/rn18/cub/v1a/``. Every ``model.pth`` under ``SRC`` is converted, in sorted
order, whatever its depth; where the first directory is a known model type the
architecture read off the tensors must agree with it.

A checkpoint is skipped when ``DST/<rel>/`` already is a complete checkpoint whose
metadata records the source file's SHA-256 (what ``pleas-jax convert`` records
too), so an interrupted or repeated run only converts what is missing. Each
conversion runs torch and Flax on one random batch and refuses to write when the
logits differ; checkpoints are written whole or not at all
(:func:`pleas_jax.checkpoint.save`). A bad file is reported in its row and the
rest of the tree is still converted.

Example::

    rows = convert_tree("pretrained_models", "pretrained_flax")
    print(format_summary(rows))
    module, variables = pleas_jax.load("pretrained_flax/rn50/cub/v1a")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.torch_to_flax import (
    ConversionError,
    convert_file,
    sha256_file,
)
from converters.torch_to_flax import (
    verify as verify_logits,
)
from pleas_jax import checkpoint, models, workflow

SOURCE_NAME = "model.pth"
MODEL_TYPES = {"rn18": "resnet18", "rn50": "resnet50", "rn101": "resnet101"}
VARIANTS = ("v1a", "v1b", "v2a", "v2b")
DOMAINNET = "domainnet"
# Relative to the largest |logit|, as `pleas-jax convert --verify` defaults to.
TOLERANCE = 1e-4
STATUSES = ("converted", "skipped", "failed")


def find_checkpoints(src: str | os.PathLike) -> list[Path]:
    """Every ``model.pth`` under ``src``, as paths relative to it, sorted.

    Hidden directories (names starting with ``.``) are not entered; symbolic
    links to directories are (trees are often linked onto data disks), each
    real directory once.

    Raises:
      ConversionError: ``src`` is missing or not a directory.
    """
    src = Path(src)
    if not src.is_dir():
        what = "no such directory" if not src.exists() else "not a directory"
        raise ConversionError(f"{src}: {what}; expected the release's checkpoint tree")
    found = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link cycle, or a second link to one directory
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if SOURCE_NAME in files:
            found.append((Path(root) / SOURCE_NAME).relative_to(src))
    return sorted(found)


def describe_path(rel: str | os.PathLike) -> dict[str, str]:
    """What a path of the release layout says about its model.

    ``rn18/cub/v1a/model.pth`` -> ``{"model_type": "rn18", "dataset": "cub",
    "variant": "v1a"}``; ``rn50/domainnet/clipart/v2b/model.pth`` adds
    ``"domain": "clipart"``. Paths of another shape give only what they hold
    (possibly nothing).
    """
    parts = Path(rel).parent.parts
    info: dict[str, str] = {}
    if len(parts) == 3:
        info = {"model_type": parts[0], "dataset": parts[1], "variant": parts[2]}
    elif len(parts) == 4 and parts[1] == DOMAINNET:
        info = {
            "model_type": parts[0],
            "dataset": DOMAINNET,
            "domain": parts[2],
            "variant": parts[3],
        }
    elif parts and parts[0] in MODEL_TYPES:
        info = {"model_type": parts[0]}
    return info


def _verification_record(report, image_size: int | None) -> dict[str, Any]:
    return {
        "max_abs": report.max_abs,
        "max_rel": report.max_rel,
        "scale": report.scale,
        "reference": report.reference,
        "shape": list(report.shape),
        "image_size": image_size,
    }


def _row(src_pth: Path, dst_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    row = {
        "source": str(src_pth),
        "checkpoint": str(dst_dir),
        "status": status,
        "arch": None,
        "num_classes": None,
        "max_abs": None,
        "max_rel": None,
        "reason": None,
        "seconds": 0.0,
    }
    row.update(fields)
    return row


def _from_metadata(info: Mapping[str, Any]) -> dict[str, Any]:
    check = info.get("verification") or {}
    return {
        "arch": info.get("arch"),
        "num_classes": info.get("num_classes"),
        "max_abs": check.get("max_abs"),
        "max_rel": check.get("max_rel"),
    }


def _existing(dst_dir: Path, sha: str, overwrite: bool) -> dict[str, Any] | None:
    """The metadata of a finished conversion of the file with ``sha`` at ``dst_dir``,
    ``None`` when ``dst_dir`` should be (re)written, or an error when it may not."""
    if not dst_dir.exists():
        return None
    if dst_dir.is_dir() and not any(dst_dir.iterdir()):
        return None  # an empty directory holds nothing to protect
    try:
        info = checkpoint.load_metadata(dst_dir)
    except checkpoint.CheckpointError:
        # A half-written checkpoint never carries our metadata (it is renamed into
        # place whole), so this is someone else's file: never replace it.
        raise ConversionError(
            f"{dst_dir}: exists and is not a pleas-jax checkpoint; move it away"
        ) from None
    if info.get("source_sha256") == sha and not overwrite:
        return info
    if not overwrite:
        raise ConversionError(
            f"{dst_dir}: holds a checkpoint converted from another file "
            f"(source sha256 {str(info.get('source_sha256'))[:12]}..., this file "
            f"{sha[:12]}...); pass overwrite=True (--overwrite) to replace it"
        )
    return None


def convert_checkpoint(
    src_pth: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    verify: bool = True,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
    image_size: int | None = None,
    release: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Convert one torch checkpoint file into the orbax checkpoint directory ``dst_dir``.

    Skips the work when ``dst_dir`` already holds the conversion of this very file
    (same source SHA-256 in its metadata), made at the requested ``image_size``
    and verified when ``verify`` asks for it; otherwise that conversion is
    replaced. Parent directories of ``dst_dir`` are
    created; on failure nothing is left behind (not even those parents).

    Args:
      src_pth: a ``.pth``/``.pt``/``.safetensors`` file holding a torchvision-style
        ResNet state_dict, bare or inside ``{'model': ...}`` (see
        :func:`converters.load_state_dict`).
      dst_dir: the checkpoint directory to write, e.g. ``DST/rn18/cub/v1a``.
      verify: run torch and Flax on one random batch ``[2, C, S, S]`` and refuse
        to write when the largest logit difference relative to the largest
        |logit| exceeds ``tolerance``.
      overwrite: replace a pleas-jax checkpoint at ``dst_dir`` even when it was
        converted from this file or another one.
      tolerance: see ``verify``.
      image_size: the side of the images the model reads, recorded in the
        metadata for merge and eval, and ``S`` of the verification batch
        (default 224 for ImageNet stems, 32 for CIFAR ones; with the input
        normalisation and crop of :func:`pleas_jax.workflow.input_convention`).
      release: the release-layout fields of the file (:func:`describe_path`); a
        ``model_type`` of rn18/rn50/rn101 must match the inferred architecture.
        Stored in the metadata under ``release``.

    Returns:
      A summary row: ``source``, ``checkpoint``, ``status`` (``"converted"`` or
      ``"skipped"``), ``arch``, ``num_classes``, ``max_abs`` / ``max_rel`` (the
      verification's logit differences, or those recorded at conversion; ``None``
      without verification), ``reason`` (``None``), ``seconds``.

    Raises:
      ConversionError: an unreadable or corrupt file, a state_dict that is not a
        ResNet, an architecture that contradicts the model type, a failed
        verification, or a ``dst_dir`` that may not be replaced; the message
        names the path.
    """
    t0 = time.perf_counter()
    src_pth, dst_dir = Path(src_pth), Path(dst_dir)
    if not src_pth.is_file():
        raise ConversionError(f"{src_pth}: no such file")
    sha = sha256_file(src_pth)
    done = _existing(dst_dir, sha, overwrite)
    # A conversion of this very file is kept unless this run asks for what it
    # lacks (another image size, or a verification it skipped); then it is
    # replaced, which loses nothing.
    if done is not None and (
        (image_size is None or done.get("image_size") == image_size)
        and (not verify or done.get("verification") is not None)
    ):
        return _row(
            src_pth, dst_dir, "skipped", **_from_metadata(done), seconds=time.perf_counter() - t0
        )
    replace = overwrite or done is not None

    conv = convert_file(src_pth)
    module = conv.module
    arch = models.arch_name(module)
    model_type = (release or {}).get("model_type")
    if model_type in MODEL_TYPES and arch != MODEL_TYPES[model_type]:
        raise ConversionError(
            f"{src_pth}: holds a {arch or 'custom ResNet'} "
            f"(stages {list(module.stage_sizes)}, {module.block} blocks) but lies under "
            f"{model_type}/, which means {MODEL_TYPES[model_type]}"
        )
    size, norm, crop = workflow.input_convention(module)
    size = image_size or size
    record = None
    if verify:
        report = verify_logits(module, conv.variables, conv.state_dict, image_size=size)
        if not report.max_rel <= tolerance:  # NaN fails too
            raise ConversionError(
                f"{src_pth}: verification failed: torch and Flax logits differ by "
                f"{report.max_rel:.3e} of the largest |logit| (tolerance {tolerance:g}); "
                "nothing written"
            )
        record = _verification_record(report, size)

    # checkpoint.save makes missing parents and removes them if it fails.
    if dst_dir.is_dir() and not any(dst_dir.iterdir()):
        dst_dir.rmdir()
    counts = set(conv.num_batches_tracked.values())
    checkpoint.save(
        dst_dir,
        module,
        conv.variables,
        overwrite=replace,
        converted_from="torch",
        source=str(src_pth.resolve()),
        source_sha256=conv.source_sha256,
        ema=False,
        image_size=size,
        normalization=norm,
        crop=crop,
        # As `pleas-jax convert` keeps it: the reverse conversion is then bit-exact.
        torch_num_batches_tracked=(counts.pop() if len(counts) == 1 else conv.num_batches_tracked),
        verification=record,
        release=dict(release) if release else None,
    )
    return _row(
        src_pth,
        dst_dir,
        "converted",
        arch=arch,
        num_classes=module.num_classes,
        max_abs=None if record is None else record["max_abs"],
        max_rel=None if record is None else record["max_rel"],
        seconds=time.perf_counter() - t0,
    )


def iter_convert_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    verify: bool = True,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
    image_size: int | None = None,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """:func:`convert_tree`, yielding each row as soon as its file is done."""
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    files = find_checkpoints(src)
    if dst.resolve() == src.resolve():
        # DST/<rel>/ would be the directory holding SRC/<rel>/model.pth.
        raise ConversionError(
            f"{dst}: DST must differ from SRC (SRC/<rel>/model.pth is converted into the "
            "checkpoint directory DST/<rel>/)"
        )
    if not files:
        raise ConversionError(f"{src}: no {SOURCE_NAME} anywhere below it")
    dst.mkdir(parents=True, exist_ok=True)
    bar = tqdm(files, desc="convert-tree", unit="ckpt", disable=not progress)
    try:
        for rel in bar:
            bar.set_postfix_str(str(rel.parent))
            src_pth, dst_dir = src / rel, dst / rel.parent
            release = describe_path(rel)
            t0 = time.perf_counter()
            try:
                row = convert_checkpoint(
                    src_pth,
                    dst_dir,
                    verify=verify,
                    overwrite=overwrite,
                    tolerance=tolerance,
                    image_size=image_size,
                    release=release,
                )
            except Exception as e:  # one bad file fails its own row, not the tree
                known = isinstance(e, ConversionError | checkpoint.CheckpointError | OSError)
                reason = str(e) if known else f"{type(e).__name__}: {e}"
                row = _row(
                    src_pth,
                    dst_dir,
                    "failed",
                    reason=" ".join(reason.split()),
                    seconds=time.perf_counter() - t0,
                )
            row["path"] = str(rel.parent)
            row.update({k: release.get(k) for k in ("model_type", "dataset", "domain", "variant")})
            yield row
    finally:
        bar.close()


def convert_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    verify: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
    image_size: int | None = None,
) -> list[dict[str, Any]]:
    """Convert every ``model.pth`` under ``src`` into the same relative directory under ``dst``.

    ``src/<rel>/model.pth`` becomes the orbax checkpoint directory ``dst/<rel>/``
    (see the module docstring for the release layout). Files are taken in sorted
    order; one that fails (unreadable, not a ResNet, wrong model type, failed
    verification, an unreplaceable destination) gets a ``"failed"`` row with the
    reason and the rest are still converted. Already converted files are skipped.

    Args:
      src: root of the release's tree of torch checkpoints.
      dst: root of the orbax tree (created if missing).
      verify: logit parity on a random batch for each conversion
        (:func:`convert_checkpoint`).
      progress: a tqdm bar over the files.
      overwrite, tolerance, image_size: as for :func:`convert_checkpoint`.

    Returns:
      One row per file, in sorted order: the fields of :func:`convert_checkpoint`'s
      row (``status`` may also be ``"failed"``, with ``reason`` one line naming
      the file) plus ``path`` (``<rel>``, e.g. ``"rn18/cub/v1a"``) and the
      layout's ``model_type``, ``dataset``, ``domain``, ``variant`` (``None``
      where the path does not say).

    Raises:
      ConversionError: ``src`` is not a directory, holds no ``model.pth``, or is ``dst``.
    """
    return list(
        iter_convert_tree(
            src,
            dst,
            verify=verify,
            overwrite=overwrite,
            tolerance=tolerance,
            image_size=image_size,
            progress=progress,
        )
    )


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`convert_tree` as a fixed-width table, one line per file,
    then a totals line; failures' reasons are not included (one line each elsewhere)."""
    header = ("path", "arch", "classes", "status", "max abs diff", "max rel diff")
    lines = [
        (
            str(r.get("path") or r["checkpoint"]),
            str(r.get("arch") or "-"),
            "-" if r.get("num_classes") is None else str(r["num_classes"]),
            r["status"],
            "-" if r.get("max_abs") is None else f"{r['max_abs']:.2e}",
            "-" if r.get("max_rel") is None else f"{r['max_rel']:.2e}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i >= 2 and i != 3 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [fmt(header), "-" * len(fmt(header))]
    out += [fmt(line) for line in lines]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    out.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(rows)}")
    return "\n".join(out) + "\n"
