"""The ``pleas-jax`` command: convert, help, and one-line errors that leave nothing behind.

(train, merge, eval: tests/test_cli_train_merge.py; demo: tests/test_demo.py.)
"""

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from converters import TorchResNet, randomize_batch_norm, state_dict_to_flax
from pleas_jax import checkpoint, models, workflow
from pleas_jax.cli import build_parser, main
from pleas_jax.data import IMAGENET_NORMALIZATION as IMAGENET

TOLERANCE = 1e-4


def run(argv, capsys):
    """``main(argv)`` in process; returns (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def rel_diff(stdout):
    m = re.search(r"max abs diff (\S+), max rel diff (\S+)", stdout)
    assert m, stdout
    return float(m.group(2))


def _torchvision_sd(arch, num_classes=1000, seed=0):
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return randomize_batch_norm(net, seed).state_dict()


def _resnet20_sd(seed=0):
    torch.manual_seed(seed)
    return randomize_batch_norm(TorchResNet(models.resnet20(num_classes=10)), seed).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    r50 = _torchvision_sd("resnet50", num_classes=37)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in r50.items()}, "epoch": 90}, d / "dp.pth"
    )
    torch.save(r50, d / "plain.pth")
    r20 = _resnet20_sd()
    torch.save(r20, d / "r20.pth")
    save_file({k: v.contiguous() for k, v in r20.items()}, str(d / "r20.safetensors"))
    return {"dir": d, "r50": r50, "r20": r20}


@pytest.fixture
def outs(tmp_path):
    """An empty directory for outputs: anything left in it after a failure is a leak."""
    d = tmp_path / "outs"
    d.mkdir()
    return d


# -------------------------------------------------------------------- convert
def test_convert_auto_resnet50_dataparallel_37_classes(files, outs, capsys):
    src = files["dir"] / "dp.pth"
    rc, out, err = run(["convert", src, outs / "r50", "--arch", "auto", "--verify"], capsys)
    assert rc == 0, err
    print(out)
    assert "resnet50" in out and "37 classes" in out
    assert "max abs diff" in out and rel_diff(out) <= TOLERANCE
    module, variables = checkpoint.load(outs / "r50")
    assert module.config() == models.resnet("resnet50", 37).config()
    meta = checkpoint.load_metadata(outs / "r50")
    assert meta["arch"] == "resnet50" and meta["num_classes"] == 37
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["config"]["stream_widths"] == [256, 512, 1024, 2048]
    # How merge and eval will read inputs: torchvision's ImageNet recipe.
    assert meta["image_size"] == 224 and meta["normalization"] == IMAGENET
    assert meta["crop"] == 0.875
    np.testing.assert_array_equal(
        np.asarray(variables["params"]["fc"]["kernel"]), files["r50"]["fc.weight"].numpy().T
    )

    # The same weights saved as a plain state_dict give the same checkpoint arrays;
    # the recorded inputs follow the flags.
    rc, out, err = run(
        [
            "convert",
            files["dir"] / "plain.pth",
            outs / "plain",
            "--verify",
            "--image-size",
            "96",
            "--normalization",
            "data",
            "--crop",
            "none",
        ],
        capsys,
    )
    assert rc == 0, err
    model = workflow.load_model(outs / "plain")
    assert model.image_size == 96 and model.normalization is None and model.crop is None
    _, plain = checkpoint.load(outs / "plain")
    _, expect = state_dict_to_flax(files["r50"])
    for coll in ("params", "batch_stats"):
        for a, b in zip(jax.tree.leaves(plain[coll]), jax.tree.leaves(expect[coll]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in outs.iterdir()) == ["plain", "r50"]


def test_convert_safetensors_and_named_arch(files, outs, capsys):
    rc, out, err = run(
        [
            "convert",
            files["dir"] / "r20.safetensors",
            outs / "new" / "r20",  # convert makes the missing folder
            "--arch",
            "resnet20",
            "--num-classes",
            "10",
            "--verify",
        ],
        capsys,
    )
    assert rc == 0, err
    assert rel_diff(out) <= TOLERANCE
    assert checkpoint.load_metadata(outs / "new" / "r20")["arch"] == "resnet20"


def test_convert_ema(files, outs, capsys, tmp_path):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in files["r20"].items()}
    src = tmp_path / "ema.pth"
    torch.save({"model": files["r20"], "model_ema": ema}, src)
    assert run(["convert", src, outs / "ema", "--ema"], capsys)[0] == 0
    _, variables = checkpoint.load(outs / "ema")
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["bias"]), ema["fc.bias"])
    assert checkpoint.load_metadata(outs / "ema")["ema"] is True


def test_existing_output_needs_overwrite(files, outs, capsys):
    src = files["dir"] / "r20.pth"
    assert run(["convert", src, outs / "r20"], capsys)[0] == 0
    # A CIFAR stem: 32 px, and each data spec's own normalisation.
    meta = checkpoint.load_metadata(outs / "r20")
    assert meta["image_size"] == 32 and meta["normalization"] is None and meta["crop"] is None
    rc, _, err = run(["convert", src, outs / "r20"], capsys)
    assert rc == 2 and "already exists" in err
    assert run(["convert", src, outs / "r20", "--overwrite"], capsys)[0] == 0
    assert [p.name for p in outs.iterdir()] == ["r20"]


def test_verify_above_tolerance_fails_and_writes_nothing(files, outs, capsys):
    rc, out, err = run(
        ["convert", files["dir"] / "r20.pth", outs / "r20", "--verify", "--tolerance", "0"], capsys
    )
    assert rc == 1
    assert "max rel diff" in out
    assert err.startswith("pleas-jax: error: verification failed") and err.count("\n") == 1
    assert list(outs.iterdir()) == []


# ---------------------------------------------------------------- bad inputs
def _bad_file(kind, d, r20):
    path = d / f"{kind}.pth"
    sd = {k: v.clone() for k, v in r20.items()}
    if kind == "truncated":
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "custom-class":
        torch.save({"model": sd, "config": Config()}, path)
    elif kind == "other-arch":
        torch.save(_torchvision_sd("resnet18", num_classes=10), path)
    elif kind == "missing-key":
        del sd["layer3.2.bn2.weight"]
        torch.save(sd, path)
    elif kind == "shape":
        sd["layer2.0.conv2.weight"] = torch.zeros(32, 16, 3, 3)
        torch.save(sd, path)
    elif kind == "nan":
        sd["layer1.1.bn1.running_var"][3] = float("nan")
        torch.save(sd, path)
    elif kind == "inf":
        sd["layer3.0.downsample.0.weight"].view(-1)[0] = -float("inf")
        torch.save(sd, path)
    return path


class Config:
    """A custom class: unpickling it would need this module's code."""


