"""Run the paper's grids of experiments: resumable, one directory and JSON per run.

A grid is every dataset pair of an experiment x both model orders ((v1a, v1b)
and (v1b, v1a)) x the model type's budgets x the chosen merging methods. Each
run is one ``python -m experiments.<experiment>`` process with its own output
directory::

    OUTPUT/{experiment}/{model_type}/{A}-{B}/{va}-{vb}/{method}_{ratios}_{ls}_{hash}/budget-{b}/
        result.json

where ``hash`` covers the remaining settings (images, seed, steps, data, ...), so
runs of different settings never overwrite each other. A run whose directory
holds a finished ``result.json`` is skipped, so an interrupted grid resumes
where it stopped. Matchings are kept in ``OUTPUT/matching_cache`` and shared by
all runs of a pair (they do not depend on budget, method or ratios). Every
command and its output go to ``OUTPUT/logs/launch-{experiment}-{time}.log``;
the console shows ``run k of N`` lines. With ``--wandb`` each finished run is
also logged to Weights & Biases when ``wandb`` is installed.

Options take the PyTorch release's launcher spellings too (``--data_dir``,
``--model_type``, ``--merging``, ``--max_steps``, ``--seed``, ``--output_dir``,
``--use_zip_ratios``); ``experiments/launch_*.sh`` forward to this module.

Example::

    python -m experiments.launch different_label_space --model_type rn18 \\
        --merging pleas_activation --output_dir runs --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from experiments import common

EXPERIMENTS = ("different_label_space", "shared_label_space")
REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = "matching_cache"
LOG_DIR = "logs"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid: its name, output directory and command line."""

    name: str
    out: Path
    command: tuple[str, ...]


def pair_list(text: str) -> list[tuple[str, str]]:
    """``"cub:oxford_pets,cub:nabird"`` -> ``[("cub", "oxford_pets"), ...]`` (argparse type)."""
    out = []
    for item in common.csv_list(text):
        a, sep, b = item.partition(":")
        if not sep or not a or not b:
            raise argparse.ArgumentTypeError(f"expected A:B pairs, got {item!r}")
        out.append((a, b))
    return out


