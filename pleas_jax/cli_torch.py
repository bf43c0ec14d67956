"""The ``pleas-jax`` subcommands that cross to PyTorch: ``convert`` and
``convert-tree`` (PyTorch checkpoints -> orbax) and ``export`` (a pleas-jax
checkpoint -> a PyTorch ``state_dict``), over :mod:`converters`. torch is
imported inside the commands, so the rest of the command line works without it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from pleas_jax.cli_base import (
    EXIT_MISMATCH,
    PROG,
    CommandError,
    crop_arg,
    import_converters,
    positive,
)


def tolerance_arg(text: str) -> float:
    """``--tolerance`` (argparse ``type``): a finite number >= 0 (0 asks for exact
    agreement). A negative or NaN one would fail every check, an infinite one
    pass every finite one: both are usage errors, not failed verifications."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"expected a finite relative difference >= 0 such as 1e-4, got {text!r}"
        )
    return value


def _verify_arguments(p: argparse.ArgumentParser, *, default: bool) -> None:
    """``--verify`` / ``--no-verify`` (every command takes both; ``default`` is
    the command's own) and ``--tolerance``."""
    on = "--verify" if default else "--no-verify"
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="run torch and Flax on the same random batch, print the logit differences and "
        f"write nothing when they exceed --tolerance (default: {on})",
    )
    p.add_argument(
        "--tolerance",
        type=tolerance_arg,
        default=1e-4,
        help="largest allowed |torch - flax| relative to the largest |logit|, a finite number "
        ">= 0 (default 1e-4)",
    )


def _failed(report, tolerance: float) -> bool:
    """Print ``report``; say on stderr, and return True, when it exceeds ``tolerance``."""
    print(
        f"verify: {report.reference} vs Flax on a random batch {list(report.shape)}: "
        f"max abs diff {report.max_abs:.3e}, max rel diff {report.max_rel:.3e} "
        f"(largest |logit| {report.scale:.3e})"
    )
    if report.max_rel <= tolerance:  # NaN fails too
        return False
    print(
        f"{PROG}: error: verification failed: relative difference {report.max_rel:.3e} "
        f"exceeds --tolerance {tolerance:g}; nothing written",
        file=sys.stderr,
    )
    return True


