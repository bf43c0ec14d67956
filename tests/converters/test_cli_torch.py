"""The torch-side commands' shared options: ``--verify`` / ``--no-verify``,
``--tolerance`` and convert-tree's ``--report`` (alias ``--json``)."""

import json

import pytest
import torch

from pleas_jax.cli import build_parser, main
from tests.converters.helpers import resnet20_torch

# command -> (positional arguments, whether it verifies by default)
COMMANDS = {
    "convert": (["in.pth", "out"], False),
    "export": (["ckpt", "out.pth"], True),
    "convert-tree": (["src", "dst"], True),
}


def parse(command, *options):
    return build_parser().parse_args([command, *COMMANDS[command][0], *options])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_both_verify_flags_and_keeps_its_default(command):
    default = COMMANDS[command][1]
    assert parse(command).verify is default
    assert parse(command, "--verify").verify is True
    assert parse(command, "--no-verify").verify is False
    assert parse(command, "--verify", "--no-verify").verify is False  # the last one wins


@pytest.mark.parametrize("command", COMMANDS)
def test_the_help_states_the_verify_default(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--verify, --no-verify" in out
    assert f"(default: {'--verify' if COMMANDS[command][1] else '--no-verify'})" in out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("value", ["-1", "-1e-4", "nan", "inf", "-inf", "1e-4x"])
def test_a_tolerance_no_check_could_meet_is_a_usage_error(command, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse(command, f"--tolerance={value}")  # "=": argparse reads "-1e-4" as an option
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tolerance" in err and "finite relative difference >= 0" in err
    assert repr(value) in err


@pytest.mark.parametrize("command", COMMANDS)
def test_finite_tolerances_are_taken(command):
    assert parse(command).tolerance == 1e-4
    assert parse(command, "--tolerance", "1e-3").tolerance == 1e-3
    assert parse(command, "--tolerance", "0").tolerance == 0.0  # exact agreement


@pytest.mark.parametrize("flag", ["--report", "--json"])
def test_convert_tree_writes_its_rows_with_report_or_json(flag, tmp_path, capsys):
    assert parse("convert-tree").report is None
    src = tmp_path / "src" / "r20"
    src.mkdir(parents=True)
    torch.save(resnet20_torch(width=4).state_dict(), src / "model.pth")
    rows = tmp_path / "rows.json"
    argv = ["convert-tree", tmp_path / "src", tmp_path / "dst", flag, rows]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    (row,) = json.loads(rows.read_text())
    assert row["status"] == "converted" and row["arch"] == "resnet20"
    assert row["max_rel"] is not None  # verified by default