def parser(
    prog: str = "python -m experiments.launch", experiment: str | None = None
) -> argparse.ArgumentParser:
    """The launcher's options (``--help`` lists them); with ``experiment`` fixed
    (the shell launchers) there is no positional argument."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a grid of the paper's experiments (dataset pairs x model orders x "
        "budgets x methods), one process, directory and result.json per run; "
        "finished runs are skipped.",
    )
    if experiment is None:
        p.add_argument("experiment", choices=EXPERIMENTS, help="which experiment's grid")
    else:
        p.set_defaults(experiment=experiment)
    g = p.add_argument_group("grid")
    g.add_argument(
        "--model-type",
        "--model_type",
        default="rn18",
        choices=sorted(common.MODEL_TYPES),
        help="rn18, rn50 or rn101 (default rn18); sets the paper's budgets",
    )
    g.add_argument(
        "--merging",
        "--methods",
        type=common.csv_list,
        default=["pleas_activation"],
        metavar="M[,M...]",
        help=f"merging methods, among {', '.join(common.METHODS)} (default "
        "pleas_activation); each is its own run",
    )
    g.add_argument(
        "--budgets",
        type=common.float_list,
        default=None,
        metavar="B[,B...]",
        help="budgets (default: the paper's for --model-type)",
    )
    g.add_argument(
        "--pairs",
        type=pair_list,
        default=None,
        metavar="A:B[,A:B...]",
        help="dataset pairs (default: the paper's pairs of the experiment)",
    )
    g.add_argument(
        "--orders",
        type=pair_list,
        default=list(common.ORDERS),
        metavar="VA:VB[,...]",
        help="model orders (default v1a:v1b,v1b:v1a)",
    )
    g = p.add_argument_group("merging")
    g.add_argument(
        "--ratios",
        type=common.csv_list,
        default=["optimized"],
        metavar="R[,R...]",
        help="ratio allocations: uniform, zip, optimized (default optimized)",
    )
    g.add_argument(
        "--use_zip_ratios",
        "--use-zip-ratios",
        action="store_true",
        help="the release's switch: --ratios zip",
    )
    g.add_argument(
        "--least-squares",
        "--least_squares",
        default="closed_form",
        choices=common.LEAST_SQUARES,
        help="least-squares mode (default closed_form)",
    )
    g.add_argument(
        "--max_steps",
        "--max-steps",
        "--gd-steps",
        dest="gd_steps",
        type=int,
        default=400,
        help="steps of --least-squares gd (default 400)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of each run (default 0)")
    g.add_argument("--images", type=int, default=1000, help="merge images per run (default 1000)")
    g.add_argument("--batch-size", type=int, default=100, help="batch size (default 100)")
    g.add_argument(
        "--matching-data",
        default=None,
        metavar="SPEC",
        help="PLeaS-free: merge images from this data spec",
    )
    g.add_argument(
        "--probe-epochs",
        type=int,
        default=50,
        help="linear-probe epochs of different_label_space (default 50)",
    )
    g = p.add_argument_group("data and checkpoints")
    g.add_argument(
        "--checkpoints",
        default=None,
        metavar="DIR",
        help=f"checkpoint tree (default ${common.ENV_CHECKPOINTS})",
    )
    g.add_argument(
        "--data_dir",
        "--data-dir",
        dest="data_dir",
        default=None,
        metavar="DIR",
        help="tfds data_dir; NABirds is looked for in DIR/nabirds/images",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side (default 224 for the release's checkpoints)",
    )
    g.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="read dataset NAME from this data spec (repeatable)",
    )
    g.add_argument("--mock-data", type=int, default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir",
        "--output-dir",
        dest="output_dir",
        default="experiment_runs",
        metavar="DIR",
        help="root of the runs' directories (default experiment_runs)",
    )
    g.add_argument(
        "--dry-run",
        "--dry_run",
        action="store_true",
        help="print the grid's N commands and run nothing",
    )
    g.add_argument(
        "--wandb",
        action="store_true",
        help="also log each finished run to Weights & Biases (if wandb is installed)",
    )
    g.add_argument("--wandb-project", default="pleas-jax", help="W&B project (default pleas-jax)")
    g.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    return p


def _check(args: argparse.Namespace) -> None:
    if args.use_zip_ratios:
        args.ratios = ["zip"]
    # Defaults from the environment become explicit absolute paths: they enter
    # the settings hash (runs on another checkpoint tree must not find this
    # one's finished) and every run gets them as given.
    if args.checkpoints is None:
        args.checkpoints = os.environ.get(common.ENV_CHECKPOINTS) or None
    if args.data_dir is None:
        args.data_dir = os.environ.get("TFDS_DATA_DIR") or None
    for name in ("checkpoints", "data_dir"):
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).expanduser().resolve()))
    nabirds = os.environ.get(common.ENV_NABIRDS)
    args.nabirds_dir = str(Path(nabirds).expanduser().resolve()) if nabirds else None
    if args.least_squares == "gd" and args.gd_steps < 1:
        raise common.ExperimentError(
            f"--max_steps must be positive for --least-squares gd, got {args.gd_steps}"
        )
    for name, least in (("images", 2), ("batch_size", 1), ("probe_epochs", 1)):
        if getattr(args, name) < least:
            raise common.ExperimentError(
                f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}"
            )
    bad = [m for m in args.merging if m not in common.METHODS]
    if bad or not args.merging:
        raise common.ExperimentError(
            f"unknown merging {bad[0] if bad else '(none)'}; choose "
            f"from {', '.join(common.METHODS)}"
        )
    bad = [r for r in args.ratios if r not in common.RATIOS]
    if bad or not args.ratios:
        raise common.ExperimentError(
            f"unknown ratios {bad[0] if bad else '(none)'}; choose from {', '.join(common.RATIOS)}"
        )
    names = common.DOMAINS if args.experiment == "shared_label_space" else common.FINE_GRAINED
    for pair in args.pairs or []:
        for name in pair:
            if name not in names:
                raise common.ExperimentError(
                    f"unknown dataset {name!r} in --pairs; choose from {', '.join(names)}"
                )
    for order in args.orders:
        for v in order:
            if v not in common.VARIANTS:
                raise common.ExperimentError(
                    f"unknown variant {v!r} in --orders; choose from {', '.join(common.VARIANTS)}"
                )
    for b in args.budgets or []:
        if not 1.0 <= b <= 2.0:
            raise common.ExperimentError(f"budget {b} is outside [1, 2]")
    for s in args.spec:
        common.spec_override(s)


def _settings_hash(args: argparse.Namespace) -> str:
    keys: tuple[str, ...] = (
        "seed",
        "images",
        "batch_size",
        "matching_data",
        "image_size",
        "data_dir",
        "checkpoints",
        "spec",
        "mock_data",
        "gd_steps",
    )
    if args.experiment == "different_label_space":
        keys += ("probe_epochs",)
    # Only where set: the hashes of runs that never had it stay as they were.
    if getattr(args, "nabirds_dir", None):
        keys += ("nabirds_dir",)
    text = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def grid(args: argparse.Namespace) -> list[Run]:
    """Every run of ``args``' grid, in launch order (pair, order, method, budget)."""
    shared = args.experiment == "shared_label_space"
    pairs = args.pairs or (common.DOMAINNET_PAIRS if shared else common.FINE_GRAINED_PAIRS)
    budgets = args.budgets or common.BUDGETS[args.model_type]
    out = Path(args.output_dir)
    digest = _settings_hash(args)
    runs = []
    for da, db in pairs:
        for va, vb in args.orders:
            for method in args.merging:
                # The settings the run's merges read, as the run resolves and
                # records them: its directory and command name no others.
                used = common.merge_settings(
                    [method], args.ratios, args.least_squares, args.gd_steps
                )
                ls = used["least_squares"] or "nols"
                tag = f"{method}_{'+'.join(used['ratios'])}_{ls}_{digest}"
                for b in budgets:
                    where = (
                        out
                        / args.experiment
                        / args.model_type
                        / f"{da}-{db}"
                        / f"{va}-{vb}"
                        / tag
                        / f"budget-{b:g}"
                    )
                    cmd = [
                        args.python,
                        "-m",
                        f"experiments.{args.experiment}",
                        "--domains" if shared else "--datasets",
                        f"{da},{db}",
                        "--model-type",
                        args.model_type,
                        "--variants",
                        f"{va},{vb}",
                        "--methods",
                        method,
                        "--ratios",
                        ",".join(used["ratios"]),
                        "--budgets",
                        f"{b:g}",
                        "--images",
                        str(args.images),
                        "--batch-size",
                        str(args.batch_size),
                        "--seed",
                        str(args.seed),
                        "--matching-cache",
                        str(out / CACHE_DIR),
                        "--output-dir",
                        str(where),
                    ]
                    optional = {
                        "--least-squares": used["least_squares"],
                        "--gd-steps": used["gd_steps"],
                        "--checkpoints": args.checkpoints,
                        "--data-dir": args.data_dir,
                        "--image-size": args.image_size,
                        "--matching-data": args.matching_data,
                        "--mock-data": args.mock_data,
                    }
                    if not shared:
                        optional["--probe-epochs"] = args.probe_epochs
                    for flag, value in optional.items():
                        if value is not None:
                            cmd += [flag, str(value)]
                    for s in args.spec:
                        cmd += ["--spec", s]
                    name = f"{args.model_type} {da}-{db} {va}-{vb} {method} budget {b:g}"
                    runs.append(Run(name, where, tuple(cmd)))
    return runs


