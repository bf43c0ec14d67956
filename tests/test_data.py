"""Data specs: bundled sets, subsets, npz, folders, batching (tfds: test_tfds_images)."""

import numpy as np
import pytest

from pleas_jax import data, image_files


def test_parse_subset():
    assert data.parse_subset("mnist5k[0-4]") == ("mnist5k", (0, 1, 2, 3, 4))
    assert data.parse_subset("digits[5,1, 3]") == ("digits", (1, 3, 5))
    assert data.parse_subset("npz:/a/b.npz") == ("npz:/a/b.npz", None)
    with pytest.raises(data.DataError, match="bad label range"):
        data.parse_subset("digits[4-1]")
    assert data.parse_subset("digits [0-2]") == ("digits", (0, 1, 2))
    with pytest.raises(data.DataError, match="spans over 1,000,000"):
        data.parse_subset("digits[0-999999999]")


def test_digits_split_is_deterministic_and_stratified():
    a, b = data.load("digits"), data.load("digits")
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.x_train.shape[1:] == (32, 32, 1) and a.x_train.dtype == np.float32
    assert len(a.y_train) + len(a.y_test) == 1797
    assert abs(len(a.y_test) / 1797 - 0.2) < 0.01
    assert set(np.unique(a.y_test)) == set(range(10))
    x = np.asarray(a.x_train)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_mnist5k_subset_relabels():
    d = data.load("mnist5k[5-9]")
    assert d.classes == (5, 6, 7, 8, 9) and d.num_classes == 5
    assert set(np.unique(d.y_train)) == set(range(5))
    assert len(d.y_train) + len(d.y_test) == 2500


