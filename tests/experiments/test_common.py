"""Release layout, checkpoint resolution (incl. on-the-fly conversion), data helpers, caches."""

import ast
import inspect
import shutil
import sys
import types

import numpy as np
import pytest

from experiments import common, datasets, merging, options, release, runs, sources, streams
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
    assert (
        common.resolve_checkpoint(root, "rn50", "real", "v2b")
        == root / "rn50/domainnet/real/v2b/pleas_jax"
    )
    # 3. Only model.pth: converted on the fly by converters.tree.convert_checkpoint.
    calls = []

    def convert_checkpoint(src, dst, *, verify=True):
        calls.append((src, dst, verify))
        shutil.copytree(saved, dst)
        return {"status": "converted"}

    monkeypatch.setitem(
        sys.modules, "converters.tree", types.SimpleNamespace(convert_checkpoint=convert_checkpoint)
    )
    where = root / "rn18/stanford_dogs/v1b"
    where.mkdir(parents=True)
    (where / "model.pth").write_bytes(b"torch")
    logs: list[str] = []
    got = common.resolve_checkpoint(root, "rn18", "stanford_dogs", "v1b", log=logs.append)
    assert got == where / "pleas_jax" and calls == [(where / "model.pth", got, True)]
    assert "converting" in logs[0]
    # The second time the converted checkpoint is used as it is.
    assert common.resolve_checkpoint(root, "rn18", "stanford_dogs", "v1b") == got
    assert len(calls) == 1

    def broken(src, dst, *, verify=True):
        raise ValueError("verification failed: logits differ")

    monkeypatch.setitem(
        sys.modules, "converters.tree", types.SimpleNamespace(convert_checkpoint=broken)
    )
    (root / "rn18/cub/v1a").mkdir(parents=True)
    (root / "rn18/cub/v1a/model.pth").write_bytes(b"torch")
    with pytest.raises(common.ExperimentError, match="model.pth: conversion failed: verification"):
        common.resolve_checkpoint(root, "rn18", "cub", "v1a")
    monkeypatch.setitem(sys.modules, "converters.tree", None)  # torch missing
    with pytest.raises(common.ExperimentError, match="needs PyTorch.*convert-tree"):
        common.resolve_checkpoint(root, "rn18", "cub", "v1a")
    with pytest.raises(
        common.ExperimentError,
        match="rn18/oxford_pets/v1a: no checkpoint.*download_checkpoints.sh.*pleas-jax convert",
    ):
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
    assert m.image_size == SIZE and m.normalization is None and m.crop is None
    meta = checkpoint.load_metadata(saved)
    conv = tmp_path / "conv"
    shutil.copytree(saved, conv)
    meta.pop("image_size")
    meta["converted_from"] = "torch"
    (conv / checkpoint.METADATA_FILE).write_text(__import__("json").dumps(meta))
    m = common.load_source(conv)
    assert m.image_size == 224 and m.normalization is not None
    assert m.normalization[0] == common.IMAGENET_NORMALIZATION["mean"]
    assert m.crop == common.RELEASE_CROP == data.IMAGENET_CROP
    assert common.load_source(conv, image_size=64).image_size == 64
    with pytest.raises(common.ExperimentError, match="not a pleas-jax checkpoint.*pleas-jax train"):
        common.load_source(tmp_path)


def test_model_type_is_the_checkpoints_architecture():
    """What a run records: the release's name of the architecture, else
    pleas-jax's, else custom; never --model-type's default."""
    from pleas_jax import models
    from pleas_jax import workflow as wf

    for arch, want in (("resnet18", "rn18"), ("resnet50", "rn50"), ("resnet20", "resnet20")):
        assert common.model_type(wf.Model(models.resnet(arch, 10, width=4), {})) == want
    assert common.model_type(wf.Model(tiny(3), {})) == "custom"


def test_images_map_back_to_the_full_label_space(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)
    y = np.repeat([2, 5, 7], 10)  # three of the model's ten classes
    np.savez(tmp_path / "d.npz", x=x, y=y)
    images = streams.Images(f"npz:{tmp_path / 'd.npz'}", SIZE, num_classes=10)
    assert images.size("train") + images.size("test") == 30
    xs, ys = zip(*images.chunks("train", chunk=7), strict=True)
    assert [len(c) for c in ys] == [7, 7, 7, 3]
    assert set(np.concatenate(ys)) == {2, 5, 7}
    raw = np.concatenate(xs)
    # Raw pixels in [0, 1] at the asked size, whatever the spec's own normalisation.
    assert raw.shape[1:] == (SIZE, SIZE, 3) and -1e-4 < raw.min() and raw.max() < 1 + 1e-4
    with pytest.raises(common.ExperimentError, match="predicts 4"):
        streams.Images(f"npz:{tmp_path / 'd.npz'}", SIZE, num_classes=4).size("test")
    with pytest.raises(common.ExperimentError, match="no such file"):
        streams.Images(f"npz:{tmp_path / 'x.npz'}", SIZE).size("test")


