"""The ``pleas-jax`` command: a thin argparse layer over the libraries.

Each subcommand is one ``_register_<name>(subparsers)`` function that adds its
parser and sets ``func``; :data:`SUBCOMMANDS` lists them. To add a subcommand,
write its register function and append it there. ``func(args) -> int`` returns
the exit status; library errors (:data:`USER_ERRORS`) become one line
``pleas-jax: error: ...`` on stderr with exit status 2, never a traceback.

Commands: ``train``, ``merge``, ``eval`` (over :mod:`pleas_jax.workflow`),
``convert`` and ``convert-tree`` (over :mod:`converters`) and ``demo`` (over
:mod:`pleas_jax.demo`).
Heavy imports (torch, orbax, the converters) happen inside the commands so
that torch stays optional.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

PROG = "pleas-jax"
EXIT_ERROR = 2  # bad input (as argparse uses for bad usage)
EXIT_MISMATCH = 1  # the command ran but a check failed (e.g. --verify above tolerance)


class CommandError(Exception):
    """A user-facing failure of a command; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CommandError, OSError]
    from pleas_jax.checkpoint import CheckpointError
    from pleas_jax.data import DataError
    from pleas_jax.workflow import RunError

    errors += [CheckpointError, DataError, RunError]
    if "converters" in sys.modules:  # only once a command has needed torch
        errors.append(sys.modules["converters"].ConversionError)
    return tuple(errors)


def _import_converters():
    try:
        import converters
    except ModuleNotFoundError as e:
        raise CommandError(
            f"this command needs PyTorch ({e.name} is not installed): pip install 'pleas-jax[torch]'"
        ) from None
    return converters


# ----------------------------------------------------------------- convert
def _register_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a PyTorch (torchvision-layout) ResNet checkpoint to an orbax checkpoint",
        description=(
            "Convert a torchvision-layout ResNet checkpoint (.pth/.pt or .safetensors; a bare "
            "state_dict, {'model': ...} or {'state_dict': ...}, DataParallel 'module.' "
            "prefixes, EMA copies) into a pleas-jax orbax checkpoint directory OUT with "
            "metadata (arch, widths, num_classes, source sha256, the input size and "
            "normalisation that merge and eval use). The file is loaded with "
            "torch.load(weights_only=True): pickled code is refused."
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
    p.add_argument(
        "--verify",
        action="store_true",
        help="run torch and Flax on the same random batch and print the logit differences",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |torch - flax| relative to the largest |logit| (default 1e-4)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the images the model reads, recorded for merge and eval and used by "
        "--verify (default 224 for torchvision's ImageNet stem, 32 for a CIFAR stem)",
    )
    p.add_argument(
        "--normalization",
        choices=("imagenet", "data"),
        default=None,
        help="input normalisation to record: ImageNet's mean and std, or each data spec's "
        "own training statistics (default imagenet for an ImageNet stem, data for a CIFAR stem)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_convert)


def _print_verification(report) -> None:
    print(
        f"verify: {report.reference} vs Flax on a random batch {list(report.shape)}: "
        f"max abs diff {report.max_abs:.3e}, max rel diff {report.max_rel:.3e} "
        f"(largest |logit| {report.scale:.3e})"
    )


def _convert(args: argparse.Namespace) -> int:
    from pleas_jax import checkpoint, workflow
    from pleas_jax.data import IMAGENET_NORMALIZATION

    _positive(args, "image_size")

    out = Path(args.output)
    # Fail before the (slow) conversion, and never leave a half-written OUT.
    if out.exists() and not args.overwrite:
        raise CommandError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise CommandError(f"{out}: parent directory {out.parent} does not exist")
    converters = _import_converters()
    from pleas_jax import models

    conv = converters.convert_file(args.input, args.arch, args.num_classes, args.ema)
    module = conv.module
    head = "no classifier" if module.num_classes is None else f"{module.num_classes} classes"
    print(
        f"converted {args.input}: {models.arch_name(module) or 'custom ResNet'}, "
        f"{module.block} blocks {list(module.stage_sizes)}, {head}"
    )
    size, norm = workflow.input_convention(module)
    size = args.image_size or size
    if args.normalization is not None:
        norm = IMAGENET_NORMALIZATION if args.normalization == "imagenet" else None
    if args.verify:
        report = converters.verify(module, conv.variables, conv.state_dict, image_size=size)
        _print_verification(report)
        if not report.max_rel <= args.tolerance:  # NaN fails too
            print(
                f"{PROG}: error: verification failed: relative difference {report.max_rel:.3e} "
                f"exceeds --tolerance {args.tolerance:g}; nothing written",
                file=sys.stderr,
            )
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
        # Kept so the reverse conversion can reproduce the state_dict bit for bit.
        torch_num_batches_tracked=counts.pop() if len(counts) == 1 else conv.num_batches_tracked,
    )
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------ convert-tree
def _register_convert_tree(sub: argparse._SubParsersAction) -> None:
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
            "conversion is verified by running torch and Flax on one random batch; a file that "
            "cannot be converted is reported on one line and skipped. Prints a summary table; "
            "the exit status is 1 if any file failed."
        ),
    )
    p.add_argument("src", metavar="SRC", help="root of the tree of PyTorch checkpoints")
    p.add_argument("dst", metavar="DST", help="root of the tree of orbax checkpoints to write")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the torch-vs-Flax logit check",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |torch - flax| relative to the largest |logit| (default 1e-4)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the random verification images (default 224; 32 for CIFAR stems)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="convert again even where DST already holds a checkpoint",
    )
    p.add_argument(
        "--json", default=None, metavar="FILE", help="also write the summary rows to this JSON file"
    )
    p.set_defaults(func=_convert_tree)