@pytest.mark.parametrize(
    "kind, args, message",
    [
        ("missing", [], r"missing\.pth: no such file"),
        ("truncated", [], r"cannot read it as a PyTorch checkpoint \(truncated"),
        ("custom-class", [], r"refuses to unpickle code .*Config.*not a plain state_dict"),
        ("other-arch", ["--arch", "resnet34"], r"holds a resnet18 .*not the requested resnet34"),
        ("missing-key", [], r"lacks 'layer3\.2\.bn2\.weight'"),
        ("shape", ["--arch", "resnet20"], r"'layer2\.0\.conv2\.weight' has shape \(32, 16, 3, 3\)"),
        ("nan", [], r"'layer1\.1\.bn1\.running_var' is not finite: 1 NaN"),
        ("inf", [], r"'layer3\.0\.downsample\.0\.weight' is not finite: 0 NaN and 1 inf"),
        ("num-classes", ["--num-classes", "100"], r"10 classes but num_classes=100"),
    ],
)
def test_bad_input_one_line_error_and_no_output(files, outs, tmp_path, capsys, kind, args, message):
    src = tmp_path / "missing.pth"
    if kind == "num-classes":
        src = files["dir"] / "r20.pth"
    elif kind != "missing":
        src = _bad_file(kind, tmp_path, files["r20"])
    rc, out, err = run(["convert", src, outs / "out", *args], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("pleas-jax: error: "), err
    assert re.search(message, err), err
    assert "Traceback" not in err + out
    assert list(outs.iterdir()) == []


# ---------------------------------------------------------------------- help
@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pleas-jax")
    if argv == ["--help"]:
        assert "convert" in out and "demo" in out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert"])
    assert e.value.code == 2
    assert "the following arguments are required: IN, OUT" in capsys.readouterr().err
    for command in (["convert", "a.pth", "b"], ["eval", "c", "--data", "digits"]):
        for bad in ("0", "1.5", "nan", "half"):
            with pytest.raises(SystemExit) as e:
                main([*command, "--crop", bad])
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"expected a fraction in (0, 1] or 'none', got '{bad}'" in err


def test_unknown_options_get_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "c", "--data", "digits", "--bogus", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pleas-jax eval ") and "--any-classes" in err, err
    assert err.strip().endswith("pleas-jax eval: error: unrecognized arguments: --bogus 1"), err


def test_compile_cache_goes_before_or_after_the_command():
    parser = build_parser()
    for argv, cache in (
        (["--compile-cache", "d1", "eval", "c", "--data", "digits"], "d1"),
        (["eval", "c", "--data", "digits", "--compile-cache", "d2"], "d2"),
        (["eval", "c", "--data", "digits"], None),
    ):
        assert parser.parse_args(argv).compile_cache == cache, argv


@pytest.mark.parametrize("code", [0, 2, 130])
def test_the_program_exits_at_once_after_an_interrupt(monkeypatch, code):
    """After an interrupt ``entry`` skips the interpreter's shutdown (which
    crashed under XLA's threads); other statuses exit normally."""
    from pleas_jax import cli

    class Exited(Exception):
        """Stands for the process ending in os._exit."""

    def fake_exit(status):
        raise Exited(status)

    monkeypatch.setattr(cli, "main", lambda: code)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    if code == 130:
        with pytest.raises(Exited) as hard:
            cli.entry()
        assert hard.value.args == (130,)
    else:
        with pytest.raises(SystemExit) as soft:
            cli.entry()
        assert soft.value.code == code


# -------------------------------------------------------- the console script
def _console_script():
    script = Path(sys.executable).parent / "pleas-jax"
    found = str(script) if script.exists() else shutil.which("pleas-jax")
    assert found, "the pleas-jax console script is not installed (pip install -e .)"
    return found


def test_console_script(files, outs, tmp_path):
    script = _console_script()
    bad = subprocess.run(
        [script, "convert", str(tmp_path / "missing.pth"), str(outs / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("pleas-jax: error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "Traceback" not in bad.stderr
    good = subprocess.run(
        [script, "convert", str(files["dir"] / "r20.pth"), str(outs / "r20"), "--verify"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr
    assert rel_diff(good.stdout) <= TOLERANCE
    assert [p.name for p in outs.iterdir()] == ["r20"]
