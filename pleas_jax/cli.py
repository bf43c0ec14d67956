"""The ``pleas-jax`` command: a thin argparse layer over the libraries.

Each subcommand is one ``_register_<name>(subparsers)`` function that adds its
parser and sets ``func``; :data:`SUBCOMMANDS` lists them. To add a subcommand,
write its register function and append it there. ``func(args) -> int`` returns
the exit status; library errors (:data:`USER_ERRORS`) become one line
``pleas-jax: error: ...`` on stderr with exit status 2, never a traceback.

Heavy imports (torch, orbax, the converters) happen inside the commands so
that ``pleas-jax --help`` is instant and torch stays optional.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
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

    errors.append(CheckpointError)
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
            "metadata (arch, widths, num_classes, source sha256). The file is loaded with "
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
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_convert)


def _print_verification(report) -> None:
    print(
        f"verify: {report.reference} vs Flax on a random batch {list(report.shape)}: "
        f"max abs diff {report.max_abs:.3e}, max rel diff {report.max_rel:.3e} "
        f"(largest |logit| {report.scale:.3e})"
    )


def _convert(args: argparse.Namespace) -> int:
    from pleas_jax import checkpoint

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
    if args.verify:
        report = converters.verify(module, conv.variables, conv.state_dict)
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
        # Kept so the reverse conversion can reproduce the state_dict bit for bit.
        torch_num_batches_tracked=counts.pop() if len(counts) == 1 else conv.num_batches_tracked,
    )
    print(f"wrote {out}")
    return 0


# -------------------------------------------------------------------- demo
def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="convert a random torchvision resnet18, save it and verify it",
        description=(
            "Build a randomly initialised torchvision resnet18 with non-trivial BatchNorm "
            "statistics, save it as a .pth, convert it to a pleas-jax checkpoint in a "
            "temporary directory, reload it and print the torch vs Flax logit differences."
        ),
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batch (default 0)")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="relative tolerance (default 1e-4)"
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    converters = _import_converters()
    import torch
    import torchvision

    from pleas_jax import checkpoint

    torch.manual_seed(args.seed)
    net = converters.randomize_batch_norm(
        torchvision.models.resnet18(weights=None), args.seed
    ).eval()
    tmp = Path(tempfile.mkdtemp(prefix="pleas-jax-demo-"))
    try:
        src = tmp / "resnet18.pth"
        torch.save(net.state_dict(), src)
        print(f"demo: random torchvision resnet18 saved to {src}")
        conv = converters.convert_file(src, "auto")
        checkpoint.save(
            tmp / "resnet18", conv.module, conv.variables, source_sha256=conv.source_sha256
        )
        module, variables = checkpoint.load(tmp / "resnet18")
        print(f"demo: converted to {tmp / 'resnet18'} and reloaded ({module.num_classes} classes)")
        report = converters.verify(module, variables, conv.state_dict, seed=args.seed)
        _print_verification(report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not report.max_rel <= args.tolerance:  # NaN fails too
        print(
            f"{PROG}: error: demo parity {report.max_rel:.3e} > {args.tolerance:g}", file=sys.stderr
        )
        return EXIT_MISMATCH
    print(f"demo: OK (relative difference {report.max_rel:.3e} <= {args.tolerance:g})")
    return 0


# ------------------------------------------------------------------ parser
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_convert,
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pleas-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
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