def test_npz_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(40, 16, 16, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = data.load(f"npz:{tmp_path / 'd.npz'}[1,2]", image_size=16)
    assert d.x_train.shape[1:] == (16, 16, 3) and d.num_classes == 2
    with pytest.raises(data.DataError, match="no such file"):
        data.load(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(data.DataError, match="lacks the array 'y'"):
        data.load(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(data.DataError, match="unknown data spec"):
        data.load("imagenet")
    with pytest.raises(data.DataError, match=r"no class \[7\]"):
        data.load(f"npz:{tmp_path / 'd.npz'}[1,7]")


def test_npz_with_keras_names_grayscale_and_a_test_split(tmp_path):
    rng = np.random.default_rng(1)
    xtr = rng.integers(0, 255, size=(30, 12, 12), dtype=np.uint8)  # [N, H, W], as Keras's mnist.npz
    ytr = np.repeat(np.arange(3), 10)
    xte, yte = xtr[:6] // 2, ytr[:6]
    np.savez(tmp_path / "k.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    d = data.load(f"npz:{tmp_path / 'k.npz'}", image_size=12)
    assert d.x_train.shape == (30, 12, 12, 1) and d.x_test.shape == (6, 12, 12, 1)
    np.testing.assert_array_equal(d.y_test, yte)
    # The test images keep their own (halved) values under the training normalisation.
    mean, std = xtr.mean() / 255.0, xtr.std() / 255.0
    np.testing.assert_allclose(d.x_test[..., 0], (xte / 255.0 - mean) / std, rtol=1e-4, atol=1e-4)
    np.savez(tmp_path / "half.npz", x_train=xtr, y_train=ytr, x_test=xte)
    with pytest.raises(data.DataError, match="has 'x_test' but lacks 'y_test'"):
        data.load(f"npz:{tmp_path / 'half.npz'}")
    np.savez(tmp_path / "shape.npz", x=xtr, y=ytr, x_test=xte[:, :6], y_test=yte)
    with pytest.raises(data.DataError, match="test images"):
        data.load(f"npz:{tmp_path / 'shape.npz'}")
    np.savez(tmp_path / "flat.npz", x=xtr.reshape(30, -1), y=ytr)
    with pytest.raises(data.DataError, match=r"x must be \[N, H, W, C\] or \[N, H, W\]"):
        data.load(f"npz:{tmp_path / 'flat.npz'}")


def test_folder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = data.load(f"folder:{tmp_path}", image_size=8)
    assert d.num_classes == 2 and d.x_train.shape[1:] == (8, 8, 3)
    assert len(d.y_train) + len(d.y_test) == 10
    # Subsets are label numbers; names get an error that lists the numbering.
    assert data.load(f"folder:{tmp_path}[1]", image_size=8).classes == (1,)
    with pytest.raises(data.DataError) as e:
        data.load(f"folder:{tmp_path}[cat,dog]", image_size=8)
    assert str(e.value) == (
        f"folder:{tmp_path}[cat,dog]: a subset takes class numbers, not names; the classes "
        f"of {tmp_path} are numbered in sorted order (0=cat, 1=dog), e.g. folder:{tmp_path}[0-1]"
    )
    with pytest.raises(data.DataError, match="no such folder"):
        data.load(f"folder:{tmp_path / 'nope'}[cat]", image_size=8)


def test_folder_reads_the_files_and_labels_torchvisions_image_folder_does(tmp_path):
    from PIL import Image

    datasets = pytest.importorskip("torchvision.datasets")
    for c, suffix in (("a", "ppm"), ("b", "tif"), ("c", "pgm"), ("d", "jpg")):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), 30 * i, np.uint8)).convert(
                "L" if suffix == "pgm" else "RGB"
            ).save(tmp_path / c / f"{i}.{suffix}")
        (tmp_path / c / "notes.txt").write_text("not an image")
    want = [(str(p), y) for p, y in datasets.ImageFolder(str(tmp_path)).samples]
    files, labels = data._class_files(tmp_path, sorted(p.name for p in tmp_path.iterdir()))
    assert [(str(f), y) for f, y in zip(files, labels, strict=True)] == want
    assert len(want) == 12


def _image_folder(root, classes=("ant", "bee", "cat"), per_class=7, seed=0):
    """Random RGB images of assorted sizes and formats, one sub-folder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir()
        for i in range(per_class):
            h, w = rng.integers(9, 30, size=2)
            img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            img.save(root / c / f"{i}.{('png', 'bmp')[i % 2]}")
        (root / c / "notes.txt").write_text("not an image")
    return root


def _count_reads(monkeypatch):
    reads = []
    original = image_files.read_image

    def counting(path, size, crop=None):
        reads.append(path)
        return original(path, size, crop)

    monkeypatch.setattr(image_files, "read_image", counting)
    return reads


@pytest.mark.parametrize("spec", ["", "[0,2]"])
def test_lazy_folder_serves_the_eager_arrays(tmp_path, monkeypatch, spec):
    """Second implementation: the folder read whole. Same labels, statistics
    and pixels, whatever the indexing."""
    root = _image_folder(tmp_path)
    eager = data.load(f"folder:{root}{spec}", image_size=12, lazy=False)
    reads = _count_reads(monkeypatch)
    lazy = data.load(f"folder:{root}{spec}", image_size=12, lazy=True)
    assert isinstance(lazy.x_train, data.LazyImages) and isinstance(eager.x_train, np.ndarray)
    n = len(eager.y_train)
    assert len(reads) == n  # the training statistics read the split once (n < STATS_IMAGES)
    np.testing.assert_array_equal(lazy.y_train, eager.y_train)
    np.testing.assert_array_equal(lazy.y_test, eager.y_test)
    np.testing.assert_array_equal(lazy.mean, eager.mean)
    np.testing.assert_array_equal(lazy.std, eager.std)
    assert lazy.x_train.shape == eager.x_train.shape and lazy.x_test.shape == eager.x_test.shape
    rng = np.random.default_rng(1)
    for key in (
        slice(2, 7),
        slice(None, None, 3),
        rng.permutation(n)[:5],
        rng.random(n) < 0.5,
        -1,
        0,
    ):
        np.testing.assert_array_equal(lazy.x_train[key], eager.x_train[key])
    np.testing.assert_array_equal(np.asarray(lazy.x_test), eager.x_test)
    for xb, eb in zip(
        data.batches(lazy.x_train, None, 4, shuffle=True, seed=2, limit=9),
        data.batches(eager.x_train, None, 4, shuffle=True, seed=2, limit=9),
        strict=True,
    ):
        np.testing.assert_array_equal(xb, eb)
    with pytest.raises(TypeError, match="first axis"):
        lazy.x_train[:, 0]


def test_large_folders_are_read_lazily_and_only_where_used(tmp_path, monkeypatch):
    root = _image_folder(tmp_path, per_class=10)
    monkeypatch.setattr(data, "EAGER_BYTES", 10 * 16 * 16 * 3 * 4)  # room for 10 images
    monkeypatch.setattr(data, "STATS_IMAGES", 5)
    reads = _count_reads(monkeypatch)
    d = data.load(f"folder:{root}", image_size=16)
    assert isinstance(d.x_train, data.LazyImages) and len(d.y_train) == 24
    assert len(reads) == 5  # the statistics' sample
    reads.clear()
    given = data.load(f"folder:{root}", image_size=16, normalization=(d.mean, d.std))
    assert not reads  # nothing decoded before it is used
    batch = next(data.batches(given.x_train, None, 3, shuffle=True, seed=0))
    assert batch.shape == (3, 16, 16, 3) and len(reads) == 3
    np.testing.assert_allclose(batch.mean(), 0.0, atol=1.0)  # normalised on reading
    # A small folder is still read whole.
    monkeypatch.setattr(data, "EAGER_BYTES", 1 << 30)
    assert isinstance(data.load(f"folder:{root}", image_size=16).x_train, np.ndarray)


def test_a_bad_image_file_is_named(tmp_path):
    root = _image_folder(tmp_path, per_class=3)
    (root / "bee" / "1.bmp").write_bytes(b"not a bitmap")
    lazy = data.load(
        f"folder:{root}", image_size=8, lazy=True, normalization=([0.5] * 3, [0.25] * 3)
    )
    with pytest.raises(data.DataError, match=r"cannot read image .*bee/1\.bmp"):
        np.asarray(lazy.x_train), np.asarray(lazy.x_test)
    with pytest.raises(data.DataError, match=r"cannot read image .*bee/1\.bmp"):
        data.load(f"folder:{root}", image_size=8)


@pytest.mark.parametrize("lazy", [False, True])
def test_imagenet_layout_gives_the_splits(tmp_path, lazy):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    _image_folder(tmp_path / "train", per_class=4)
    _image_folder(tmp_path / "val", classes=("ant", "cat"), per_class=2, seed=1)
    d = data.load(f"folder:{tmp_path}", image_size=8, lazy=lazy)
    # Labels follow train/'s sorted class names; val/ may lack some (bee).
    np.testing.assert_array_equal(d.y_train, np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(d.y_test, [0, 0, 2, 2])
    assert d.x_test.shape == (4, 8, 8, 3)
    sub = data.load(f"folder:{tmp_path}[1,2]", image_size=8, lazy=lazy)
    np.testing.assert_array_equal(sub.y_test, [1, 1])
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(data.DataError, match=r"val has classes that .*train lacks: \['dog'\]"):
        data.load(f"folder:{tmp_path}", image_size=8, lazy=lazy)


def test_batches_cover_everything_once():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.arange(10)
    seen = np.concatenate([b[1] for b in data.batches(x, y, 4, shuffle=True, seed=3)])
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b) for b in data.batches(x, None, 4)] == [4, 4, 2]
    assert [len(b) for b in data.batches(x, None, 4, drop_last=True)] == [4, 4]
    aug = next(data.batches(np.ones((3, 8, 8, 3), np.float32), None, 3, augment=True))
    assert aug.shape == (3, 8, 8, 3)


def test_given_normalization():
    own = data.load("digits[0-4]", image_size=8)
    full = data.load("digits", image_size=8)
    same = data.load("digits[0-4]", image_size=8, normalization=(full.mean, full.std))
    np.testing.assert_array_equal(same.mean, full.mean)
    # The same raw pixels, normalised with the full data's statistics.
    raw = own.x_train * own.std + own.mean
    np.testing.assert_allclose(same.x_train, (raw - full.mean) / full.std, atol=1e-5)
    with pytest.raises(data.DataError, match="1-channel images but the normalization has 3"):
        data.load("digits", image_size=8, normalization=([0.5] * 3, [0.2] * 3))


def test_npz_pixel_types_are_scaled_to_the_unit_range(tmp_path):
    rng = np.random.default_rng(3)
    x8 = rng.integers(0, 256, size=(20, 6, 6, 3)).astype(np.uint8)
    y = np.arange(20) % 2
    stats = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # a recorded normalisation, as eval uses

    def read(name, x):
        # A given test split: the training images are read in their order.
        np.savez(tmp_path / name, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
        return np.asarray(
            data.load(f"npz:{tmp_path / name}", image_size=6, normalization=stats).x_train
        )

    want = (x8 / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(read("u8.npz", x8), want, atol=1e-5)
    for dtype in (np.int64, np.int32, np.uint32, np.int16):
        np.testing.assert_allclose(read("i.npz", x8.astype(dtype)), want, atol=1e-5)
    np.testing.assert_allclose(read("f.npz", x8 / 255.0), want, atol=1e-5)
    np.testing.assert_allclose(read("u16.npz", x8.astype(np.uint16) * 257), want, atol=1e-5)
    with pytest.raises(data.DataError, match=r"0-255 \(or be uint16\), got int64 values -1\.\.2"):
        read("neg.npz", np.where(x8 == 0, -1, x8.astype(np.int64)))
    with pytest.raises(data.DataError, match=r"channels first \(NCHW\)"):
        read("nchw.npz", x8.transpose(0, 3, 1, 2).repeat(2, axis=2).repeat(2, axis=3))


def test_npz_float_images_past_one_are_warned_of(tmp_path, caplog):
    x = np.random.default_rng(0).uniform(0, 255, size=(10, 4, 4, 1))
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(10) % 2)
    with caplog.at_level("WARNING", "pleas_jax.data"):
        data.load(f"npz:{tmp_path / 'f.npz'}", image_size=4)
    assert "read as values in [0, 1], but they reach 25" in caplog.text


def test_npz_labels_must_be_class_integers(tmp_path):
    x = np.zeros((8, 4, 4, 1), np.uint8)

    def load(y):
        np.savez(tmp_path / "l.npz", x=x, y=y)
        return data.load(f"npz:{tmp_path / 'l.npz'}", image_size=4)

    # Keras's CIFAR archives hold labels as [N, 1]; integral floats are labels too.
    assert load((np.arange(8) % 2)[:, None]).classes == (0, 1)
    assert load((np.arange(8) % 2).astype(np.float32)).classes == (0, 1)
    for bad in (np.array(["cat", "dog"] * 4), np.arange(8) / 2, np.arange(8) - 1):
        with pytest.raises(data.DataError, match="must hold non-negative integer class labels"):
            load(bad)
    with pytest.raises(data.DataError, match=r"one label per image, \[8\], got \[8, 2\]"):
        load(np.zeros((8, 2), np.int64))


def test_a_training_split_without_images_is_an_error(tmp_path):
    x = np.zeros((6, 4, 4, 1), np.uint8)
    # Class 2 exists only among the test images.
    np.savez(tmp_path / "t.npz", x_train=x, y_train=np.arange(6) % 2, x_test=x[:2], y_test=[2, 2])
    with pytest.raises(data.DataError, match=r"the training split has no images"):
        data.load(f"npz:{tmp_path / 't.npz'}[2]", image_size=4)
    # With a model's recorded normalisation there is nothing to compute: it reads.
    d = data.load(f"npz:{tmp_path / 't.npz'}[2]", image_size=4, normalization=([0.5], [0.2]))
    assert len(d.y_train) == 0 and len(d.y_test) == 2