# ----------------------------------------------------------------- convert
def register_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a PyTorch (torchvision-layout) ResNet checkpoint to an orbax checkpoint",
        description=(
            "Convert a torchvision-layout ResNet checkpoint (.pth/.pt or .safetensors; a bare "
            "state_dict, {'model': ...} or {'state_dict': ...}, DataParallel 'module.' "
            "prefixes, EMA copies) into a pleas-jax orbax checkpoint directory OUT with "
            "metadata (arch, widths, num_classes, source sha256, the input size and "
            "normalisation that merge and eval use). The file is loaded with "
            "torch.load(weights_only=True): pickled code is refused. When IN has the JSON "
            "sidecar that 'pleas-jax export' writes beside it (IN.json, e.g. m.pth.json) and "
            "that sidecar describes these weights, its image size, normalisation, crop and "
            "classes are recorded; --image-size, --normalization and --crop override them."
        ),
    )
    p.add_argument("input", metavar="IN", help="PyTorch checkpoint file")
    p.add_argument("output", metavar="OUT", help="checkpoint directory to create")
    p.add_argument(
        "--arch",
        default="auto",
        help="resnet18|34|50|101|152|resnet20, or 'auto' to infer architecture, widths "
        "and classes from the tensor shapes (default: auto)",
    )
    p.add_argument("--num-classes", type=int, default=None, help="expected classifier size")
    p.add_argument("--ema", action="store_true", help="convert the EMA copy of the weights")
    _verify_arguments(p, default=False)
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the images the model reads, recorded for merge and eval and used by "
        "--verify (default: the export sidecar's, else 224 for torchvision's ImageNet stem, 32 "
        "for a CIFAR stem)",
    )
    p.add_argument(
        "--normalization",
        choices=("imagenet", "data"),
        default=None,
        help="input normalisation to record: ImageNet's mean and std, or each data spec's "
        "own training statistics (default: the export sidecar's, else imagenet for an ImageNet "
        "stem, data for a CIFAR stem)",
    )
    p.add_argument(
        "--crop",
        type=crop_arg,
        default="default",
        metavar="F|none",
        help="how merge and eval bring images to --image-size: resize the shorter side to "
        "size/F and take the central square (torchvision's evaluation: F=0.875, 256 then "
        "224), or 'none' to resize whole images (default: the export sidecar's, else 0.875 for "
        "an ImageNet stem, none for a CIFAR stem)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_convert)


# What an export's sidecar says about its inputs that `convert` records.
_SIDECAR_FACTS = ("image_size", "normalization", "crop", "classes")


def _sidecar(source: str, module, variables) -> dict[str, Any]:
    """The input facts (:data:`_SIDECAR_FACTS`) that ``pleas-jax export`` recorded
    beside ``source``, or ``{}`` when there is no sidecar. One that is unreadable
    or describes other weights (another config or channel count: the .pth was
    replaced after export) is ignored with a warning: the weights still convert."""
    from converters import ConversionError, flax_to_torch, input_channels

    if not flax_to_torch.info_path(source).is_file():
        return {}
    try:
        info = flax_to_torch.read_info(source)
    except ConversionError as e:
        print(f"{PROG}: warning: ignoring the export sidecar: {e}", file=sys.stderr)
        return {}
    # Files exported before in_channels was recorded were RGB.
    channels = info.get("in_channels", 3)
    if info.get("config") != module.config() or channels != input_channels(variables):
        print(
            f"{PROG}: warning: ignoring {flax_to_torch.info_path(source)}: it describes "
            "another model than these weights",
            file=sys.stderr,
        )
        return {}
    return {k: info[k] for k in _SIDECAR_FACTS if k in info}


def _convert(args: argparse.Namespace) -> int:
    from pleas_jax import checkpoint, workflow
    from pleas_jax.data import IMAGENET_NORMALIZATION

    positive(args, "image_size")

    out = Path(args.output)
    # Fail before the (slow) conversion, and never leave a half-written OUT.
    if out.exists() and not args.overwrite:
        raise CommandError(f"{out}: already exists (pass --overwrite to replace it)")
    try:
        checkpoint.check_parent(out)  # missing parents are created when it is saved
    except checkpoint.CheckpointError as e:
        raise CommandError(str(e)) from None
    converters = import_converters()
    from pleas_jax import models

    conv = converters.convert_file(args.input, args.arch, args.num_classes, args.ema)
    module = conv.module
    head = "no classifier" if module.num_classes is None else f"{module.num_classes} classes"
    print(
        f"converted {args.input}: {models.arch_name(module) or 'custom ResNet'}, "
        f"{module.block} blocks {list(module.stage_sizes)}, {head}"
    )
    # Each fact from the command line, else the export's sidecar, else the stem's convention.
    size, norm, crop = workflow.input_convention(module)
    known = _sidecar(args.input, module, conv.variables)
    if known:
        print(f"read {', '.join(known)} from {Path(args.input).name}.json")
    size = args.image_size or known.get("image_size", size)
    crop = known.get("crop", crop) if args.crop == "default" else args.crop
    if args.normalization is not None:
        norm = IMAGENET_NORMALIZATION if args.normalization == "imagenet" else None
    else:
        norm = known.get("normalization", norm)
    if args.verify:
        report = converters.verify(module, conv.variables, conv.state_dict, image_size=size)
        if _failed(report, args.tolerance):
            return EXIT_MISMATCH
    counts = set(conv.num_batches_tracked.values())
    checkpoint.save(
        out,
        module,
        conv.variables,
        overwrite=args.overwrite,
        converted_from="torch",
        source=str(Path(args.input).resolve()),
        source_sha256=conv.source_sha256,
        ema=bool(args.ema),
        # How merge and eval read data for it (None: the data's own statistics).
        image_size=size,
        normalization=norm,
        crop=crop,
        # The original labels, where the export recorded them (eval checks them).
        **({"classes": known["classes"]} if known.get("classes") is not None else {}),
        # Kept so the reverse conversion can reproduce the state_dict bit for bit.
        torch_num_batches_tracked=counts.pop() if len(counts) == 1 else conv.num_batches_tracked,
    )
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------ convert-tree
def register_convert_tree(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-tree",
        help="convert the PLeaS release's tree of PyTorch checkpoints into orbax checkpoints",
        description=(
            "Convert every model.pth under SRC (the release layout: "
            "{rn18,rn50,rn101}/{dataset}/{v1a,v1b,v2a,v2b}/model.pth saved as {'model': "
            "state_dict}, and {model_type}/domainnet/{domain}/{variant}/model.pth as plain "
            "state_dicts) into the orbax checkpoint directory of the same relative path under "
            "DST: SRC/rn18/cub/v1a/model.pth -> DST/rn18/cub/v1a/. Files already converted (a "
            "checkpoint recording the same source sha256) are skipped, so a rerun resumes. Each "
            "conversion is verified by running torch and Flax on one random batch (--no-verify "
            "skips it); a file that cannot be converted is reported on one line and skipped. "
            "Prints a summary table; the exit status is 1 if any file failed."
        ),
    )
    p.add_argument("src", metavar="SRC", help="root of the tree of PyTorch checkpoints")
    p.add_argument("dst", metavar="DST", help="root of the tree of orbax checkpoints to write")
    _verify_arguments(p, default=True)
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the images the models read, recorded for merge and eval and used by "
        "verification (default 224 for torchvision's ImageNet stem, 32 for a CIFAR stem); a "
        "file converted before at another size is converted again",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="convert again even where DST already holds a checkpoint",
    )
    p.add_argument(
        "--report",
        "--json",
        dest="report",
        default=None,
        metavar="FILE",
        help="also write the summary rows to this JSON file (--json is the older name)",
    )
    p.set_defaults(func=_convert_tree)