def test_a_large_folder_is_served_lazily_with_its_raw_pixels(tmp_path, monkeypatch):
    from PIL import Image

    from pleas_jax import data

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png"
            )
    eager = streams.Images(f"folder:{tmp_path}", SIZE)
    want = eager.read("train", [3, 0, 5])
    monkeypatch.setattr(data, "EAGER_BYTES", 0)  # every folder is "large"
    lazy = streams.Images(f"folder:{tmp_path}", SIZE)
    assert isinstance(lazy._loaded()["train"][0], data.LazyImages)
    got = lazy.read("train", [3, 0, 5])
    np.testing.assert_array_equal(got[1], want[1])
    # Raw pixels: the lazy view skips the normalisation the eager arrays undo.
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)


def test_tfds_images_are_read_by_index_and_missing_ones_say_how_to_build(tmp_path):
    with common.maybe_mock_data(12):
        images = streams.Images("tfds:domainnet/real", 8, num_classes=345)
        assert images.size("test") == 12
        x = images.sample("train", 5, seed=0)
        assert x.shape == (5, 8, 8, 3) and x.dtype == np.float32 and x.max() <= 1.0
        np.testing.assert_array_equal(x, images.sample("train", 5, seed=0))
        ((_, y),) = [images.read("test", [0, 3])]
        assert y.dtype == np.int32 and ((0 <= y) & (y < 345)).all()
        with pytest.raises(common.ExperimentError, match="has label .* predicts 3 classes"):
            streams.Images("tfds:domainnet/real", 8, num_classes=3).read("test", range(12))
        # As the release's models read them: the mock's 16 px resized to 9, the central 8.
        cropped = streams.Images("tfds:domainnet/real", 8, num_classes=345, crop=0.875)
        assert not np.array_equal(cropped.sample("train", 5, seed=0), x)
        assert cropped.sample("train", 5, seed=0).shape == x.shape
        one = streams.Images("tfds:imagenet_v2:test", 8)
        assert one.size("train") == 12 and one.sample("train", 20, seed=1).shape == (12, 8, 8, 3)
        with pytest.raises(common.ExperimentError, match="names one split.*tfds:imagenet_v2\\)"):
            next(one.chunks("test"))
    missing = streams.Images("tfds:caltech_birds2011", 8, data_dir=str(tmp_path))
    with pytest.raises(common.ExperimentError, match="tfds build caltech_birds2011"):
        missing.size("test")


def test_dataset_specs(tmp_path, monkeypatch):
    monkeypatch.delenv(common.ENV_NABIRDS, raising=False)
    assert common.dataset_spec("cub", {}, None) == "tfds:caltech_birds2011"
    assert common.dataset_spec("painting", {}, None) == "tfds:domainnet/painting"
    assert common.dataset_spec("cub", {"cub": "folder:/x"}, None) == "folder:/x"
    (tmp_path / "nabirds" / "images").mkdir(parents=True)
    assert (
        common.dataset_spec("nabird", {}, str(tmp_path))
        == f"folder:{tmp_path / 'nabirds' / 'images'}"
    )
    # --data-dir's default, $TFDS_DATA_DIR, is searched as --data-dir is.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert common.dataset_spec("nabird", {}, None) == f"folder:{tmp_path / 'nabirds' / 'images'}"
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(common.ExperimentError, match="NABirds is not in tfds"):
        common.dataset_spec("nabird", {}, None)
    monkeypatch.setenv(common.ENV_NABIRDS, str(tmp_path))
    assert common.dataset_spec("nabird", {}, None) == f"folder:{tmp_path}"
    with pytest.raises(common.ExperimentError, match="unknown dataset 'mnist'"):
        common.dataset_spec("mnist", {}, None)


class _Fake:
    """Constant images, with :class:`streams.Images`'s ``sample`` alone."""

    def __init__(self, value):
        self.value = value

    def sample(self, split, n, seed):
        return np.full((n, 2, 2, 1), self.value, np.float32)


def test_merge_sample_is_balanced_mixed_and_seeded():
    x = streams.merge_sample([_Fake(0), _Fake(1)], 31, seed=3)
    batches = streams.to_batches(x, 10)
    assert [len(b) for b in batches] == [10, 10, 10, 1]
    assert (x[:, 0, 0, 0] == 0).sum() == 16 and (x[:, 0, 0, 0] == 1).sum() == 15
    np.testing.assert_array_equal(x, streams.merge_sample([_Fake(0), _Fake(1)], 31, seed=3))
    assert 0 < (batches[0][:, 0, 0, 0] == 1).sum() < 10  # batches mix the tasks


