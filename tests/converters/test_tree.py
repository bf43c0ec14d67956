"""convert-tree: the release's tree of torch checkpoints -> a tree of orbax checkpoints.

A synthetic release tree of narrow random ResNets (both file formats, a corrupt file,
a file under the wrong model type) is converted, verified and resumed.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import ConversionError, TorchResNet, randomize_batch_norm, sha256_file
from converters.tree import (
    convert_checkpoint,
    convert_tree,
    describe_path,
    find_checkpoints,
    format_summary,
)
from pleas_jax import checkpoint, models
from pleas_jax.cli import main

IMAGE_SIZE = 32  # verification batch side: small models, fast checks
TOLERANCE = 1e-4

GOOD = ("rn18/cub/v1a", "rn18/cub/v1b", "rn18/domainnet/clipart/v2a")
CORRUPT = "rn18/stanford_dogs/v1a"
WRONG_TYPE = "rn101/nabird/v2b"  # holds a ResNet-18


def _state_dict(arch, classes, seed):
    torch.manual_seed(seed)
    net = TorchResNet(models.resnet(arch, classes, width=4))
    return randomize_batch_norm(net, seed, image_size=IMAGE_SIZE).state_dict()


@pytest.fixture(scope="module")
def state_dicts():
    return {
        "rn18/cub/v1a": _state_dict("resnet18", 5, 0),
        "rn18/cub/v1b": _state_dict("resnet18", 5, 1),
        # One architecture throughout: each new one costs seconds of JAX compilation.
        "rn18/domainnet/clipart/v2a": _state_dict("resnet18", 7, 2),
        WRONG_TYPE: _state_dict("resnet18", 3, 3),
    }


def _put(root: Path, rel: str, obj) -> Path:
    path = root / rel / "model.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.fixture
def tree(tmp_path, state_dicts):
    """The release layout: fine-grained sets as {'model': sd}, DomainNet as plain sds."""
    src = tmp_path / "src"
    for rel, sd in state_dicts.items():
        _put(src, rel, sd if "/domainnet/" in rel else {"model": sd})
    bad = src / CORRUPT / "model.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 this is not a finished torch zip archive")
    return src, tmp_path / "dst"


def _torch_logits(sd, x):
    net = TorchResNet(models.resnet("resnet18", sd["fc.weight"].shape[0], width=4))
    net.load_state_dict(sd)
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and ".tmp-" in p.name]


def test_layout_helpers(tree):
    src, _ = tree
    assert [str(p.parent) for p in find_checkpoints(src)] == sorted([*GOOD, CORRUPT, WRONG_TYPE])
    assert describe_path("rn18/cub/v1a/model.pth") == {
        "model_type": "rn18",
        "dataset": "cub",
        "variant": "v1a",
    }
    assert describe_path("rn50/domainnet/clipart/v2a/model.pth") == {
        "model_type": "rn50",
        "dataset": "domainnet",
        "domain": "clipart",
        "variant": "v2a",
    }
    with pytest.raises(ConversionError, match="no such directory"):
        find_checkpoints(src / "missing")


def test_cli_converts_verifies_reports_bad_files_and_resumes(tree, state_dicts, capsys):
    src, dst = tree
    argv = ["convert-tree", str(src), str(dst), "--image-size", str(IMAGE_SIZE)]
    rc = main(argv)
    out, err = capsys.readouterr()
    print(out)
    assert rc == 1  # two files failed
    # One line per bad file, naming it, with the reason.
    failures = [line for line in err.splitlines() if line.startswith("pleas-jax: failed:")]
    assert len(failures) == 2, err
    assert any(f"{CORRUPT}/model.pth" in f and "cannot read it" in f for f in failures)
    assert any(f"{WRONG_TYPE}/model.pth" in f and "rn101/" in f for f in failures)
    assert "Traceback" not in err

    # The summary table: path, arch, classes, status, max logit differences.
    status = {}
    for line in out.splitlines():
        m = re.match(r"(\S+)\s+(\S+)\s+(\S+)\s+(converted|skipped|failed)\s+(\S+)\s+(\S+)$", line)
        if m:
            status[m.group(1)] = m.groups()[1:]
    assert {p: s[2] for p, s in status.items()} == {
        **dict.fromkeys(GOOD, "converted"),
        CORRUPT: "failed",
        WRONG_TYPE: "failed",
    }
    assert status["rn18/cub/v1a"][:2] == ("resnet18", "5")
    assert status["rn18/domainnet/clipart/v2a"][:2] == ("resnet18", "7")
    assert all(float(status[p][4]) <= TOLERANCE for p in GOOD)
    assert "3 converted, 0 skipped, 2 failed of 5" in out

    # Same relative directories; each a checkpoint that computes what torch does.
    x = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    for rel in GOOD:
        module, variables = checkpoint.load(dst / rel)
        info = checkpoint.load_metadata(dst / rel)
        assert info["source_sha256"] == sha256_file(src / rel / "model.pth")
        assert info["converted_from"] == "torch"
        assert info["verification"]["max_rel"] <= TOLERANCE
        assert info["release"]["model_type"] == rel.split("/")[0]
        want = _torch_logits(state_dicts[rel], x)
        got = np.asarray(module.apply(variables, x))
        assert np.max(np.abs(got - want)) <= TOLERANCE * np.max(np.abs(want))
    # Nothing half-written for the failures, not even their parent directories.
    assert not (dst / CORRUPT).exists() and not (dst / "rn18/stanford_dogs").exists()
    assert not (dst / "rn101").exists()
    assert _leftovers(dst) == []

    # A second run converts nothing.
    rows = convert_tree(src, dst, image_size=IMAGE_SIZE, progress=False)
    assert [r["status"] for r in rows if r["path"] in GOOD] == ["skipped"] * 3
    assert all(r["max_rel"] <= TOLERANCE for r in rows if r["path"] in GOOD)
    assert [r["status"] for r in rows if r["path"] not in GOOD] == ["failed"] * 2

    # Repair the bad file: the next run converts exactly that one.
    _put(src, CORRUPT, {"model": state_dicts["rn18/cub/v1a"]})
    by_path = {r["path"]: r for r in convert_tree(src, dst, image_size=IMAGE_SIZE, progress=False)}
    assert by_path[CORRUPT]["status"] == "converted"
    assert [by_path[p]["status"] for p in GOOD] == ["skipped"] * 3
    table = format_summary(list(by_path.values()))
    assert "1 converted, 3 skipped, 1 failed of 5" in table


def test_convert_checkpoint_refuses_stale_and_foreign_destinations(tree, state_dicts):
    src, dst = tree
    a, b = src / "rn18/cub/v1a/model.pth", src / "rn18/cub/v1b/model.pth"
    out = dst / "rn18/cub/v1a"
    row = convert_checkpoint(a, out, image_size=IMAGE_SIZE)
    assert (row["status"], row["arch"], row["num_classes"]) == ("converted", "resnet18", 5)
    assert convert_checkpoint(a, out, image_size=IMAGE_SIZE)["status"] == "skipped"
    # The same file asked for at another image size is converted again.
    row = convert_checkpoint(a, out, image_size=IMAGE_SIZE + 8, verify=False)
    assert row["status"] == "converted" and checkpoint.load_metadata(out)["image_size"] == 40
    # ... and verified when a run asks for the verification the last one skipped.
    row = convert_checkpoint(a, out, image_size=40)
    assert row["status"] == "converted" and row["max_abs"] is not None
    assert convert_checkpoint(a, out)["status"] == "skipped"  # no size asked for: kept
    # Another source file for the same destination: only with overwrite.
    with pytest.raises(ConversionError, match="converted from another file"):
        convert_checkpoint(b, out, verify=False)
    row = convert_checkpoint(b, out, verify=False, overwrite=True)
    assert row["status"] == "converted" and row["max_abs"] is None
    assert checkpoint.load_metadata(out)["source_sha256"] == sha256_file(b)
    # A directory that is not our checkpoint is never replaced.
    foreign = dst / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not a pleas-jax checkpoint"):
        convert_checkpoint(a, foreign, verify=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert _leftovers(dst) == []


def test_failed_verification_writes_nothing(tree):
    src, dst = tree
    with pytest.raises(ConversionError, match="verification failed.*nothing written"):
        convert_checkpoint(
            src / "rn18/cub/v1a/model.pth",
            dst / "deep/new/v1a",
            image_size=IMAGE_SIZE,
            tolerance=-1.0,
        )
    assert not dst.exists()


def test_cli_errors_and_help(tree, tmp_path, capsys):
    src, _ = tree
    assert main(["convert-tree", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pleas-jax: error: ") and "missing" in err and "\n" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert-tree", str(empty), str(tmp_path / "dst")]) == 2
    assert "no model.pth" in capsys.readouterr().err
    assert main(["convert-tree", str(src), str(src)]) == 2
    assert "DST must differ from SRC" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["convert-tree", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "SRC/rn18/cub/v1a/model.pth -> DST/rn18/cub/v1a/" in " ".join(out.split())
    assert not (tmp_path / "dst").exists()


def test_linked_directories_are_searched_once(tmp_path, state_dicts):
    real = tmp_path / "disk"
    _put(real, "cub/v1a", {"model": state_dicts["rn18/cub/v1a"]})
    src = tmp_path / "src"
    src.mkdir()
    (src / "rn18").symlink_to(real, target_is_directory=True)
    (real / "cub" / "loop").symlink_to(real, target_is_directory=True)  # a cycle
    assert find_checkpoints(src) == [Path("rn18/cub/v1a/model.pth")]


def test_an_unexpected_error_fails_its_own_row(tree, monkeypatch):
    """One file raising what no converter expects must not stop the others."""
    import converters.tree as tree_lib

    src, dst = tree
    real = tree_lib.convert_file

    def flaky(path):
        if "v1b" in str(path):
            raise RuntimeError("boom")
        return real(path)

    monkeypatch.setattr(tree_lib, "convert_file", flaky)
    rows = convert_tree(src, dst, image_size=IMAGE_SIZE, progress=False)
    by_path = {r["path"]: r for r in rows}
    assert by_path["rn18/cub/v1b"]["status"] == "failed"
    assert by_path["rn18/cub/v1b"]["reason"] == "RuntimeError: boom"
    assert by_path["rn18/cub/v1a"]["status"] == "converted"
