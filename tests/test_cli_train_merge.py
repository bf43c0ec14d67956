"""``pleas-jax train``, ``merge`` and ``eval``: round trips, seeding, one-line errors,
and nothing left behind by a failed or interrupted command.

Tiny models (ResNet-20 of base width 4 on 16 px digits, two epochs) keep this fast;
accuracy is not the point here (tests/test_demo.py checks the method ordering).
"""

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pleas_jax import budget, checkpoint, models
from pleas_jax import train as train_lib
from pleas_jax.cli import main
from pleas_jax.spec import derive_spec

TRAIN = ["--width", "4", "--image-size", "16", "--epochs", "2", "--batch-size", "64", "--lr", "0.1"]
MERGE = ["--images", "200", "--batch-size", "100"]


def run(argv, capsys):
    """``main(argv)`` in process; returns (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints: two seeds on digits[0-4], one on digits[5-9], one wider model,
    and one RGB model (as if converted from torchvision)."""
    d = tmp_path_factory.mktemp("ckpts")
    made = {}
    for name, data, seed, extra in [
        ("a", "digits[0-4]", 0, []),
        ("a2", "digits[0-4]", 1, []),
        ("b", "digits[5-9]", 1, []),
        ("wide", "digits[0-4]", 0, ["--width", "8", "--epochs", "1"]),
    ]:
        # One under folders that do not exist yet: train makes them.
        out = d / "new" / "dir" / name if name == "wide" else d / name
        argv = ["train", *TRAIN, *extra, "--data", data, "--seed", seed, "--out", out]
        assert main([str(a) for a in argv]) == 0
        made[name] = out
    rgb = models.resnet20(num_classes=5, width=4)
    checkpoint.save(d / "rgb", rgb, rgb.init(jax.random.key(0), np.zeros((1, 16, 16, 3))))
    made["rgb"] = d / "rgb"
    return made


@pytest.fixture
def outs(tmp_path):
    """An empty directory for outputs: anything left in it after a failure is a leak."""
    d = tmp_path / "outs"
    d.mkdir()
    return d


# ---------------------------------------------------------------------- help
@pytest.mark.parametrize(
    "command", [None, "train", "merge", "eval", "convert", "convert-tree", "export", "demo"]
)
def test_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pleas-jax")
    if command is None:
        assert all(
            c in out
            for c in ("train", "merge", "eval", "convert", "convert-tree", "export", "demo")
        )