def _convert_tree(args: argparse.Namespace) -> int:
    import json

    _positive(args, "image_size")
    _import_converters()
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
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return EXIT_MISMATCH if any(r["status"] == "failed" for r in rows) else 0


# ------------------------------------------------------------------- train
def _register_train(sub: argparse._SubParsersAction) -> None:
    from pleas_jax.models import ARCHITECTURES

    p = sub.add_parser(
        "train",
        help="train a source model on a data spec and save it as a checkpoint",
        description=(
            "Train a ResNet from a seeded initialisation (SGD with Nesterov momentum, cosine "
            "schedule, weight decay) on the training split of a data spec, print the test "
            "accuracy as JSON and save a checkpoint whose metadata records the data, image size, "
            "normalisation, recipe, test accuracy and this command. Data specs: digits, "
            "mnist5k, npz:PATH, folder:PATH, tfds:NAME[/CONFIG][:SPLIT], each optionally with a "
            "label subset such as mnist5k[0-4]."
        ),
    )
    p.add_argument("--arch", default="resnet20", choices=ARCHITECTURES, help="(default resnet20)")
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="base width (default: 16 for resnet20, 64 for the ImageNet ResNets)",
    )
    p.add_argument("--data", required=True, help="data spec, e.g. 'mnist5k[0-4]'")
    p.add_argument(
        "--image-size", type=int, default=32, help="images are resized to this (default 32)"
    )
    p.add_argument("--epochs", type=int, default=8, help="(default 8)")
    p.add_argument(
        "--seed", type=int, default=0, help="initialisation and shuffling seed (default 0)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="(default 128)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default 5e-4)")
    p.add_argument("--augment", action="store_true", help="random crops (and flips for RGB)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint")
    p.set_defaults(func=_train)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _train(args: argparse.Namespace) -> int:
    from pleas_jax import workflow

    _positive(args, "width", "image_size", "epochs", "batch_size")
    info = workflow.train_checkpoint(
        args.out,
        data=args.data,
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        augment=args.augment,
        image_size=args.image_size,
        overwrite=args.overwrite,
        progress=True,
        command=args.command_line,
    )
    _print_json(
        {
            "checkpoint": args.out,
            "data": args.data,
            "test_accuracy": round(info["test_accuracy"], 6),
            "test_examples": info["test_examples"],
        }
    )
    return 0