def _env() -> dict[str, str]:
    # The runs import ``experiments`` from this checkout whatever the working directory.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _wandb_log(result: dict, run: Run, project: str) -> None:
    import wandb

    config = {k: result.get(k) for k in ("experiment", "model_type", "pair", "variants")}
    config.update(result.get("settings", {}))
    w = wandb.init(project=project, name=run.name, config=config, reinit=True)
    try:
        for row in result["results"]:
            w.log({k: v for k, v in row.items() if isinstance(v, int | float | str)})
        for who, scores in result["sources"].items():
            w.summary[f"{who}_accuracy"] = scores["accuracy"]
    finally:
        w.finish()


def launch(args: argparse.Namespace) -> int:
    """Run (or with ``--dry-run`` print) the grid; return the exit status (1 if
    any run failed)."""
    _check(args)
    runs = grid(args)
    n = len(runs)
    if args.dry_run:
        finished = sum(common.read_result(r.out) is not None for r in runs)
        for r in runs:
            print(shlex.join(r.command))
        print(f"# {n} runs ({finished} finished, would be skipped)")
        return 0
    use_wandb = False
    if args.wandb:
        try:
            import wandb  # noqa: F401

            use_wandb = True
        except ImportError:
            print("wandb is not installed (pip install wandb); results go to local JSON only")
    out = Path(args.output_dir)
    (out / LOG_DIR).mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = out / LOG_DIR / f"launch-{args.experiment}-{stamp}.log"
    counts = {"done": 0, "skipped": 0, "failed": 0}
    print(f"{n} runs; log: {log_path}", flush=True)
    with open(log_path, "a") as log:
        log.write(f"# {datetime.now().isoformat(timespec='seconds')} {shlex.join(sys.argv)}\n")
        for k, run in enumerate(runs, 1):
            head = f"run {k} of {n}: {run.name}"
            if common.read_result(run.out) is not None:
                counts["skipped"] += 1
                print(f"{head}: skipped (finished: {run.out})", flush=True)
                log.write(f"\n## {head}: skipped, {run.out}/{common.RESULT_FILE} exists\n")
                continue
            print(f"{head} ...", flush=True)
            log.write(f"\n## {head}\n$ {shlex.join(run.command)}\n")
            log.flush()
            t0 = time.perf_counter()
            proc = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT, env=_env())
            seconds = time.perf_counter() - t0
            log.write(f"## exit status {proc.returncode} ({seconds:.0f} s)\n")
            log.flush()
            result = common.read_result(run.out)
            if proc.returncode != 0 or result is None:
                counts["failed"] += 1
                print(f"{head}: FAILED (exit status {proc.returncode}; see {log_path})", flush=True)
                continue
            counts["done"] += 1
            print(f"{head}: done in {seconds:.0f} s", flush=True)
            if use_wandb:
                try:
                    _wandb_log(result, run, args.wandb_project)
                except Exception as e:  # W&B trouble must not stop the grid
                    print(f"  wandb logging failed: {e}", flush=True)
    print(
        f"{n} runs: {counts['done']} done, {counts['skipped']} skipped (finished), "
        f"{counts['failed']} failed; log: {log_path}",
        flush=True,
    )
    return 1 if counts["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The shell launchers fix the experiment and the program name shown by --help:
    # ``--launcher NAME EXPERIMENT`` before the user's options.
    prog, experiment = "python -m experiments.launch", None
    if argv[:1] == ["--launcher"] and len(argv) >= 3:
        prog, experiment, argv = argv[1], argv[2], argv[3:]
        if experiment not in EXPERIMENTS:
            print(f"{prog}: error: unknown experiment {experiment!r}", file=sys.stderr)
            return 2
    p = parser(prog, experiment)
    args = p.parse_args(argv)
    try:
        return launch(args)
    except (common.ExperimentError, argparse.ArgumentTypeError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