def test_method_runs_and_matching_cache(tmp_path):
    assert common.method_runs(["pleas_activation", "zipit"], ["zip", "optimized"]) == [
        ("pleas_activation", "zip"),
        ("pleas_activation", "optimized"),
        ("zipit", "zip"),
    ]
    # Activation matching with zip ratios and no least squares is ZipIt!: run once.
    assert common.method_runs(["perm_activation", "zipit"], ["zip", "optimized"]) == [
        ("perm_activation", "optimized"),
        ("zipit", "zip"),
    ]
    assert common.method_runs(["perm_activation"], ["zip"]) == [("perm_activation", "zip")]
    # What the runs record and the launcher names: only the settings merges read.
    assert common.merge_settings(["zipit"], ["optimized"], "gd", 50) == {
        "ratios": ["zip"],
        "least_squares": None,
        "gd_steps": None,
    }
    assert common.merge_settings(["pleas_weight", "zipit"], ["uniform"], "gd", 50) == {
        "ratios": ["uniform", "zip"],
        "least_squares": "gd",
        "gd_steps": 50,
    }
    assert common.merge_settings(["pleas_activation"], ["zip"], "closed_form", 50) == {
        "ratios": ["zip"],
        "least_squares": "closed_form",
        "gd_steps": None,
    }
    key = {"a": 1, "matching": "activation"}
    perm = {"layer1/conv1 kernel:3": np.array([1, 0, 2]), "fc:0": np.array([0, 1])}
    costs = {g: np.eye(len(p)) for g, p in perm.items()}
    common.MatchingCache(tmp_path).put(key, perm, costs)
    fresh = common.MatchingCache(tmp_path)
    got = fresh.get(key)
    assert got is not None
    got_perm, got_costs = got
    assert list(got_perm) == list(perm)
    for g in perm:
        np.testing.assert_array_equal(got_perm[g], perm[g])
        np.testing.assert_array_equal(got_costs[g], costs[g])
    assert fresh.get({**key, "a": 2}) is None and common.MatchingCache(None).get(key) is None


# Where each name ``experiments.common`` offers is defined.
HOMES = {
    release: [
        "BUDGETS",
        "DOMAINNET",
        "DOMAINNET_CLASSES",
        "DOMAINNET_PAIRS",
        "DOMAINS",
        "ENV_CHECKPOINTS",
        "ENV_NABIRDS",
        "FINE_GRAINED",
        "FINE_GRAINED_PAIRS",
        "IMAGENET_NORMALIZATION",
        "LEAST_SQUARES",
        "METHODS",
        "MODEL_TYPES",
        "ORDERS",
        "RATIOS",
        "RELEASE_CROP",
        "RELEASE_IMAGE_SIZE",
        "RESULT_FILE",
        "VARIANTS",
        "ExperimentError",
        "Method",
        "merge_settings",
        "method_runs",
    ],
    options: ["add_common_arguments", "check_common", "csv_list", "float_list", "spec_override"],
    sources: [
        "checkpoints_root",
        "features_model",
        "load_source",
        "model_type",
        "release_dir",
        "resolve_checkpoint",
        "source_paths",
    ],
    datasets: ["MOCK_IMAGE_SIZE", "dataset_spec", "is_papers_source", "maybe_mock_data"],
    runs: [
        "Timer",
        "command_line",
        "experiment_main",
        "finish_run",
        "read_result",
        "run_main",
        "settings",
        "write_result",
    ],
    merging: ["MatchingCache", "checkpoint_key", "merge_grid"],
}


def test_common_re_exports_the_split_modules_objects():
    offered = [n for names in HOMES.values() for n in names]
    assert sorted(common.__all__) == sorted(offered) and len(set(offered)) == len(offered)
    for module, names in HOMES.items():
        for name in names:
            assert getattr(common, name) is getattr(module, name), (module.__name__, name)
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                assert obj.__module__ == module.__name__, name
    # Imports go downward: no split module (nor streams) imports common.
    for module in [*HOMES, streams]:
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom):
                imported = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            else:
                continue
            assert "experiments.common" not in imported, module.__name__


@pytest.mark.parametrize("least_squares, want", [("closed_form", "pair"), ("gd", "per_merge")])
def test_gradient_runs_fit_over_the_data_even_in_a_grid(least_squares, want, monkeypatch, tmp_path):
    """Several closed-form fits share the pair's sums (the same solution); GD on
    those sums would be another procedure than the launcher's one-fit runs."""
    import argparse
    import importlib

    seen = []

    class _Stop(Exception):
        """Raised by the fake merge once it has seen its arguments."""

    def fake_merge(*args, **kwargs):
        seen.append(kwargs.get("statistics"))
        raise _Stop

    monkeypatch.setattr(importlib.import_module("pleas_jax.merge"), "merge", fake_merge)
    args = argparse.Namespace(
        methods=["pleas_activation"],
        ratios=["uniform"],
        budgets=[1.0, 1.5],
        least_squares=least_squares,
        gd_steps=5,
        seed=0,
        matching_cache=str(tmp_path),
        progress=False,
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / checkpoint.METADATA_FILE).write_text("{}")
    from pleas_jax import workflow

    model = workflow.Model(None, {}, name=str(tmp_path / "m"))
    with pytest.raises(_Stop):
        merging.merge_grid(args, model, model, [], heads="shared", cache_key={}, score=lambda m: {})
    assert seen == [want]
