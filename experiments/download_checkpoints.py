"""Download the PLeaS paper's checkpoints from its public S3 bucket with the AWS CLI.

The bucket ``s3://pleas-merging-artiacts-sewoonglab`` (spelled so) holds the
release's tree of PyTorch checkpoints::

    {model_type}/{dataset}/{variant}/model.pth            fine-grained sets, {'model': sd}
    {model_type}/domainnet/{domain}/{variant}/model.pth   DomainNet, plain state_dicts

(model types rn18, rn50, rn101; variants v1a, v1b, v2a, v2b). This runs
``aws s3 sync --no-sign-request`` (no AWS account needed) into a directory,
optionally restricted to some model types, datasets or DomainNet domains, and
prints the line to export ``MODEL_CHECKPOINTS_DIR``, which the experiments read::

    python -m experiments.download_checkpoints                     # ./pretrained_models/
    python -m experiments.download_checkpoints /data/pleas --model-type rn18 --dataset cub
    python -m experiments.download_checkpoints --dry-run           # print the command only
    eval "$(python -m experiments.download_checkpoints | tail -n 1)"

``sync`` only fetches what is missing or changed, so rerunning resumes. To
convert the tree to orbax checkpoints ahead of time: ``pleas-jax convert-tree
DIR DIR_flax``. Only the standard library is used, so any Python 3 runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

BUCKET = "s3://pleas-merging-artiacts-sewoonglab"
DEFAULT_DIR = "./pretrained_models/"
MODEL_TYPES = ("rn18", "rn50", "rn101")
# The sets the paper's launchers use; the bucket may hold more, so others are allowed.
DATASETS = ("cub", "oxford_pets", "stanford_dogs", "nabird", "domainnet")
DOMAINS = ("clipart", "painting", "infograph", "real")
ENV_VAR = "MODEL_CHECKPOINTS_DIR"
PROG = "download_checkpoints"
EXIT_FAILED = 1  # aws ran and failed
EXIT_ERROR = 2  # bad usage, or nothing to run the download with

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# What the AWS CLI (botocore) says when it cannot reach S3 at all.
_NETWORK_ERRORS = (
    "could not connect to the endpoint url",
    "endpointconnectionerror",
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "network is unreachable",
    "connection refused",
    "connect timeout",
    "read timeout",
    "timed out",
    "connection was closed",
    "no route to host",
    "failed to establish a new connection",
    "could not resolve",
)


class DownloadError(RuntimeError):
    """A download that cannot run or did not succeed; ``exit_status`` is the code to exit with."""

    def __init__(self, message: str, exit_status: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_status = exit_status


def include_patterns(
    model_types: Sequence[str] = (),
    datasets: Sequence[str] = (),
    domains: Sequence[str] = (),
) -> list[str]:
    """``aws s3 sync --include`` patterns for the chosen subset of the tree.

    Empty filters mean "all". ``domains`` narrow the ``domainnet`` dataset to
    those domains (and imply it). Returns ``[]`` when nothing is filtered (sync
    everything); otherwise patterns such as ``"rn18/cub/*"`` or
    ``"*/domainnet/clipart/*"`` (in the AWS CLI's filters ``*`` also matches ``/``).

    Raises:
      ValueError: a name that is not a plain path component.
    """
    for kind, names in (("model type", model_types), ("dataset", datasets), ("domain", domains)):
        for name in names:
            if not _NAME.fullmatch(name) or name in (".", ".."):
                raise ValueError(f"{kind} {name!r} is not a plain directory name")
    if not (model_types or datasets or domains):
        return []
    sets = list(dict.fromkeys(datasets))
    if domains and "domainnet" not in sets and sets:
        sets.append("domainnet")
    patterns = []
    for m in dict.fromkeys(model_types or ["*"]):
        for d in sets or ["*"]:
            if domains and d in ("domainnet", "*"):
                patterns += [f"{m}/domainnet/{dom}/*" for dom in dict.fromkeys(domains)]
            else:
                patterns.append(f"{m}/*" if d == "*" else f"{m}/{d}/*")
    return patterns


def build_command(
    output_dir: str | os.PathLike,
    *,
    model_types: Sequence[str] = (),
    datasets: Sequence[str] = (),
    domains: Sequence[str] = (),
    aws: str = "aws",
    bucket: str = BUCKET,
) -> list[str]:
    """The ``aws s3 sync`` command line (a list of arguments) that fetches the chosen subset."""
    cmd = [aws, "s3", "sync", "--no-sign-request", bucket, str(output_dir)]
    patterns = include_patterns(model_types, datasets, domains)
    if patterns:
        # Filters apply in order, later ones winning: drop everything, then take back.
        cmd += ["--exclude", "*"]
        for p in patterns:
            cmd += ["--include", p]
    return cmd


def export_line(output_dir: str | os.PathLike) -> str:
    """``export MODEL_CHECKPOINTS_DIR=<absolute dir>``, shell-quoted where needed."""
    return f"export {ENV_VAR}={shlex.quote(str(Path(output_dir).expanduser().absolute()))}"


def _no_aws_message(output_dir: Path) -> str:
    return (
        "the AWS CLI ('aws') is not on PATH. Install it (pip install awscli, or see "
        "https://aws.amazon.com/cli/) and run this again; or copy the checkpoint tree "
        "({model_type}/{dataset}/{variant}/model.pth) by hand into "
        f"{output_dir}, then convert it with: pleas-jax convert-tree {output_dir} "
        f"{output_dir}_flax"
    )


def is_network_error(stderr: str) -> bool:
    """Whether the AWS CLI's error output says it could not reach S3 at all."""
    text = stderr.lower()
    return any(s in text for s in _NETWORK_ERRORS)


def _failure_message(cmd: Sequence[str], status: int, stderr: str, output_dir: Path) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no error output"
    if is_network_error(stderr):
        portable = shlex.join(["aws", *cmd[1:]])  # not this machine's path to aws
        return (
            f"cannot reach {BUCKET} (no network, or S3 is blocked): {last} -- run "
            f"`{portable}` on a machine with internet access and copy {output_dir} here, or "
            "copy the checkpoint tree by hand; then convert it with: "
            f"pleas-jax convert-tree {output_dir} {output_dir}_flax"
        )
    return f"aws s3 sync failed (exit status {status}): {last}"


def download(
    output_dir: str | os.PathLike = DEFAULT_DIR,
    *,
    model_types: Sequence[str] = (),
    datasets: Sequence[str] = (),
    domains: Sequence[str] = (),
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> Path:
    """Sync the bucket (or the chosen subset) into ``output_dir``; returns it, absolute.

    ``aws`` writes its progress to this process's stdout; its stderr is
    captured to recognise network failures (and passed on to our stderr).
    ``which`` and ``run`` are injectable for tests.

    Raises:
      DownloadError: ``aws`` is not on PATH (``exit_status`` 2), or it failed
        (1); the message says what to install or do instead.
    """
    out = Path(output_dir).expanduser().absolute()
    aws = which("aws")
    if aws is None:
        raise DownloadError(_no_aws_message(out), EXIT_ERROR)
    if out.exists() and not out.is_dir():
        raise DownloadError(f"{out}: exists and is not a directory", EXIT_ERROR)
    cmd = build_command(out, model_types=model_types, datasets=datasets, domains=domains, aws=aws)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        proc = run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as e:
        proc = subprocess.CompletedProcess(cmd, 127, stderr=f"{aws}: {e}")
    if proc.returncode != 0:
        err = proc.stderr or ""
        if err.strip() and not is_network_error(err):
            # aws's own account of what went wrong; a network failure's is in our message.
            sys.stderr.write(err if err.endswith("\n") else err + "\n")
        if created and not any(out.iterdir()):
            out.rmdir()  # leave no empty directory behind a failed first download
        raise DownloadError(_failure_message(cmd, proc.returncode, err, out))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m experiments.download_checkpoints``."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.download_checkpoints",
        description=(
            f"Download the PLeaS paper's PyTorch checkpoints from {BUCKET} with "
            "`aws s3 sync --no-sign-request` (needs the AWS CLI, no account) and print the line "
            f"`export {ENV_VAR}=<absolute dir>`. The tree is "
            "{rn18,rn50,rn101}/{dataset}/{v1a,v1b,v2a,v2b}/model.pth and "
            "{model_type}/domainnet/{domain}/{variant}/model.pth. Rerunning fetches only what "
            "is missing. Convert it ahead of time with `pleas-jax convert-tree DIR DST`."
        ),
    )
    p.add_argument(
        "dir",
        nargs="?",
        default=None,
        metavar="DIR",
        help=f"where to put the tree (default {DEFAULT_DIR})",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="same as DIR (the original script's spelling)",
    )
    p.add_argument(
        "--model-type",
        "--model_type",
        action="append",
        default=[],
        choices=MODEL_TYPES,
        dest="model_types",
        help="only this model type (repeatable; default all)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        dest="datasets",
        metavar="NAME",
        help=f"only this dataset, e.g. {', '.join(DATASETS)} (repeatable; default all)",
    )
    p.add_argument(
        "--domain",
        action="append",
        default=[],
        dest="domains",
        metavar="NAME",
        help=f"only this DomainNet domain, e.g. {', '.join(DOMAINS)} (repeatable)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the aws command (and the export line) without running it",
    )
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> int:
    """Entry point; returns the exit status (0, 1: aws failed, 2: usage or no aws)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dir is not None and args.output_dir is not None and args.dir != args.output_dir:
        parser.error(f"two output directories given: {args.dir} and --output-dir {args.output_dir}")
    output_dir = args.dir or args.output_dir or DEFAULT_DIR
    try:
        include_patterns(args.model_types, args.datasets, args.domains)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        out = Path(output_dir).expanduser().absolute()
        print(
            shlex.join(
                build_command(
                    out, model_types=args.model_types, datasets=args.datasets, domains=args.domains
                )
            )
        )
        print(export_line(out))
        return 0
    try:
        out = download(
            output_dir,
            model_types=args.model_types,
            datasets=args.datasets,
            domains=args.domains,
            which=which,
            run=run,
        )
    except DownloadError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; rerun to resume (sync fetches only what is missing)",
            file=sys.stderr,
        )
        return 130
    n = sum(1 for _ in out.rglob("model.pth"))
    print(
        f"downloaded into {out} ({n} model.pth files); to convert ahead of time: "
        f"pleas-jax convert-tree {shlex.quote(str(out))} {shlex.quote(str(out) + '_flax')}"
    )
    print(export_line(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
