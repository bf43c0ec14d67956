"""A run's record and its command line: the result file and the entry point.

Every experiment writes one :data:`~experiments.release.RESULT_FILE` per run
(:func:`finish_run`: the fields all experiments share, then its own), which the
launcher reads back to skip finished runs (:func:`read_result`) and the report
tabulates. :func:`experiment_main` is a script's ``main``: user errors become one
line on stderr, as the ``pleas-jax`` command does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from experiments.release import RESULT_FILE, ExperimentError, _pleas, merge_settings


def write_result(out_dir: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """Write a run's JSON into ``out_dir`` (created) atomically."""
    wf = _pleas()[2]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return wf.write_json(out / RESULT_FILE, result)


def read_result(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A finished run's JSON in ``out_dir``, else ``None`` (missing or unreadable)."""
    file = Path(out_dir) / RESULT_FILE
    try:
        result = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) and result.get("status") == "done" else None


class Timer:
    """Seconds since construction (``timer()``)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def run_main(
    fn: Callable[[argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, run ``fn(args)``; user errors become one line on stderr
    (exit status 2), as the ``pleas-jax`` command does."""
    checkpoint, data_lib, wf = _pleas()
    import sys

    args = parser.parse_args(argv)
    try:
        fn(args)
    except (ExperimentError, wf.RunError, data_lib.DataError, checkpoint.CheckpointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The run's settings for its JSON.

    ``ratios``, ``least_squares`` and ``gd_steps`` are those the merges read
    (:func:`~experiments.release.merge_settings`: a ``zipit`` run records ``zip``
    ratios and no least squares, whatever the options said), as the launcher
    names them in the run's command and directory.
    """
    keys = (
        "model_type",
        "variants",
        "methods",
        "budgets",
        "images",
        "batch_size",
        "matching_data",
        "seed",
        "data_dir",
        "image_size",
        "mock_data",
    )
    used = merge_settings(args.methods, args.ratios, args.least_squares, args.gd_steps)
    return {**{k: getattr(args, k) for k in keys}, **used, "specs": dict(args.spec), **extra}


def finish_run(
    args: argparse.Namespace,
    experiment: str,
    *,
    model_type: str,
    pair: Sequence[str],
    paths: tuple[Path, Path],
    batches: Sequence[Any],
    seconds: float,
    **fields: Any,
) -> dict[str, Any]:
    """A finished run's JSON (the fields every experiment shares, then
    ``fields``: eval sets, metric, settings, sources, results, ...), written
    to ``args.output_dir``. ``model_type`` is the merged models' architecture
    (:func:`~experiments.sources.model_type`), not ``--model-type``'s default."""
    result = {
        "experiment": experiment,
        "status": "done",
        "model_type": model_type,
        "pair": list(pair),
        "variants": list(args.variants),
        "checkpoints": {"a": str(paths[0]), "b": str(paths[1])},
        "command": getattr(args, "command", None),
        **fields,
        "merge_images": int(sum(len(x) for x in batches)),
        "seconds": seconds,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_result(args.output_dir, result)
    return result


def experiment_main(
    run: Callable[..., dict[str, Any]],
    parser: argparse.ArgumentParser,
    module: str,
    argv: Sequence[str] | None,
) -> int:
    """An experiment's command-line entry point: run it with progress on
    stdout, then print the result file's path."""

    def go(args):
        args.command = command_line(argv, module)
        result = run(args, log=lambda s: print(s, flush=True))
        print(
            f"wrote {args.output_dir}/{RESULT_FILE} ({len(result['results'])} merges, "
            f"{result['seconds']:.0f} s)",
            flush=True,
        )

    return run_main(go, parser, argv)


def command_line(argv: Sequence[str] | None, module: str) -> str:
    """The command that reproduces a run, for its JSON."""
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *argv])