def _convert_tree(args: argparse.Namespace) -> int:
    import json

    positive(args, "image_size")
    import_converters()
    from tqdm.auto import tqdm

    from converters import tree

    rows = []
    for row in tree.iter_convert_tree(
        args.src,
        args.dst,
        verify=args.verify,
        overwrite=args.overwrite,
        tolerance=args.tolerance,
        image_size=args.image_size,
        progress=True,
    ):
        if row["status"] == "failed":
            # One line per bad file as it happens (above the progress bar); the run goes on.
            tqdm.write(f"{PROG}: failed: {row['reason']}", file=sys.stderr)
        rows.append(row)
    print(tree.format_summary(rows), end="")
    if args.report:
        Path(args.report).write_text(json.dumps(rows, indent=2) + "\n")
    return EXIT_MISMATCH if any(r["status"] == "failed" for r in rows) else 0


# ------------------------------------------------------------------ export
def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint (trained, converted or merged) as a PyTorch state_dict",
        description=(
            "Write a pleas-jax checkpoint as a torchvision-layout PyTorch state_dict OUT (.pth) "
            "and, beside it, OUT.json (e.g. m.pth.json): the architecture config, the input "
            "channels, the torch class that runs it (torchvision's resnetNN for standard RGB "
            "configs, converters.TorchResNet for merged widths, ResNet-20 and other channel "
            "counts, e.g. 1 for MNIST), the input size, normalisation and crop and the classes; "
            "'pleas-jax convert OUT' reads them back. converters.flax_to_torch.load(OUT) returns "
            "the pair (torch model in eval mode, the OUT.json facts). A merged model's "
            "block-sparse layers are written dense (their forbidden blocks are zeros). A merge "
            "with separate label spaces needs --head a or --head b: that head becomes fc. "
            "Torch and Flax are run on one random batch and compared before anything is written "
            "(--no-verify skips it)."
        ),
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    p.add_argument("output", metavar="OUT", help="state_dict file to write (.pth or .pt)")
    p.add_argument(
        "--head",
        choices=("a", "b"),
        default=None,
        help="for a merged backbone with separate heads: which source model's head becomes fc",
    )
    _verify_arguments(p, default=True)
    p.add_argument("--overwrite", action="store_true", help="replace OUT and OUT.json")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from pleas_jax import workflow

    out = Path(args.output)
    if out.suffix not in (".pth", ".pt"):
        raise CommandError(f"{out}: name the state_dict file .pth or .pt")
    if not out.parent.is_dir():
        raise CommandError(f"{out}: parent directory {out.parent} does not exist")
    model = workflow.load_model(args.checkpoint)
    converters = import_converters()
    from converters import flax_to_torch

    for p in (out, flax_to_torch.info_path(out)):
        if p.exists() and not args.overwrite:
            raise CommandError(f"{p}: already exists (pass --overwrite to replace it)")
    module, variables, classes = model.module, model.variables, model.metadata.get("classes")
    if model.heads is not None:
        if args.head is None:
            raise CommandError(
                f"{args.checkpoint} is a merged backbone with separate heads "
                f"{sorted(model.heads)}; choose the one to export with --head"
            )
        module, variables = flax_to_torch.with_head(module, variables, model.heads[args.head])
        classes = (model.metadata.get("head_classes") or {}).get(args.head)
    elif args.head is not None:
        raise CommandError(f"{args.checkpoint} has a single classifier; --head applies to none")
    norm = model.normalization
    state_dict, info = flax_to_torch.to_torch(
        module,
        variables,
        # A converted checkpoint gives torch's BN counters back, bit for bit.
        num_batches_tracked=model.metadata.get("torch_num_batches_tracked", 0),
        image_size=model.image_size,
        normalization=None if norm is None else {"mean": norm[0], "std": norm[1]},
        crop=model.crop,
        classes=None if classes is None else list(classes),
        head=args.head,
        source=str(Path(args.checkpoint).resolve()),
    )
    print(
        f"exporting {args.checkpoint}: {info['torch_class']}, "
        f"{'no classifier' if module.num_classes is None else f'{module.num_classes} classes'}"
    )
    if args.verify:
        # The block-sparse Flax model itself against the dense torch one.
        report = converters.verify(module, variables, state_dict, image_size=model.image_size)
        if _failed(report, args.tolerance):
            return EXIT_MISMATCH
    path, meta = flax_to_torch.save(out, state_dict, info, overwrite=args.overwrite)
    print(f"wrote {path} and {meta}")
    return 0
