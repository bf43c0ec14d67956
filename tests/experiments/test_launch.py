"""Launch grids: dry runs, resume, logs; the shell launchers; one tiny real run on mock data."""

import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from experiments import common, different_label_space, launch, report
from tests.experiments.conftest import BATCH, IMAGES, MOCK, SIZE

ROOT = Path(__file__).resolve().parents[2]
SHELL = {e: ROOT / "experiments" / f"launch_{e}.sh" for e in launch.EXPERIMENTS}


def _commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("experiment", launch.EXPERIMENTS)
def test_dry_run_lists_the_papers_grid(experiment, tmp_path, capsys):
    assert launch.main([experiment, "--dry-run", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cmds = _commands(out)
    # 6 pairs x 2 model orders x 5 rn18 budgets.
    assert len(cmds) == 60 and out.rstrip().endswith("# 60 runs (0 finished, would be skipped)")
    assert all(f"-m experiments.{experiment}" in c for c in cmds)
    dirs = {c.split("--output-dir ")[1].split()[0] for c in cmds}
    assert len(dirs) == 60 and not any(Path(d).exists() for d in dirs)
    assert sum("--variants v1b,v1a" in c for c in cmds) == 30
    assert {c.split("--budgets ")[1].split()[0] for c in cmds} == {"1", "1.24", "1.46", "1.71", "2"}
    flag = "--domains" if experiment == "shared_label_space" else "--datasets"
    pairs = {c.split(f"{flag} ")[1].split()[0] for c in cmds}
    expected = (
        common.DOMAINNET_PAIRS if experiment == "shared_label_space" else common.FINE_GRAINED_PAIRS
    )
    assert pairs == {f"{a},{b}" for a, b in expected}
    # Two methods, rn101's budgets: twice the runs, rn101's grid.
    assert (
        launch.main(
            [
                experiment,
                "--dry-run",
                "--model_type",
                "rn101",
                "--merging",
                "pleas_weight,zipit",
                "--use_zip_ratios",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    cmds = _commands(capsys.readouterr().out)
    assert len(cmds) == 120 and all("--ratios zip" in c for c in cmds)
    assert {c.split("--budgets ")[1].split()[0] for c in cmds} == {"1", "1.1", "1.7", "1.8", "2"}


def test_dry_run_commands_name_the_settings_their_runs_use(tmp_path, capsys):
    """Each printed command, read as its run reads it, has the ratios and least
    squares its directory names: ZipIt! merges with zip ratios and no least
    squares, whatever --ratios and --least-squares say."""
    argv = ["different_label_space", "--dry-run", "--pairs", "cub:oxford_pets"]
    argv += ["--orders", "v1a:v1b", "--budgets", "1.5", "--merging", ",".join(common.METHODS)]
    for extra in (
        ["--ratios", "optimized"],
        ["--ratios", "zip,optimized", "--least-squares", "gd"],
    ):
        assert launch.main([*argv, *extra, "--output_dir", str(tmp_path)]) == 0
        cmds = _commands(capsys.readouterr().out)
        assert len(cmds) == len(common.METHODS)
        for cmd in cmds:
            args = different_label_space.parser().parse_args(shlex.split(cmd)[3:])
            common.check_common(args)
            used = common.settings(args)  # what the run records
            ls = used["least_squares"] or "nols"
            (method,) = args.methods
            tag = Path(args.output_dir).parent.name
            assert tag.startswith(f"{method}_{'+'.join(used['ratios'])}_{ls}_"), cmd
            # The command names no setting the run does not use.
            assert args.ratios == used["ratios"], cmd
            assert ("--least-squares" in cmd) == (used["least_squares"] is not None), cmd
            assert ("--gd-steps" in cmd) == (used["gd_steps"] is not None), cmd
        zipit = next(c for c in cmds if "--methods zipit" in c)
        assert "--ratios zip " in zipit and "/zipit_zip_nols_" in zipit


FAKE_PYTHON = """#!/bin/sh
# Stands in for python: writes a finished result.json into --output-dir, except
# for the budget named by FAIL_BUDGET, where it fails.
out=""; budget=""
while [ $# -gt 0 ]; do
  case "$1" in --output-dir) out="$2"; shift;; --budgets) budget="$2"; shift;; esac; shift
done
echo "fake run at budget $budget"
if [ "$budget" = "${FAIL_BUDGET:-none}" ]; then echo "boom" >&2; exit 3; fi
mkdir -p "$out" && cat > "$out/result.json" <<EOF
{"status": "done", "experiment": "different_label_space", "model_type": "rn18",
 "pair": ["cub", "nabird"], "variants": ["v1a", "v1b"], "settings": {"seed": 0},
 "sources": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25}, "ensemble": {"accuracy": 0.75}},
 "results": [{"method": "pleas_activation", "budget": $budget, "accuracy": 0.5}]}
EOF
"""


class FakeWandb:
    """Records what the launcher logs to Weights & Biases."""

    def __init__(self):
        self.runs = []

    def init(self, project, name, config, reinit):
        run = types.SimpleNamespace(
            project=project, name=name, config=config, logged=[], summary={}, finished=False
        )
        run.log = run.logged.append
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_resume_skips_finished_runs_and_logs_everything(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "runs"
    args = [
        "different_label_space",
        "--python",
        str(fake),
        "--pairs",
        "cub:nabird",
        "--budgets",
        "1,1.5,2",
        "--output_dir",
        str(out),
        "--wandb",
    ]
    monkeypatch.setenv("FAIL_BUDGET", "1.5")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert launch.main(args) == 1
    first = capsys.readouterr().out
    assert "wandb is not installed" in first
    assert "run 1 of 6: rn18 cub-nabird v1a-v1b pleas_activation budget 1: done" in first
    assert "run 2 of 6: rn18 cub-nabird v1a-v1b pleas_activation budget 1.5: FAILED" in first
    assert "6 runs: 4 done, 0 skipped (finished), 2 failed" in first
    (log,) = (out / "logs").glob("launch-different_label_space-*.log")
    text = log.read_text()
    assert text.count("$ ") == 6 and "fake run at budget 1.5" in text and "boom" in text
    assert "exit status 3" in text
    assert len(list(out.rglob(common.RESULT_FILE))) == 4

    # The dry run knows what is finished; the rerun runs only the failed ones.
    monkeypatch.delenv("FAIL_BUDGET")
    assert launch.main([*args, "--dry-run"]) == 0
    assert "# 6 runs (4 finished, would be skipped)" in capsys.readouterr().out
    assert launch.main(args) == 0
    second = capsys.readouterr().out
    assert "6 runs: 2 done, 4 skipped (finished), 0 failed" in second
    assert "run 1 of 6: rn18 cub-nabird v1a-v1b pleas_activation budget 1: skipped" in second
    assert len(list(out.rglob(common.RESULT_FILE))) == 6
    assert json.loads(next(out.rglob(common.RESULT_FILE)).read_text())["status"] == "done"
    # With wandb installed, each finished run is logged (local JSON all the same).
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    assert (
        launch.main([*args, "--budgets", "1,1.25", "--orders", "v1a:v1b", "--wandb-project", "p"])
        == 0
    )
    assert "1 done, 1 skipped" in capsys.readouterr().out
    (run,) = wandb.runs
    assert run.project == "p" and run.name.endswith("budget 1.25") and run.finished
    assert run.logged == [{"method": "pleas_activation", "budget": 1.25, "accuracy": 0.5}]
    assert run.summary == {"a_accuracy": 0.5, "b_accuracy": 0.25, "ensemble_accuracy": 0.75}
    # Each run has its own directory; other settings get other directories.
    assert launch.main([*args, "--seed", "1", "--dry-run"]) == 0
    assert "# 6 runs (0 finished" in capsys.readouterr().out


def test_bad_options_are_one_line(tmp_path, capsys):
    assert launch.main(["shared_label_space", "--pairs", "clipart:cub", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown dataset 'cub' in --pairs" in err


@pytest.mark.parametrize("experiment", launch.EXPERIMENTS)
def test_shell_launchers_help_and_dry_run(experiment, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(
        [str(SHELL[experiment]), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: launch_{experiment}.sh")
    for opt in (
        "--data_dir",
        "--model_type",
        "--merging",
        "--max_steps",
        "--seed",
        "--output_dir",
        "--use_zip_ratios",
        "--least-squares",
        "--ratios",
        "--dry-run",
        "--wandb",
    ):
        assert opt in res.stdout
    res = subprocess.run(
        [
            str(SHELL[experiment]),
            "--model_type",
            "rn50",
            "--merging",
            "pleas_activation",
            "--max_steps",
            "50",
            "--seed",
            "2",
            "--output_dir",
            "out",
            "--data_dir",
            "data",
            "--least-squares",
            "gd",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout)
    assert len(cmds) == 60
    assert all(
        "--least-squares gd --gd-steps 50" in c
        and "--seed 2" in c
        # Made absolute: the runs and the settings hash see one directory.
        and f"--data-dir {(tmp_path / 'data').resolve()}" in c
        and "--output-dir out/" in c
        for c in cmds
    )
    assert {c.split("--budgets ")[1].split()[0] for c in cmds} == {"1", "1.2", "1.55", "1.8", "2"}


def test_tiny_real_run_through_the_shell_launcher_and_report(domainnet_tree, tmp_path):
    out = tmp_path / "runs"
    cmd = [
        str(SHELL["shared_label_space"]),
        "--checkpoints",
        str(domainnet_tree),
        "--pairs",
        "clipart:painting",
        "--orders",
        "v1a:v1b",
        "--budgets",
        "1",
        "--merging",
        "zipit",
        "--images",
        str(IMAGES),
        "--batch-size",
        str(BATCH),
        "--image-size",
        str(SIZE),
        "--mock-data",
        str(MOCK),
        "--output_dir",
        str(out),
    ]
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "run 1 of 1: rn18 clipart-painting v1a-v1b zipit budget 1: done" in res.stdout
    (file,) = out.rglob(common.RESULT_FILE)
    result = json.loads(file.read_text())
    assert result["status"] == "done" and result["pair"] == ["clipart", "painting"]
    (row,) = result["results"]
    assert (row["method"], row["ratios"], row["budget"]) == ("zipit", "zip", 1.0)
    # The record, its command and its directory agree on the settings merged with.
    s = result["settings"]
    assert (s["ratios"], s["least_squares"], s["gd_steps"]) == (["zip"], None, None)
    assert "--ratios zip " in result["command"] and "--least-squares" not in result["command"]
    assert file.parent.parent.name.startswith("zipit_zip_nols_")
    assert row["achieved_budget"] == pytest.approx(1.0, abs=1e-6)
    assert len(list((out / "matching_cache").glob("*.npz"))) == 1
    # Resumed: nothing left to run.
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "1 runs: 0 done, 1 skipped (finished), 0 failed" in res.stdout

    # The report reads the run (plus a synthetic second order) into tables and a plot.
    other = json.loads(file.read_text())
    other["variants"] = ["v1b", "v1a"]
    other["results"][0]["accuracy"] = 0.5
    other["sources"]["ensemble"]["accuracy"] = 0.75
    (out / "extra").mkdir()
    (out / "extra" / common.RESULT_FILE).write_text(json.dumps(other))
    rep = report.report([out], tmp_path / "report")
    assert rep["runs"] == 2
    mean = 100 * (row["accuracy"] + 0.5) / 2
    ens = 100 * (result["sources"]["ensemble"]["accuracy"] + 0.75) / 2
    # The tiny models are no preset's structure, whatever the tree's directory.
    assert "### shared_label_space, custom, clipart + painting: accuracy (%)" in rep["markdown"]
    assert f"| ZipIt!-style partial merging | {mean:.2f} |" in rep["markdown"]
    assert f"ensemble {ens:.2f}" in rep["markdown"]
    png = tmp_path / "report" / "accuracy_vs_budget_shared_label_space_custom.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_text = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert csv_text[0].startswith("file,experiment,model_type,pair,datasets,variants")
    assert len(csv_text) == 1 + 2 * 4  # per run: model A, model B, ensemble, one merge
    assert "accuracy:infograph" in csv_text[0]


def _dirs(argv, capsys):
    assert launch.main(argv) == 0
    return {c.split("--output-dir ")[1].split()[0] for c in _commands(capsys.readouterr().out)}


def test_the_environments_checkpoint_tree_is_part_of_the_settings(tmp_path, monkeypatch, capsys):
    """Runs on another tree (set through $MODEL_CHECKPOINTS_DIR) must not be
    skipped as the first tree's finished runs."""
    argv = ["different_label_space", "--dry-run", "--pairs", "cub:oxford_pets"]
    argv += ["--output_dir", str(tmp_path / "runs")]
    monkeypatch.setenv(common.ENV_CHECKPOINTS, str(tmp_path / "treeA"))
    a = _dirs(argv, capsys)
    monkeypatch.setenv(common.ENV_CHECKPOINTS, str(tmp_path / "treeB"))
    b = _dirs(argv, capsys)
    assert a and not a & b
    # The same tree named by the option or by the environment: the same runs.
    monkeypatch.delenv(common.ENV_CHECKPOINTS)
    assert _dirs([*argv, "--checkpoints", str(tmp_path / "treeA")], capsys) == a


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--least-squares", "gd", "--max_steps", "0"], "--max_steps must be positive"),
        (["--images", "1"], "--images must be at least 2"),
        (["--probe-epochs", "0"], "--probe-epochs must be at least 1"),
    ],
)
def test_bad_settings_are_refused_before_any_run(extra, message, tmp_path, capsys):
    argv = ["different_label_space", "--dry-run", "--output_dir", str(tmp_path), *extra]
    assert launch.main(argv) == 2
    assert message in capsys.readouterr().err
