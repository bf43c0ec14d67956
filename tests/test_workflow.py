"""Workflow helpers that the command tests do not reach directly."""

import json
import os
import stat

import numpy as np
import pytest

from pleas_jax import data, image_files, models
from pleas_jax.data import IMAGENET_NORMALIZATION
from pleas_jax.workflow import Model, RunError, check_pair, dataset_for, merge_batches, write_json


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_json_is_atomic_and_gets_a_plain_files_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": [np.int64(2)]})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [2]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    # Nothing but the two files: the temp file was renamed, not copied.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.json"]


def test_a_merge_of_a_large_folder_decodes_only_the_images_it_uses(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("n01", "n02", "n03"):
        (tmp_path / c).mkdir()
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.jpg"
            )
    monkeypatch.setattr(data, "EAGER_BYTES", 1 << 16)  # 48 training images at 64 px exceed it
    reads = []
    original = image_files.read_image

    def counted(p, s, crop=None):
        reads.append((p, crop))
        return original(p, s, crop)

    monkeypatch.setattr(image_files, "read_image", counted)
    # A converted torchvision model records its size and ImageNet normalisation:
    # no statistics pass over the folder.
    stem = {"params": {"conv1": {"kernel": np.zeros((7, 7, 3, 64), np.float32)}}}  # 3 channels
    model = Model(
        models.resnet("resnet18", num_classes=3),
        stem,
        metadata={"converted_from": "torch", "image_size": 64},
    )
    dataset = dataset_for(model, f"folder:{tmp_path}")
    assert isinstance(dataset.x_train, data.LazyImages) and not reads
    batches = merge_batches(dataset, images=10, batch_size=4)
    assert [b.shape for b in batches] == [(4, 64, 64, 3), (4, 64, 64, 3), (2, 64, 64, 3)]
    assert len(reads) == 10 and len(set(reads)) == 10
    # ...as torchvision evaluates it: resized, then the central square.
    assert {crop for _, crop in reads} == {0.875}


def test_a_pair_that_reads_images_differently_is_merged_with_a_warning(caplog):
    module = models.resnet("resnet18", num_classes=3)
    stem = {"params": {"conv1": {"kernel": np.zeros((7, 7, 3, 64), np.float32)}}}
    converted = Model(module, stem, metadata={"converted_from": "torch"}, name="c")
    trained = Model(
        module,
        stem,
        metadata={"image_size": 224, "normalization": IMAGENET_NORMALIZATION},
        name="t",
    )
    with caplog.at_level("WARNING", logger="pleas_jax.workflow"):
        check_pair(converted, converted)
        assert not caplog.records
        check_pair(converted, trained)
    (record,) = caplog.records
    assert record.getMessage() == (
        "c reads images centre-cropped (0.875) but t resized whole; the merge reads them as c does"
    )


def test_a_pair_trained_on_differently_normalised_inputs_is_merged_with_a_warning(caplog):
    module = models.resnet("resnet20", num_classes=5, width=4)
    stem = {"params": {"conv1": {"kernel": np.zeros((3, 3, 1, 4), np.float32)}}}

    def model(name, mean, std):
        norm = {"mean": [mean], "std": [std]}
        return Model(module, stem, metadata={"normalization": norm}, name=name)

    mnist = model("mnist", 0.1325, 0.3105)
    again = model("again", 0.13251, 0.31049)  # the same statistics, recomputed
    digits = model("digits", 0.3052, 0.3870)
    with caplog.at_level("WARNING", logger="pleas_jax.workflow"):
        check_pair(mnist, again)
        assert not caplog.records
        check_pair(mnist, digits)
    (record,) = caplog.records
    assert record.getMessage() == (
        "mnist and digits were trained on differently normalised inputs (mean [0.133], "
        "std [0.31] vs mean [0.305], std [0.387]); the merge normalises its data as mnist does"
    )


def test_merging_a_merge_names_the_problem_before_its_widths():
    a = models.resnet("resnet20", num_classes=5, width=4)
    merged = models.resnet("resnet20", num_classes=5, width=6)
    stem = lambda c: {"params": {"conv1": {"kernel": np.zeros((3, 3, 1, c), np.float32)}}}  # noqa: E731
    source = Model(a, stem(4), name="a")
    backbone = Model(merged, stem(6), heads={"a": {}, "b": {}}, name="ab")
    with pytest.raises(RunError, match="ab is already a merge with separate heads"):
        check_pair(backbone, source)


def test_asking_a_merge_for_more_images_than_the_split_holds_warns_and_uses_them_all(caplog):
    dataset = data.load("digits[0-1]", image_size=8)
    n = len(dataset.x_train)
    with caplog.at_level("WARNING", logger="pleas_jax.workflow"):
        batches = merge_batches(dataset, images=n, batch_size=64)
        assert not caplog.records
        more = merge_batches(dataset, images=100_000, batch_size=64)
    assert sum(map(len, more)) == sum(map(len, batches)) == n
    (record,) = caplog.records
    assert record.getMessage() == (
        f"'digits[0-1]' has {n} training images, fewer than the 100000 asked for; "
        "the merge uses all of them"
    )
