"""tfds: specs on real array_record datasets, prepared here without TensorFlow.

Each example's image encodes which example it is (channel 0 is ``7 * id``)
and its label is ``id % 3``, so the decoded images can be matched with the
labels read beside them, whatever order tfds wrote the records in.
"""

import io

import numpy as np
import pytest
from PIL import Image

from pleas_jax import data, tfds_images

pytest.importorskip("tensorflow_datasets")
import tensorflow_datasets as tfds

TRAIN, HELD_OUT = 24, 9


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    buf.seek(0)
    return buf


def _example(i, gray):
    # Heights differ between examples, as in real datasets.
    h = 10 + i % 3
    if gray:
        return np.full((h, 12), 7 * i, np.uint8)
    a = np.empty((h, 12, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 7 * i, 255 - 7 * i, 100 * (i % 3)
    return a


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Examples 0..TRAIN-1 in ``train``, the next HELD_OUT in ``HELD_OUT_NAME``."""

    VERSION = tfds.core.Version("1.0.0")
    # Nothing to download: no checksums file to look up beside this module.
    url_infos = None
    GRAY = False
    HELD_OUT_NAME: str | None = "validation"
    LABEL = "label"

    def _info(self):
        shape = (None, None, 1) if self.GRAY else (None, None, 3)
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=shape),
                    self.LABEL: tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        splits = {"train": self._generate_examples(0, TRAIN)}
        if self.HELD_OUT_NAME:
            splits[self.HELD_OUT_NAME] = self._generate_examples(TRAIN, TRAIN + HELD_OUT)
        return splits

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"image": _png(_example(i, self.GRAY)), self.LABEL: i % 3}


class PleasTestRgb(_Builder):
    """RGB images; train and validation splits (the defaults above)."""


class PleasTestGray(_Builder):
    GRAY = True
    HELD_OUT_NAME = "test"


class PleasTestTrainOnly(_Builder):
    HELD_OUT_NAME = None


class PleasTestNoLabel(_Builder):
    LABEL = "target"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for b in (PleasTestRgb, PleasTestGray, PleasTestTrainOnly, PleasTestNoLabel):
        b(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def _ids(x, mean, std):
    """Example ids read back from channel 0 of normalised images."""
    raw = np.asarray(x) * std + mean
    return np.rint(raw[..., 0].mean(axis=(1, 2)) * 255 / 7).astype(int)


@pytest.mark.parametrize("lazy", [False, True])
def test_images_and_labels_match_what_was_written(data_dir, lazy):
    d = data.load("tfds:pleas_test_rgb", image_size=8, data_dir=data_dir, lazy=lazy)
    assert isinstance(d.x_train, data.LazyImages) == lazy
    assert d.x_train.shape == (TRAIN, 8, 8, 3) and d.x_test.shape == (HELD_OUT, 8, 8, 3)
    assert d.classes == (0, 1, 2)
    train, held = _ids(d.x_train, d.mean, d.std), _ids(d.x_test, d.mean, d.std)
    # The validation split is the held-out one; every example once.
    assert sorted(train) == list(range(TRAIN))
    assert sorted(held) == list(range(TRAIN, TRAIN + HELD_OUT))
    np.testing.assert_array_equal(d.y_train, train % 3)
    np.testing.assert_array_equal(d.y_test, held % 3)
    # Against PIL's own resize of the written image.
    raw = np.asarray(d.x_train[:1]) * d.std + d.mean
    i = int(train[0])
    want = (
        np.asarray(Image.fromarray(_example(i, False)).resize((8, 8), Image.Resampling.BILINEAR))
        / 255.0
    )
    np.testing.assert_allclose(raw[0], want, atol=1e-5)


@pytest.mark.parametrize("lazy", [False, True])
def test_crop_reads_the_central_square(data_dir, lazy):
    """Records are cropped as image files are (test_image_files checks that
    geometry against torchvision)."""
    from pleas_jax.image_files import fit

    d = data.load("tfds:pleas_test_rgb", image_size=8, data_dir=data_dir, lazy=lazy, crop=0.75)
    raw = np.asarray(d.x_train) * d.std + d.mean
    for row, i in enumerate(_ids(d.x_train, d.mean, d.std)[:4]):
        want = np.asarray(fit(Image.fromarray(_example(int(i), False)), 8, 0.75)) / 255.0
        np.testing.assert_allclose(raw[row], want, atol=1e-5)


def test_lazy_reads_only_what_is_indexed(data_dir, monkeypatch):
    decoded = []
    as_image = tfds_images.decode_image

    def counted(*a):
        decoded.append(1)
        return as_image(*a)

    monkeypatch.setattr(tfds_images, "decode_image", counted)
    monkeypatch.setattr(data, "STATS_IMAGES", 5)
    lazy = data.load("tfds:pleas_test_rgb", image_size=8, data_dir=data_dir, lazy=True)
    assert len(decoded) == 5  # the statistics' sample; labels decode no image
    eager = data.load("tfds:pleas_test_rgb", image_size=8, data_dir=data_dir, lazy=False)
    decoded.clear()
    idx = [3, 0, 7]
    got = np.asarray(lazy.x_train[idx]) * lazy.std + lazy.mean
    assert len(decoded) == 3
    want = eager.x_train[idx] * eager.std + eager.mean
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(lazy.y_train, eager.y_train)
    np.testing.assert_array_equal(lazy.y_test, eager.y_test)


def test_grayscale_and_a_named_split(data_dir):
    d = data.load("tfds:pleas_test_gray", image_size=6, data_dir=data_dir)
    assert d.x_train.shape == (TRAIN, 6, 6, 1) and d.x_test.shape == (HELD_OUT, 6, 6, 1)
    assert sorted(_ids(d.x_test, d.mean, d.std)) == list(range(TRAIN, TRAIN + HELD_OUT))
    # One named split is split deterministically, stratified by label.
    one = data.load("tfds:pleas_test_gray:train[1]", image_size=6, data_dir=data_dir)
    ids = np.concatenate(
        [_ids(one.x_train, one.mean, one.std), _ids(one.x_test, one.mean, one.std)]
    )
    assert sorted(ids) == [i for i in range(TRAIN) if i % 3 == 1]
    assert len(one.y_test) == round(len(ids) * data.TEST_FRACTION)


def test_errors(data_dir):
    with pytest.raises(
        data.DataError, match="no test or validation split.*tfds:pleas_test_train_only:SPLIT"
    ):
        data.load("tfds:pleas_test_train_only", image_size=8, data_dir=data_dir)
    assert len(data.load("tfds:pleas_test_train_only:train", data_dir=data_dir).y_train) > 0
    with pytest.raises(data.DataError, match="has no 'label' feature"):
        data.load("tfds:pleas_test_no_label", data_dir=data_dir)
    with pytest.raises(
        data.DataError, match="cannot open tfds dataset 'pleas_test_rgb' split 'nope'"
    ):
        data.load("tfds:pleas_test_rgb:nope", data_dir=data_dir)
    with pytest.raises(
        data.DataError, match="cannot open tfds dataset 'pleas_absent'.*TFDS_DATA_DIR"
    ):
        data.load("tfds:pleas_absent", data_dir=data_dir)


def test_tfrecord_files_say_how_to_convert(data_dir, tmp_path):
    # Writing TFRecord files needs TensorFlow; a copy of an array_record
    # dataset whose info names TFRecord is what tfds then tries to open.
    import shutil

    shutil.copytree(f"{data_dir}/pleas_test_rgb", tmp_path / "pleas_test_rgb")
    info = tmp_path / "pleas_test_rgb" / "1.0.0" / "dataset_info.json"
    text = info.read_text()
    assert '"fileFormat": "array_record"' in text
    info.write_text(text.replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
    with pytest.raises(data.DataError, match="stored as TFRecord.*--out_file_format=array_record"):
        data.load("tfds:pleas_test_rgb", data_dir=str(tmp_path))


def test_a_model_reads_lazy_images_as_it_reads_the_decoded_ones(data_dir):
    from pleas_jax import models, workflow
    from tests.helpers import init

    module = models.ResNet("basic", (1,), 4, (8,), ((4,),), (True,), 3, "imagenet", (1,))
    model = workflow.Model(module, init(module, 8), metadata={"image_size": 8}, name="m")
    got = {
        lazy: data.load("tfds:pleas_test_rgb", image_size=8, data_dir=data_dir, lazy=lazy)
        for lazy in (False, True)
    }
    logits = {k: workflow.predict(model, d.x_test, batch_size=4) for k, d in got.items()}
    assert logits[True].shape == (HELD_OUT, 3)
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_labels_of_a_large_split_are_read_once(data_dir, monkeypatch, tmp_path):
    import os
    from pathlib import Path

    cache = tmp_path / "cache" / "tfds-labels"
    monkeypatch.setenv("PLEAS_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tfds_images, "CACHE_RECORDS", 10)
    reads = []
    read = tfds_images.TfdsImages._read_labels

    def counted(self):
        reads.append(str(self.source.split))
        return read(self)

    def labels(split):
        return tfds_images.TfdsImages.open("pleas_test_rgb", split, data_dir).labels()

    monkeypatch.setattr(tfds_images.TfdsImages, "_read_labels", counted)
    first = labels("train")
    assert reads == ["train"] and len(list(cache.iterdir())) == 1
    again = labels("train")
    assert reads == ["train"]  # from the cache
    np.testing.assert_array_equal(again, first)
    train = tfds_images.TfdsImages.open("pleas_test_rgb", "train", data_dir)
    np.testing.assert_array_equal(first, read(train))
    # A split under the threshold (9 records) is not kept; another split is its own entry.
    labels("validation")
    assert len(list(cache.iterdir())) == 1
    labels("train[:12]")
    labels("train[:12]")
    assert reads == ["train", "validation", "train[:12]"] and len(list(cache.iterdir())) == 2
    # A rewritten record file is read again.
    version = Path(data_dir) / "pleas_test_rgb" / "1.0.0"
    (shard,) = [p for p in version.iterdir() if "train.array_record" in p.name]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    labels("train")
    assert reads[-1] == "train" and len(reads) == 4
