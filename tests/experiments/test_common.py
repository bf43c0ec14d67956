"""Release layout, checkpoint resolution (incl. on-the-fly conversion), data helpers, caches."""

import shutil
import sys
import types

import numpy as np
import pytest

from experiments import common
from pleas_jax import checkpoint, data
from tests.experiments.conftest import SIZE, tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny checkpoint (10 classes) to copy around."""
    from tests.helpers import init

    module = tiny(10)
    path = tmp_path_factory.mktemp("one") / "ckpt"
    checkpoint.save(path, module, init(module, SIZE), image_size=SIZE)
    return path


def test_resolution_order_and_on_the_fly_conversion(saved, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    # 1. The variant directory itself is a checkpoint (a convert-tree output).
    shutil.copytree(saved, root / "rn50/cub/v1a")
    assert common.resolve_checkpoint(root, "rn50", "cub", "v1a") == root / "rn50/cub/v1a"
    # 2. A checkpoint beside the release's file, in pleas_jax/.
    shutil.copytree(saved, root / "rn50/domainnet/real/v2b/pleas_jax")
    assert common.resolve_checkpoint(root, "rn50", "real", "v2b") == \
        root / "rn50/domainnet/real/v2b/pleas_jax"
    # 3. Only model.pth: converted on the fly by converters.tree.convert_checkpoint.
    calls = []

    def convert_checkpoint(src, dst, *, verify=True):
        calls.append((src, dst, verify))
        shutil.copytree(saved, dst)
        return {"status": "converted"}

    monkeypatch.setitem(sys.modules, "converters.tree",
                        types.SimpleNamespace(convert_checkpoint=convert_checkpoint))
    where = root / "rn18/stanford_dogs/v1b"
    where.mkdir(parents=True)
    (where / "model.pth").write_bytes(b"torch")
    logs = []
    got = common.resolve_checkpoint(root, "rn18", "stanford_dogs", "v1b", log=logs.append)
    assert got == where / "pleas_jax" and calls == [(where / "model.pth", got, True)]
    assert "converting" in logs[0]
    # The second time the converted checkpoint is used as it is.
    assert common.resolve_checkpoint(root, "rn18", "stanford_dogs", "v1b") == got
    assert len(calls) == 1

    def broken(src, dst, *, verify=True):
        raise ValueError("verification failed: logits differ")

    monkeypatch.setitem(sys.modules, "converters.tree",
                        types.SimpleNamespace(convert_checkpoint=broken))
    (root / "rn18/cub/v1a").mkdir(parents=True)
    (root / "rn18/cub/v1a/model.pth").write_bytes(b"torch")
    with pytest.raises(common.ExperimentError, match="model.pth: conversion failed: verification"):
        common.resolve_checkpoint(root, "rn18", "cub", "v1a")
    monkeypatch.setitem(sys.modules, "converters.tree", None)  # torch missing
    with pytest.raises(common.ExperimentError, match="needs PyTorch.*convert-tree"):
        common.resolve_checkpoint(root, "rn18", "cub", "v1a")
    with pytest.raises(common.ExperimentError, match="rn18/oxford_pets/v1a: no checkpoint.*"
                       "download_checkpoints.sh.*pleas-jax convert"):
        common.resolve_checkpoint(root, "rn18", "oxford_pets", "v1a")


def test_checkpoints_root(tmp_path, monkeypatch):
    monkeypatch.delenv(common.ENV_CHECKPOINTS, raising=False)
    with pytest.raises(common.ExperimentError, match="MODEL_CHECKPOINTS_DIR.*download_checkpoints"):
        common.checkpoints_root(None)
    monkeypatch.setenv(common.ENV_CHECKPOINTS, str(tmp_path))
    assert common.checkpoints_root(None) == tmp_path
    with pytest.raises(common.ExperimentError, match="no such checkpoint tree"):
        common.checkpoints_root(str(tmp_path / "nope"))


def test_load_source_fills_in_the_releases_inputs(saved, tmp_path):
    m = common.load_source(saved)
    assert m.image_size == SIZE and m.normalization is None
    meta = checkpoint.load_metadata(saved)
    conv = tmp_path / "conv"
    shutil.copytree(saved, conv)
    meta.pop("image_size")
    meta["converted_from"] = "torch"
    (conv / checkpoint.METADATA_FILE).write_text(__import__("json").dumps(meta))
    m = common.load_source(conv)
    assert m.image_size == 224 and m.normalization[0] == common.IMAGENET_NORMALIZATION["mean"]
    assert common.load_source(conv, image_size=64).image_size == 64
    with pytest.raises(common.ExperimentError, match="not a pleas-jax checkpoint.*pleas-jax train"):
        common.load_source(tmp_path)


def test_load_data_maps_back_to_the_full_label_space(saved, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
    y = np.repeat([2, 5, 7], 10)  # three of the model's ten classes
    np.savez(tmp_path / "d.npz", x=x, y=y)
    model = common.load_source(saved)
    ds = common.load_data(model, f"npz:{tmp_path / 'd.npz'}", None, 10)
    assert ds.num_classes == 10 and set(ds.y_train) | set(ds.y_test) == {2, 5, 7}
    assert ds.x_train.shape[1:] == (SIZE, SIZE, 3)
    with pytest.raises(common.ExperimentError, match="predicts 4"):
        common.load_data(model, f"npz:{tmp_path / 'd.npz'}", None, 4)
    with pytest.raises(common.ExperimentError, match="no such file"):
        common.load_data(model, f"npz:{tmp_path / 'x.npz'}", None)


def test_dataset_specs(tmp_path, monkeypatch):
    monkeypatch.delenv(common.ENV_NABIRDS, raising=False)
    assert common.dataset_spec("cub", {}, None) == "tfds:caltech_birds2011"
    assert common.dataset_spec("painting", {}, None) == "tfds:domainnet/painting"
    assert common.dataset_spec("cub", {"cub": "folder:/x"}, None) == "folder:/x"
    (tmp_path / "nabirds" / "images").mkdir(parents=True)
    assert common.dataset_spec("nabird", {}, str(tmp_path)) == \
        f"folder:{tmp_path / 'nabirds' / 'images'}"
    monkeypatch.setenv(common.ENV_NABIRDS, str(tmp_path))
    assert common.dataset_spec("nabird", {}, None) == f"folder:{tmp_path}"
    with pytest.raises(common.ExperimentError, match="unknown dataset 'mnist'"):
        common.dataset_spec("mnist", {}, None)


def test_merge_images_are_balanced_and_seeded():
    a = data.Dataset(np.zeros((50, 2, 2, 1), np.float32), np.zeros(50, np.int32), None, None,
                     (0,), "a", None, None)
    b = data.Dataset(np.ones((50, 2, 2, 1), np.float32), np.zeros(50, np.int32), None, None,
                     (0,), "b", None, None)
    batches = common.merge_images([a, b], 31, 10, seed=3)
    assert [len(x) for x in batches] == [10, 10, 10, 1]
    x = np.concatenate(batches)
    assert (x[:, 0, 0, 0] == 0).sum() == 16 and (x[:, 0, 0, 0] == 1).sum() == 15
    again = np.concatenate(common.merge_images([a, b], 31, 10, seed=3))
    np.testing.assert_array_equal(x, again)
    assert 0 < (x[:10, 0, 0, 0] == 1).sum() < 10  # batches mix the tasks


def test_method_runs_and_matching_cache(tmp_path):
    assert common.method_runs(["pleas_activation", "zipit"], ["zip", "optimized"]) == [
        ("pleas_activation", "zip"), ("pleas_activation", "optimized"), ("zipit", "zip")]
    key = {"a": 1, "matching": "activation"}
    perm = {"layer1/conv1 kernel:3": np.array([1, 0, 2]), "fc:0": np.array([0, 1])}
    costs = {g: np.eye(len(p)) for g, p in perm.items()}
    common.MatchingCache(tmp_path).put(key, perm, costs)
    fresh = common.MatchingCache(tmp_path)
    got_perm, got_costs = fresh.get(key)
    assert list(got_perm) == list(perm)
    for g in perm:
        np.testing.assert_array_equal(got_perm[g], perm[g])
        np.testing.assert_array_equal(got_costs[g], costs[g])
    assert fresh.get({**key, "a": 2}) is None and common.MatchingCache(None).get(key) is None