# --------------------------------------------------------------------- train
def test_train_is_seeded_and_records_its_recipe(ckpts, outs, capsys):
    # The fixture trained "a" with seed 0; the same command again must agree.
    argv = ["train", *TRAIN, "--data", "digits[0-4]", "--seed", 0, "--out", outs / "again"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    again = last_json(out)
    first = checkpoint.load_metadata(ckpts["a"])
    assert round(again["test_accuracy"], 4) == round(first["test_accuracy"], 4)
    print(
        f"seed 0 twice: test accuracy {first['test_accuracy']:.4f} and {again['test_accuracy']:.4f}"
    )
    meta = checkpoint.load_metadata(outs / "again")
    assert meta["data"] == "digits[0-4]" and meta["classes"] == [0, 1, 2, 3, 4]
    assert meta["image_size"] == 16 and meta["training"]["seed"] == 0
    assert meta["training"]["epochs"] == 2 and meta["training"]["width"] == 4
    assert meta["command"].startswith("pleas-jax train --width 4")
    assert set(meta["normalization"]) == {"mean", "std"} and "crop" not in meta
    # eval reads the checkpoint the way it was trained and agrees with train.
    rc, out, err = run(["eval", outs / "again", "--data", "digits[0-4]"], capsys)
    assert rc == 0, err
    assert last_json(out)["accuracy"] == pytest.approx(again["test_accuracy"], abs=1e-6)
    _, va = checkpoint.load(ckpts["a"])
    _, vb = checkpoint.load(outs / "again")
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------- merge + eval
def test_merge_shared_head_and_eval(ckpts, outs, capsys, tmp_path):
    # A reads its images centre-cropped (as a converted torchvision model does):
    # the merge reads its data so, and the merged model records it.
    a = tmp_path / "a"
    shutil.copytree(ckpts["a"], a)
    meta_file = a / checkpoint.METADATA_FILE
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "crop": 0.75}))
    argv = [
        "merge",
        "--a",
        a,
        "--b",
        ckpts["a2"],
        "--data",
        "digits[0-4]",
        "--budget",
        1.5,
        *MERGE,
        "--matching-dtype",
        "bfloat16",
        "--ls-precision",
        "bf16_3x",
        "--matching-precision",
        "bf16_3x",
        "--out",
        outs / "m",
        "--report",
        outs / "report.json",
    ]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    summary = last_json(out)
    assert summary["heads"] == "shared" and 1.4 <= summary["achieved_budget"] <= 1.5
    assert summary["images"] == 200
    report = json.loads((outs / "report.json").read_text())
    assert report["least_squares"] == "closed_form" and report["budget"] == 1.5
    assert report["images"] == 200
    meta = checkpoint.load_metadata(outs / "m")
    assert meta["merge"]["matching"] == "activation" and meta["images"] == 200
    assert meta["merge"]["matching_dtype"] == "bfloat16"
    assert meta["merge"]["ls_precision"] == meta["merge"]["matching_precision"] == "bf16_3x"
    assert meta["merged_from"]["a"]["path"] == str(a) and meta["crop"] == 0.75
    assert meta["command"].startswith("pleas-jax merge --a")
    module, _ = checkpoint.load(outs / "m")
    assert module.splits and checkpoint.load_heads(outs / "m") is None
    rc, out, err = run(["eval", outs / "m", "--data", "digits[0-4]"], capsys)
    assert rc == 0, err
    result = last_json(out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["examples"] == 180
    assert result["image_size"] == 16 and result["crop"] == 0.75
    assert sorted(p.name for p in outs.iterdir()) == ["m", "report.json"]
    # --crop overrides what the checkpoint records.
    rc, out, err = run(["eval", outs / "m", "--data", "digits[0-4]", "--crop", "none"], capsys)
    assert rc == 0, err
    assert last_json(out)["crop"] is None


def test_merge_separate_heads_and_eval_each_head(ckpts, outs, capsys):
    # --image-size: read the data at 12 px, not the 16 px the checkpoints record.
    argv = [
        "merge",
        "--a",
        ckpts["a"],
        "--b",
        ckpts["b"],
        "--data",
        "digits",
        "--budget",
        1.25,
        "--matching",
        "weight",
        "--least-squares",
        "none",
        "--unit-multiple",
        2,
        *MERGE,
        "--image-size",
        12,
        "--crop",
        1.0,
        "--out",
        outs / "m",
    ]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    summary = last_json(out)
    assert summary["heads"] == "separate"  # auto: different classes
    assert checkpoint.load_metadata(outs / "m")["crop"] == 1.0  # --crop, recorded
    module_a, va = checkpoint.load(ckpts["a"])
    spec = derive_spec(module_a, va, np.zeros((1, 16, 16, 1), np.float32))
    source_macs = {
        s: budget.macs(budget.layer_table(module_a, va, spec, (s, s, 1)), spec, 0.0)
        for s in (12, 16)
    }
    head_macs = va["params"]["fc"]["kernel"].size  # separate heads: the backbone is counted
    assert summary["macs_source"] == source_macs[12] - head_macs != source_macs[16] - head_macs
    meta = checkpoint.load_metadata(outs / "m")
    assert meta["image_size"] == 12
    assert meta["merge"]["unit_multiple"] == meta["report"]["unit_multiple"] == 2
    module, _ = checkpoint.load(outs / "m")
    assert module.splits
    for _, ((_, ai, bi), (_, ao, bo)) in module.splits:
        assert ai == bi and ao == bo and ai % 2 == 0 and ao % 2 == 0
    heads = checkpoint.load_heads(outs / "m")
    assert heads is not None
    assert heads["a"]["kernel"].shape[1] == 5 and heads["b"]["kernel"].shape[1] == 5
    for head, data in (("a", "digits[0-4]"), ("b", "digits[5-9]")):
        rc, out, err = run(["eval", outs / "m", "--data", data, "--head", head], capsys)
        assert rc == 0, err
        assert last_json(out)["head"] == head
    rc, _, err = run(["eval", outs / "m", "--data", "digits[0-4]"], capsys)
    assert rc == 2 and "separate heads ['a', 'b']; choose one with --head" in err
    # Each head is scored on its own task's classes only.
    rc, _, err = run(["eval", outs / "m", "--data", "digits[5-9]", "--head", "a"], capsys)
    assert rc == 2 and "head 'a' was trained on classes 0-4 but 'digits[5-9]'" in err
    rc, _, err = run(["eval", ckpts["a"], "--data", "digits[0-4]", "--head", "a"], capsys)
    assert rc == 2 and "has a single classifier" in err


# --------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "case, message",
    [
        ("train-unknown-data", r"unknown data spec 'cifar7'"),
        ("train-bad-subset", r"'digits\[3-12\]': the data has no class \[10, 11, 12\]"),
        ("train-existing-out", r"already exists \(pass --overwrite"),
        ("train-negative-seed", r"--seed must be >= 0, got -1"),
        ("train-negative-lr", r"--lr must be a positive number, got -1.0"),
        ("train-out-under-a-file", r"report.json/t: .*report.json is not a directory"),
        ("train-nan-weight-decay", r"--weight-decay must be a number >= 0, got nan"),
        ("eval-missing", r"nope: no such checkpoint directory"),
        ("eval-not-a-checkpoint", r"not a pleas-jax checkpoint"),
        ("eval-wrong-classes", r"predicts 5 classes but 'digits' has 10"),
        ("eval-rgb-on-gray", r"reads 3-channel images but 'digits\[0-4\]' has 1-channel"),
        ("merge-missing-b", r"nope: no such checkpoint directory"),
        ("merge-unknown-data", r"unknown data spec 'mnist6k'"),
        ("merge-wrong-width", r"different architectures or widths \(stem_width is 4 in A but 8"),
        ("merge-rgb-with-gray", r"different architectures|1- and 3-channel inputs"),
        ("merge-budget", r"budget must lie in \[1, 2\]"),
        ("merge-shared-different-classes", r"a shared head needs the same classes"),
        ("merge-report-dir", r"parent directory .*nodir does not exist"),
        ("merge-report-is-a-dir", r"is a directory; name the JSON file to write"),
        ("merge-report-exists", r"report.json: already exists \(pass --overwrite"),
        ("eval-other-classes", r"trained on classes 0-4 but 'digits\[5-9\]' has classes 5-9"),
        ("train-empty-test-split", r"has no test images"),
        ("train-overwrite-not-a-checkpoint", r"plain: exists and is not a pleas-jax checkpoint"),
        ("merge-unit-multiple", r"--unit-multiple must be positive, got 0"),
    ],
)
def test_bad_input_one_line_error_and_nothing_written(
    case, message, ckpts, outs, tmp_path, capsys, monkeypatch
):
    a, b = ckpts["a"], ckpts["b"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "report.json").write_text("{}")
    x = np.zeros((10, 16, 16), np.uint8)
    np.savez(tmp_path / "no_test.npz", x=x, y=np.arange(10) % 2, x_test=x[:0], y_test=np.zeros(0))
    # Each of these is refused before any slow work: training would fail the test.
    monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("trained first"))
    merge = [
        "merge",
        "--a",
        a,
        "--b",
        b,
        "--data",
        "digits",
        "--budget",
        1.5,
        *MERGE,
        "--out",
        outs / "m",
    ]
    argv = {
        "train-unknown-data": ["train", *TRAIN, "--data", "cifar7", "--out", outs / "t"],
        "train-bad-subset": ["train", *TRAIN, "--data", "digits[3-12]", "--out", outs / "t"],
        "train-existing-out": ["train", *TRAIN, "--data", "digits", "--out", a],
        "train-negative-seed": [
            "train",
            *TRAIN,
            "--data",
            "digits",
            "--seed",
            -1,
            "--out",
            outs / "t",
        ],
        "train-out-under-a-file": [
            "train",
            *TRAIN,
            "--data",
            "digits",
            "--out",
            tmp_path / "report.json" / "t",
        ],
        "train-negative-lr": ["train", *TRAIN, "--data", "digits", "--lr", -1, "--out", outs / "t"],
        "train-nan-weight-decay": [
            "train",
            *TRAIN,
            "--data",
            "digits",
            "--weight-decay",
            "nan",
            "--out",
            outs / "t",
        ],
        "eval-missing": ["eval", tmp_path / "nope", "--data", "digits"],
        "eval-not-a-checkpoint": ["eval", outs, "--data", "digits"],
        "eval-wrong-classes": ["eval", a, "--data", "digits", "--any-classes"],
        "eval-rgb-on-gray": ["eval", ckpts["rgb"], "--data", "digits[0-4]"],
        "merge-missing-b": [*merge[:4], tmp_path / "nope", *merge[5:]],
        "merge-unknown-data": [*merge[:6], "mnist6k", *merge[7:]],
        "merge-wrong-width": [*merge[:4], ckpts["wide"], *merge[5:]],
        "merge-rgb-with-gray": [*merge[:4], ckpts["rgb"], *merge[5:]],
        "merge-budget": [*merge[:8], 2.5, *merge[9:]],
        "merge-shared-different-classes": [*merge, "--heads", "shared"],
        "merge-report-dir": [*merge, "--report", tmp_path / "nodir" / "r.json"],
        "merge-report-is-a-dir": [*merge, "--report", tmp_path],
        "merge-report-exists": [*merge, "--report", tmp_path / "report.json"],
        "eval-other-classes": ["eval", a, "--data", "digits[5-9]"],
        "train-empty-test-split": [
            "train",
            *TRAIN,
            "--data",
            f"npz:{tmp_path / 'no_test.npz'}",
            "--out",
            outs / "t",
        ],
        "train-overwrite-not-a-checkpoint": [
            "train",
            *TRAIN,
            "--data",
            "digits",
            "--out",
            tmp_path / "plain",
            "--overwrite",
        ],
        "merge-unit-multiple": [*merge, "--unit-multiple", 0],
    }[case]
    before = sorted(p.name for p in a.parent.iterdir())
    rc, out, err = run(argv, capsys)
    assert rc == 2, (out, err)
    assert err.startswith("pleas-jax: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in out + err
    assert list(outs.iterdir()) == []
    assert sorted(p.name for p in a.parent.iterdir()) == before


def test_a_merge_whose_report_cannot_be_written_leaves_no_checkpoint(
    ckpts, outs, capsys, monkeypatch
):
    from pleas_jax import workflow

    def fail(path, value):
        raise OSError(f"[Errno 28] No space left on device: {path!r}")

    monkeypatch.setattr(workflow, "write_json", fail)
    argv = ["merge", "--a", ckpts["a"], "--b", ckpts["a2"], "--data", "digits[0-4]"]
    argv += ["--budget", 1.5, "--least-squares", "none", *MERGE]
    rc, _, err = run([*argv, "--out", outs / "m", "--report", outs / "r.json"], capsys)
    assert rc == 2 and "No space left on device" in err
    # A rerun is not blocked by a checkpoint left from the failed one.
    assert list(outs.iterdir()) == []


def test_a_merge_whose_checkpoint_cannot_be_saved_leaves_no_report(
    ckpts, outs, capsys, monkeypatch
):
    from pleas_jax import checkpoint

    def fail(*args, **kwargs):
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(checkpoint, "save", fail)
    argv = ["merge", "--a", ckpts["a"], "--b", ckpts["a2"], "--data", "digits[0-4]"]
    argv += ["--budget", 1.5, "--least-squares", "none", *MERGE]
    rc, _, err = run([*argv, "--out", outs / "m", "--report", outs / "r.json"], capsys)
    assert rc == 2 and "No space left on device" in err
    # A rerun is not blocked by a report left from the failed one.
    assert list(outs.iterdir()) == []


def test_eval_of_other_classes_with_any_classes(ckpts, capsys):
    rc, out, err = run(["eval", ckpts["a"], "--data", "digits[5-9]", "--any-classes"], capsys)
    assert rc == 0, err
    assert last_json(out)["examples"] > 0


def test_interrupted_merge_leaves_no_output(ckpts, outs, capsys, monkeypatch):
    calls = []

    def interrupt(*args, **kwargs):
        # Past the spec, matching and the partial merge: the merge is well under way.
        calls.append(1)
        raise KeyboardInterrupt

    # The package re-exports the function merge under the module's name.
    merge_module = importlib.import_module("pleas_jax.merge")
    monkeypatch.setattr(merge_module, "recompute_batch_norm", interrupt)
    argv = [
        "merge",
        "--a",
        ckpts["a"],
        "--b",
        ckpts["a2"],
        "--data",
        "digits[0-4]",
        "--budget",
        1.5,
        "--least-squares",
        "none",
        *MERGE,
        "--out",
        outs / "m",
        "--report",
        outs / "r.json",
    ]
    rc, _, err = run(argv, capsys)
    assert calls and rc == 130
    assert "pleas-jax: interrupted\n" in err
    assert list(outs.iterdir()) == []


# -------------------------------------------------------- the console script
def test_console_script_one_line_error(tmp_path):
    script = Path(sys.executable).parent / "pleas-jax"
    found = str(script) if script.exists() else shutil.which("pleas-jax")
    assert found, "the pleas-jax console script is not installed (pip install -e .)"
    bad = subprocess.run(
        [found, "eval", str(tmp_path / "missing"), "--data", "digits"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("pleas-jax: error: ") and bad.stderr.count("\n") == 1, bad.stderr
