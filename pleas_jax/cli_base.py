"""What every ``pleas-jax`` subcommand shares: exit statuses, the one-line
error, argument checks and output helpers (:mod:`pleas_jax.cli` and
:mod:`pleas_jax.cli_torch` build on it)."""

from __future__ import annotations

import argparse
import json

PROG = "pleas-jax"
EXIT_ERROR = 2  # bad input (as argparse uses for bad usage)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_MISMATCH = 1  # the command ran but a check failed (e.g. --verify above tolerance)


class CommandError(Exception):
    """A user-facing failure of a command; printed as one line."""


def positive(args: argparse.Namespace, *names: str) -> None:
    """Raise :class:`CommandError` for any of the named options set below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {value}")


def crop_arg(text: str) -> float | str | None:
    """``--crop F|none`` (argparse ``type``): a fraction in ``(0, 1]``, ``None``
    for 'none', or 'default' (the option's default: the model's own)."""
    from pleas_jax.image_files import check_crop

    if text in ("none", "default"):
        return None if text == "none" else text
    try:
        return check_crop(float(text))
    except ValueError:  # not a number, or outside (0, 1]
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1] or 'none', got {text!r}"
        ) from None


def print_json(value) -> None:
    """One JSON line on stdout."""
    print(json.dumps(value))


def import_converters():
    """The :mod:`converters` package, or a one-line error naming the missing extra."""
    try:
        import converters
    except ModuleNotFoundError as e:
        raise CommandError(
            f"this command needs PyTorch ({e.name} is not installed): pip install 'pleas-jax[torch]'"
        ) from None
    return converters
