"""orbax checkpoints with metadata: round trip, atomic writes, clear errors."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pleas_jax
from pleas_jax import checkpoint, models
from pleas_jax.checkpoint import CheckpointError
from pleas_jax.tree import flatten


def _variables(module, seed=0):
    # Random values of the right shapes, from numpy: running init op by op on
    # the CPU costs seconds, and a checkpoint does not care where values came from.
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def resnet20():
    module = models.resnet20(num_classes=10)
    return module, _variables(module)


def _assert_same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert list(fa) == list(fb) or sorted(fa) == sorted(fb)
    for path, x in fa.items():
        y = fb[path]
        assert np.asarray(y).dtype == np.asarray(x).dtype, path
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=str(path))


def test_round_trip(tmp_path, resnet20):
    module, variables = resnet20
    out = pleas_jax.save(tmp_path / "ckpt", module, variables, source_sha256="ab" * 32, note=[1, 2])
    assert out == tmp_path / "ckpt"
    loaded_module, loaded = pleas_jax.load(tmp_path / "ckpt")
    assert loaded_module == module
    _assert_same(loaded, variables)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
    meta = checkpoint.load_metadata(tmp_path / "ckpt")
    assert meta["arch"] == "resnet20"
    assert meta["num_classes"] == 10
    assert meta["config"] == module.config()
    assert meta["source_sha256"] == "ab" * 32
    assert meta["note"] == [1, 2]
    assert meta["pleas_jax_version"] == pleas_jax.__version__
    # Nothing but the checkpoint is left in the parent.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_round_trip_free_widths(tmp_path):
    module = models.ResNet(
        block="basic",
        stage_sizes=(1, 2),
        stem_width=5,
        stream_widths=(7, 11),
        inner_widths=((3,), (9,), (4,)),
        downsample=(True, True, False),
        num_classes=None,
        stem="cifar",
        stage_strides=(1, 2),
    )
    variables = _variables(module)
    checkpoint.save(tmp_path / "free", module, variables)
    loaded_module, loaded = checkpoint.load(tmp_path / "free")
    assert loaded_module == module
    assert checkpoint.load_metadata(tmp_path / "free")["arch"] is None
    _assert_same(loaded, variables)


def test_refuses_to_overwrite_unless_asked(tmp_path, resnet20):
    module, variables = resnet20
    checkpoint.save(tmp_path / "ckpt", module, variables, run=1)
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(tmp_path / "ckpt", module, variables, run=2)
    assert checkpoint.load_metadata(tmp_path / "ckpt")["run"] == 1
    checkpoint.save(tmp_path / "ckpt", module, variables, overwrite=True, run=2)
    assert checkpoint.load_metadata(tmp_path / "ckpt")["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    # Even with overwrite, a directory that is not a checkpoint is never replaced.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    with pytest.raises(CheckpointError, match="not a pleas-jax checkpoint; refusing"):
        checkpoint.save(tmp_path / "precious", module, variables, overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_a_name_near_the_file_system_limit_saves_and_overwrites(tmp_path, resnet20):
    # Temporary names add a prefix and a suffix to the name; they must stay legal.
    module, variables = resnet20
    name = "m" * 250
    checkpoint.save(tmp_path / name, module, variables, run=1)
    checkpoint.save(tmp_path / name, module, variables, overwrite=True, run=2)
    assert checkpoint.load_metadata(tmp_path / name)["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_save_leaves_nothing(tmp_path, resnet20, monkeypatch, failure):
    module, variables = resnet20

    def fail(file, text):
        # The arrays are on disk by now: the failure is really mid-save.
        assert (file.parent / checkpoint.ARRAYS_DIR).is_dir()
        raise failure

    monkeypatch.setattr(checkpoint, "_write_metadata", fail)
    with pytest.raises(type(failure)):
        checkpoint.save(tmp_path / "ckpt", module, variables)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, resnet20, monkeypatch):
    module, variables = resnet20
    checkpoint.save(tmp_path / "ckpt", module, variables, run=1)
    monkeypatch.setattr(checkpoint, "_write_metadata", lambda file, text: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checkpoint.save(tmp_path / "ckpt", module, variables, overwrite=True, run=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert checkpoint.load_metadata(tmp_path / "ckpt")["run"] == 1


def test_save_rejects_bad_input(tmp_path, resnet20):
    module, variables = resnet20
    wrong = models.resnet20(num_classes=7)
    with pytest.raises(CheckpointError, match=r"params/fc/bias' has shape \(10,\).*\(7,\)"):
        checkpoint.save(tmp_path / "a", wrong, variables)
    with pytest.raises(CheckpointError, match="'arch' is reserved"):
        checkpoint.save(tmp_path / "b", module, variables, arch="x")
    with pytest.raises(CheckpointError, match="not JSON-able"):
        checkpoint.save(tmp_path / "c", module, variables, when=object())
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"file/d/e: .*file is not a directory"):
        checkpoint.save(tmp_path / "file" / "d" / "e", module, variables)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_save_creates_missing_parents_and_removes_them_on_failure(tmp_path, resnet20, monkeypatch):
    module, variables = resnet20
    out = checkpoint.save(tmp_path / "runs" / "x" / "ckpt", module, variables)
    assert checkpoint.load_metadata(out)["arch"] == "resnet20"
    monkeypatch.setattr(checkpoint, "_write_metadata", lambda file, text: 1 / 0)
    (tmp_path / "keep").mkdir()
    with pytest.raises(ZeroDivisionError):
        checkpoint.save(tmp_path / "keep" / "new" / "deeper" / "ckpt", module, variables)
    # The folders the failed save made are gone; the ones that were there stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "runs"]
    assert list((tmp_path / "keep").iterdir()) == []


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such checkpoint directory"):
        checkpoint.load(tmp_path / "nope")


def test_not_our_checkpoint(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="other: not a pleas-jax checkpoint"):
        checkpoint.load(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory") as e:
        checkpoint.load(tmp_path / "file")
    assert "convert" not in str(e.value)
    (tmp_path / "model.pth").write_bytes(b"\0")
    with pytest.raises(
        CheckpointError, match=r"a PyTorch file: convert it first, pleas-jax convert"
    ):
        checkpoint.load(tmp_path / "model.pth")


def test_metadata_that_does_not_match_the_arrays(tmp_path, resnet20):
    module, variables = resnet20
    checkpoint.save(tmp_path / "ckpt", module, variables)
    meta_file = tmp_path / "ckpt" / checkpoint.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    meta["config"]["stream_widths"][2] = 48
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"has shape .*64.* but the model config implies .*48"
    ):
        checkpoint.load(tmp_path / "ckpt")
    meta_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(tmp_path / "ckpt")


def test_grayscale_model_round_trip(tmp_path):
    # The image channels are not in the config; the stem kernel says them.
    module = models.resnet20(num_classes=3, width=4)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    checkpoint.save(tmp_path / "gray", module, variables)
    loaded_module, loaded = checkpoint.load(tmp_path / "gray")
    assert loaded["params"]["conv1"]["kernel"].shape == (3, 3, 1, 4)
    _assert_same(loaded, variables)
    assert checkpoint.load_heads(tmp_path / "gray") is None


def _heads(features, classes=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: {
            "kernel": rng.standard_normal((features, k)).astype(np.float32),
            "bias": rng.standard_normal(k).astype(np.float32),
        }
        for name, k in zip("ab", classes, strict=True)
    }


def test_backbone_with_separate_heads_round_trip(tmp_path):
    backbone = models.resnet20(num_classes=None, width=4)
    variables = _variables(backbone)
    heads = _heads(backbone.stream_widths[-1])
    checkpoint.save(tmp_path / "merged", backbone, variables, heads=heads, budget=1.5)
    module, loaded = checkpoint.load(tmp_path / "merged")
    assert module == backbone and "heads" not in loaded
    _assert_same(loaded, variables)
    _assert_same(checkpoint.load_heads(tmp_path / "merged"), heads)
    meta = checkpoint.load_metadata(tmp_path / "merged")
    assert meta["heads"] == {"a": 3, "b": 4} and meta["budget"] == 1.5


def test_bad_heads_are_refused(tmp_path, resnet20):
    module, variables = resnet20
    with pytest.raises(CheckpointError, match="need a backbone"):
        checkpoint.save(tmp_path / "a", module, variables, heads=_heads(64))
    backbone = models.resnet20(num_classes=None, width=4)
    bb_vars = _variables(backbone)
    with pytest.raises(CheckpointError, match=r"head 'a' has kernel \(7, 3\).*expected \(16, K\)"):
        checkpoint.save(tmp_path / "b", backbone, bb_vars, heads=_heads(7))
    missing = _heads(16)
    del missing["b"]["bias"]
    with pytest.raises(CheckpointError, match="head 'b' must hold exactly 'kernel' and 'bias'"):
        checkpoint.save(tmp_path / "c", backbone, bb_vars, heads=missing)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_gets_the_mode_of_a_plain_mkdir(tmp_path, resnet20, umask):
    # The temp directory behind the atomic write is private; the result must not be.
    module, variables = resnet20
    old = os.umask(umask)
    try:
        pleas_jax.save(tmp_path / "ckpt", module, variables)
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "ckpt").stat().st_mode == (tmp_path / "plain").stat().st_mode
