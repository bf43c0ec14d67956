"""The options both experiment scripts take, and their checks.

:func:`add_common_arguments` declares them (the launcher forwards them);
:func:`check_common` rejects what argparse cannot; the small parsers are the
argparse types the launcher uses too.
"""

from __future__ import annotations

import argparse

from experiments.release import (
    BUDGETS,
    ENV_CHECKPOINTS,
    LEAST_SQUARES,
    METHODS,
    MODEL_TYPES,
    RATIOS,
    RESULT_FILE,
    VARIANTS,
    ExperimentError,
)


# -------------------------------------------------------------- arguments
def csv_list(text: str) -> list[str]:
    """``"a, b,c" -> ["a", "b", "c"]`` (argparse type)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def float_list(text: str) -> list[float]:
    """``"1, 1.5" -> [1.0, 1.5]`` (argparse type)."""
    try:
        return [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def spec_override(text: str) -> tuple[str, str]:
    """``"nabird=folder:/data/nabirds/images" -> ("nabird", "folder:...")`` (argparse type)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC, got {text!r}")
    return name.strip(), spec.strip()


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options both experiment scripts take (the launcher forwards them)."""
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpoints",
        "--checkpoints-dir",
        default=None,
        metavar="DIR",
        help=f"root of the release's checkpoint tree (default ${ENV_CHECKPOINTS})",
    )
    g.add_argument(
        "--model-type",
        "--model_type",
        default="rn18",
        choices=sorted(MODEL_TYPES),
        help="architecture directory of the tree to read, and the paper's budgets used by "
        "default (default rn18); the run records the checkpoints' own architecture (with "
        "--a/--b too), e.g. resnet20",
    )
    g.add_argument(
        "--variants",
        type=csv_list,
        default=["v1a", "v1b"],
        metavar="VA,VB",
        help="variants of models A and B (default v1a,v1b)",
    )
    g.add_argument(
        "--a", default=None, metavar="PATH", help="checkpoint of model A (instead of the tree)"
    )
    g.add_argument(
        "--b", default=None, metavar="PATH", help="checkpoint of model B (instead of the tree)"
    )
    g = p.add_argument_group("merging")
    g.add_argument(
        "--methods",
        "--merging",
        type=csv_list,
        default=list(METHODS),
        metavar="M[,M...]",
        help=f"methods among {', '.join(METHODS)} (default all)",
    )
    g.add_argument(
        "--budgets",
        type=float_list,
        default=None,
        metavar="B[,B...]",
        help="budgets in [1, 2] (default: the paper's for --model-type)",
    )
    g.add_argument(
        "--ratios",
        type=csv_list,
        default=["zip", "optimized"],
        metavar="R[,R...]",
        help="ratio allocations among uniform, zip, optimized (default zip,optimized)",
    )
    g.add_argument(
        "--least-squares",
        default="closed_form",
        choices=LEAST_SQUARES,
        help="least-squares mode of the PLeaS methods (default closed_form)",
    )
    g.add_argument(
        "--gd-steps",
        "--max-steps",
        "--max_steps",
        type=int,
        default=400,
        help="steps of --least-squares gd (default 400, as the paper's code)",
    )
    g.add_argument(
        "--images",
        type=int,
        default=1000,
        help="training images each merge sees, half from each task (default 1000)",
    )
    g.add_argument("--batch-size", type=int, default=100, help="merge and evaluation batch size")
    g.add_argument(
        "--matching-data",
        default=None,
        metavar="SPEC",
        help="PLeaS-free: take the merge images (matching, least squares, BatchNorm "
        "statistics) from this data spec's training split instead of the tasks'",
    )
    g.add_argument(
        "--matching-cache",
        default=None,
        metavar="DIR",
        help="keep matchings here, so runs of other budgets of the same pair reuse them",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the merge images, weight matching and probes (default 0)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        "--data_dir",
        default=None,
        metavar="DIR",
        help="tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets); also "
        "where NABirds is looked for (DIR/nabirds/images)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side (default: the checkpoint's, 224 for converted release models)",
    )
    g.add_argument(
        "--spec",
        type=spec_override,
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="read dataset NAME from this data spec instead (repeatable), e.g. "
        "nabird=folder:/data/nabirds/images; scores stay keyed NAME, and the report "
        "names a replaced dataset NAME=SPEC (cub=mnist5k[0-4])",
    )
    g.add_argument(
        "--mock-data", type=int, default=None, metavar="N", help=argparse.SUPPRESS
    )  # tests: tfds.testing.mock_data with N examples
    g = p.add_argument_group("output")
    g.add_argument(
        "--output-dir",
        "--output_dir",
        required=True,
        metavar="DIR",
        help=f"where this run writes {RESULT_FILE}",
    )
    g.add_argument("--progress", action="store_true", help="progress bars")


def check_common(args: argparse.Namespace) -> None:
    """Raise :class:`ExperimentError` for option values argparse cannot check."""
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        raise ExperimentError(
            f"unknown method {bad[0] if bad else '(none)'}; choose from {', '.join(METHODS)}"
        )
    bad = [r for r in args.ratios if r not in RATIOS]
    if bad or not args.ratios:
        raise ExperimentError(
            f"unknown ratios {bad[0] if bad else '(none)'}; choose from {', '.join(RATIOS)}"
        )
    if len(args.variants) != 2 or any(v not in VARIANTS for v in args.variants):
        raise ExperimentError(
            f"--variants needs two of {', '.join(VARIANTS)}, got {','.join(args.variants)}"
        )
    budgets = args.budgets if args.budgets is not None else BUDGETS[args.model_type]
    for b in budgets:
        if not 1.0 <= b <= 2.0:
            raise ExperimentError(f"budget {b} is outside [1, 2] (compute relative to one model)")
    args.budgets = list(budgets)
    if args.images < 2 or args.batch_size < 1:
        raise ExperimentError("--images must be at least 2 and --batch-size positive")
    if args.least_squares == "gd" and args.gd_steps < 1:
        raise ExperimentError(
            f"--max-steps must be positive for --least-squares gd, got {args.gd_steps}"
        )
    if (args.a is None) != (args.b is None):
        raise ExperimentError("pass both --a and --b, or neither (then the tree is read)")