def _print_json(value) -> None:
    import json

    print(json.dumps(value))


# ------------------------------------------------------------------- merge
def _register_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge two checkpoints (PLeaS) into one of a given compute budget",
        description=(
            "Merge checkpoints A and B of the same architecture: permutation matching, partial "
            "merging under the budget, least squares and BatchNorm statistics, all on the first "
            "--images images of a seeded shuffle of the data's training split (read at A's image "
            "size and normalisation). Writes the merged checkpoint (a backbone with heads 'a' and "
            "'b' for different label spaces) whole or not at all, and the merge report."
        ),
    )
    p.add_argument("--a", required=True, metavar="DIR", help="checkpoint of model A")
    p.add_argument("--b", required=True, metavar="DIR", help="checkpoint of model B")
    p.add_argument("--data", required=True, help="data spec whose training images the merge sees")
    p.add_argument(
        "--budget",
        type=float,
        required=True,
        help="compute relative to one model, in [1, 2] (1: fully merged, 2: ensemble)",
    )
    p.add_argument(
        "--matching",
        default="activation",
        choices=("activation", "weight", "identity"),
        help="activation statistics, Git Re-Basin weight matching, or none (default activation)",
    )
    p.add_argument(
        "--ratios",
        default="uniform",
        choices=("uniform", "zip", "optimized"),
        help="how the budget is spread over groups (default uniform)",
    )
    p.add_argument(
        "--unit-multiple",
        type=int,
        default=None,
        metavar="M",
        help="round each group's separate units down to a multiple of M (8 suits CPUs "
        "and tensor cores; may spend less than the budget)",
    )
    p.add_argument(
        "--least-squares",
        default="closed_form",
        choices=("closed_form", "gd", "none"),
        help="refit layers in closed form, by gradient descent, or not (default closed_form)",
    )
    p.add_argument(
        "--heads",
        default="auto",
        choices=("auto", "shared", "separate"),
        help="auto: separate heads when A and B were trained on different classes",
    )
    p.add_argument("--images", type=int, default=1000, help="training images used (default 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="(default 250)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="read the images at this size instead of the one the checkpoints record",
    )
    p.add_argument(
        "--gd-steps", type=int, default=400, help="steps of --least-squares gd (default 400)"
    )
    p.add_argument(
        "--matching-dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="compute dtype of the activation-matching pass (default: the models' own; "
        "bfloat16 accumulates in float32)",
    )
    p.add_argument(
        "--matching-precision",
        default="highest",
        choices=("highest", "bf16_3x", "bfloat16"),
        help="matmul precision of the activation-matching moments (default highest; "
        "bf16_3x as for --ls-precision)",
    )
    p.add_argument(
        "--ls-precision",
        default="highest",
        choices=("highest", "bf16_3x", "bfloat16"),
        help="matmul precision of the least-squares sums (default highest: fp32; "
        "bf16_3x: bf16 tensor-core products with ~fp32 accuracy, for GPUs/TPUs)",
    )
    p.add_argument("--out", required=True, help="merged checkpoint directory to create")
    p.add_argument("--report", default=None, help="also write the merge report to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint")
    p.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    from pleas_jax import workflow

    _positive(args, "images", "batch_size", "gd_steps", "unit_multiple", "image_size")
    report = workflow.merge_checkpoints(
        args.a,
        args.b,
        args.out,
        data=args.data,
        budget=args.budget,
        matching=args.matching,
        ratios=args.ratios,
        unit_multiple=args.unit_multiple,
        least_squares=None if args.least_squares == "none" else args.least_squares,
        heads=args.heads,
        images=args.images,
        batch_size=args.batch_size,
        image_size=args.image_size,
        gd_steps=args.gd_steps,
        matching_dtype=args.matching_dtype,
        matching_precision=args.matching_precision,
        ls_precision=args.ls_precision,
        report=args.report,
        overwrite=args.overwrite,
        progress=True,
        command=args.command_line,
    )
    _print_json(
        {
            "checkpoint": args.out,
            "heads": report["heads"],
            "budget": report["budget"],
            "achieved_budget": round(report["achieved_budget"], 4),
            "macs": report["macs"],
            "macs_source": report["macs_source"],
            "params": report["params"],
            "seconds": round(sum(report["seconds"].values()), 2),
            **({"report": args.report} if args.report else {}),
        }
    )
    return 0


# -------------------------------------------------------------------- eval
def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="print a checkpoint's test accuracy on a data spec as JSON",
        description=(
            "Evaluate a checkpoint on the test split of a data spec, read at the checkpoint's "
            "image size with its training normalisation; prints JSON with the accuracy. A merge "
            "with separate label spaces needs --head a or --head b (and that head's task)."
        ),
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    p.add_argument("--data", required=True, help="data spec, e.g. 'mnist5k[5-9]'")
    p.add_argument(
        "--head",
        choices=("a", "b"),
        default=None,
        help="which source model's head reads a merged backbone",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="override the checkpoint's image size"
    )
    p.add_argument("--batch-size", type=int, default=250, help="(default 250)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from pleas_jax import workflow

    _positive(args, "image_size", "batch_size")
    model = workflow.load_model(args.checkpoint)
    dataset = workflow.dataset_for(model, args.data, image_size=args.image_size)
    acc = workflow.evaluate(model, dataset, head=args.head, batch_size=args.batch_size)
    _print_json(
        {
            "checkpoint": args.checkpoint,
            "data": args.data,
            "head": args.head,
            "accuracy": round(acc, 6),
            "examples": len(dataset.y_test),
        }
    )
    return 0


# -------------------------------------------------------------------- demo
def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="PLeaS against its baselines on two pairs of MNIST ResNet-20s (what `make demo` runs)",
        description=(
            "Merge two pairs of ResNet-20 (width 16) on the bundled MNIST images: one task with "
            "two seeds, and digits 0-4 against 5-9 (separate heads). Methods: weight averaging, "
            "Git Re-Basin, activation matching (all with BatchNorm recompute), ZipIt!-style "
            "partial merging, PLeaS and PLeaS-GD, at budgets 1, 1.25, 1.5 and 2, against the "
            "source models and their ensemble. Source checkpoints come from the repository's "
            "demo/checkpoints, else the cache, else are trained. Prints a table; writes "
            "results.json and accuracy_vs_budget.png to --out."
        ),
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the four source models from scratch (into --cache)",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument(
        "--cache",
        default=None,
        help="cache directory (default $PLEAS_JAX_CACHE or ~/.cache/pleas-jax)",
    )
    p.add_argument(
        "--checkpoints",
        default=None,
        help="directory of shipped source checkpoints (default the repository's demo/checkpoints)",
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import time

    from pleas_jax import demo

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is not a directory")
    results = demo.run(
        demo.DemoConfig(),
        out=out,
        shipped=args.checkpoints or demo.REPO_CHECKPOINTS,
        cache=args.cache,
        retrain=args.retrain,
        progress=True,
        log=lambda s: print(f"demo: {s}", flush=True),
    )
    print()
    print(demo.format_table(results), end="")
    print()
    print(
        f"demo: wrote {results['files']['results']} and {results['files']['plot']} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return 0


# ------------------------------------------------------------------ parser
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_train,
    _register_merge,
    _register_eval,
    _register_convert,
    _register_convert_tree,
    _register_demo,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``pleas-jax`` parser with every registered subcommand."""
    from pleas_jax import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PLeaS model merging (permute, then least squares) in JAX/Flax.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="keep compiled programs in DIR, so that a later run on models of the same shapes "
        "skips most compilation (a directory only you can write; pleas_jax.compile_cache)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pleas-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Recorded in the checkpoints a command writes, so they say how they were made.
    args.command_line = shlex.join([PROG, *argv])
    try:
        if args.compile_cache is not None:
            from pleas_jax import compile_cache

            try:
                compile_cache.enable(args.compile_cache)
            except ValueError as e:
                raise CommandError(str(e)) from e
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
