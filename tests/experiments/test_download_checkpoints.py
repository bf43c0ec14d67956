"""download_checkpoints: arguments, and the messages without aws or network (all offline).

A fake ``aws`` (a shell script first on PATH) stands in for the AWS CLI.
"""

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import download_checkpoints as dl

REPO = Path(__file__).resolve().parents[2]
BUCKET = "s3://pleas-merging-artiacts-sewoonglab"


def fake_aws(bin_dir: Path, body: str) -> Path:
    """An executable ``aws`` in ``bin_dir`` running the shell ``body`` (args in "$@")."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "aws"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# A sync that writes the release layout under its destination (argument 5: aws s3 sync
# --no-sign-request BUCKET DIR ...) and records its arguments.
SYNC_OK = """
echo "$@" > "$(dirname "$0")/args.txt"
dst="$5"
for p in rn18/cub/v1a rn18/domainnet/clipart/v1b; do
  mkdir -p "$dst/$p" && echo fake > "$dst/$p/model.pth"
  echo "download: $p/model.pth"
done
"""
NETWORK_DOWN = """
echo 'fatal error: Could not connect to the endpoint URL: "https://x.s3.amazonaws.com/"' >&2
exit 1
"""


def run_main(argv, capsys, **kw):
    rc = dl.main([str(a) for a in argv], **kw)
    out, err = capsys.readouterr()
    return rc, out, err


def test_include_patterns_and_command():
    assert dl.include_patterns() == []
    assert dl.include_patterns(["rn18"]) == ["rn18/*"]
    assert dl.include_patterns(datasets=["cub"]) == ["*/cub/*"]
    assert dl.include_patterns(["rn18", "rn50"], ["cub", "domainnet"], ["clipart"]) == [
        "rn18/cub/*",
        "rn18/domainnet/clipart/*",
        "rn50/cub/*",
        "rn50/domainnet/clipart/*",
    ]
    assert dl.include_patterns(domains=["real"]) == ["*/domainnet/real/*"]
    with pytest.raises(ValueError, match="not a plain directory name"):
        dl.include_patterns(datasets=["../etc"])
    cmd = dl.build_command("/d", model_types=["rn101"])
    assert cmd == [
        "aws",
        "s3",
        "sync",
        "--no-sign-request",
        BUCKET,
        "/d",
        "--exclude",
        "*",
        "--include",
        "rn101/*",
    ]
    assert dl.build_command("/d") == ["aws", "s3", "sync", "--no-sign-request", BUCKET, "/d"]


def test_dry_run_prints_command_and_export_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def no_run(*a, **k):
        raise AssertionError("a dry run must not run aws")

    rc, out, err = run_main(
        ["--dry-run", "--model-type", "rn18", "--dataset", "cub"], capsys, run=no_run
    )
    assert rc == 0 and err == ""
    cmd, export = out.strip().splitlines()
    want = tmp_path / "pretrained_models"
    assert shlex.split(cmd) == [
        "aws",
        "s3",
        "sync",
        "--no-sign-request",
        BUCKET,
        str(want),
        "--exclude",
        "*",
        "--include",
        "rn18/cub/*",
    ]
    assert export == f"export MODEL_CHECKPOINTS_DIR={want}"
    assert not want.exists()
    # DIR positionally or as the original --output-dir; both at once must agree.
    assert run_main(["x", "--dry-run"], capsys)[1].endswith(f"={tmp_path / 'x'}\n")
    assert run_main(["--output-dir", "y", "--dry-run"], capsys)[1].endswith(f"={tmp_path / 'y'}\n")
    with pytest.raises(SystemExit) as e:
        dl.main(["a", "--output-dir", "b"])
    assert e.value.code == 2
    assert "two output directories" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-type", "rn34"], "invalid choice: 'rn34'"),
        (["--dataset", "a/b"], "not a plain directory name"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        dl.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        dl.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "pleas-merging-" in out and "sewoonglab" in out  # argparse may wrap the name
    assert "--dry-run" in out and "--model-type" in out


def test_without_aws_says_what_to_install(tmp_path, monkeypatch, capsys):
    # Injected lookup, and a PATH holding no aws: both end in the same message.
    for kw in ({"which": lambda name: None}, {}):
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
        rc, out, err = run_main([tmp_path / "models"], capsys, **kw)
        assert rc == 2 and out == ""
        assert err.startswith("download_checkpoints: error: the AWS CLI ('aws') is not on PATH")
        assert "pip install awscli" in err and "pleas-jax convert-tree" in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "models").exists()


def test_network_failure_message(tmp_path, monkeypatch, capsys):
    fake_aws(tmp_path / "bin", NETWORK_DOWN)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    rc, out, err = run_main([tmp_path / "models", "--dataset", "cub"], capsys)
    assert rc == 1 and "export" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"download_checkpoints: error: cannot reach {BUCKET}")
    assert "Could not connect to the endpoint URL" in lines[0]
    assert "copy the checkpoint tree by hand" in lines[0] and "convert-tree" in lines[0]
    # The suggested command names plain `aws`, not this machine's fake.
    assert "`aws s3 sync --no-sign-request" in lines[0] and str(tmp_path / "bin") not in lines[0]
    assert not (tmp_path / "models").exists()  # no empty directory left behind


def test_other_aws_failure_is_passed_on(tmp_path, monkeypatch, capsys):
    fake_aws(tmp_path / "bin", "echo 'An error occurred (AccessDenied)' >&2; exit 255")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    existing = tmp_path / "models"
    existing.mkdir()
    rc, _, err = run_main([existing], capsys)
    assert rc == 1
    assert "An error occurred (AccessDenied)" in err
    assert "aws s3 sync failed (exit status 255): An error occurred (AccessDenied)" in err
    assert existing.is_dir()  # never remove what was there before


def test_success_prints_export_line(tmp_path, monkeypatch, capsys):
    aws = fake_aws(tmp_path / "bin", SYNC_OK)
    monkeypatch.setenv("PATH", f"{aws.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main(["--model-type", "rn18"], capsys)
    assert rc == 0, err
    want = tmp_path / "pretrained_models"
    assert (want / "rn18/cub/v1a/model.pth").is_file()
    args = (aws.parent / "args.txt").read_text().split()
    assert args == [
        "s3",
        "sync",
        "--no-sign-request",
        BUCKET,
        str(want),
        "--exclude",
        "*",
        "--include",
        "rn18/*",
    ]
    lines = out.strip().splitlines()
    assert lines[-1] == f"export MODEL_CHECKPOINTS_DIR={want}"
    assert "(2 model.pth files)" in lines[-2] and "pleas-jax convert-tree" in lines[-2]


def test_shell_wrapper(tmp_path):
    aws = fake_aws(tmp_path / "bin", SYNC_OK)
    env = {
        **os.environ,
        "PATH": f"{aws.parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
    }
    script = REPO / "experiments" / "download_checkpoints.sh"
    assert os.access(script, os.X_OK)
    dry = subprocess.run(
        [str(script), "d", "--dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0].startswith("aws s3 sync --no-sign-request " + BUCKET)
    real = subprocess.run(
        [str(script), "space dir"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert real.returncode == 0, real.stderr
    export = real.stdout.strip().splitlines()[-1]
    assert export == f"export MODEL_CHECKPOINTS_DIR={shlex.quote(str(tmp_path / 'space dir'))}"
    # The line works as meant: the shell sees the absolute directory.
    shown = subprocess.run(
        ["sh", "-c", f'{export}; printf %s "$MODEL_CHECKPOINTS_DIR"'],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert shown == str(tmp_path / "space dir")
