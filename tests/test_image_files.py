"""Image files and their geometry: squashed, or resized and centre-cropped as torchvision does."""

import numpy as np
import pytest
from PIL import Image

from pleas_jax import data, image_files

# Landscape, portrait, square, and one smaller than the crop.
SHAPES = [(300, 451), (300, 449), (333, 250), (256, 256), (120, 90)]


def _photo(h, w, seed=0):
    """A smooth image with a bright frame, so crops and resizes both show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    a = a // 2 + rng.integers(0, 60, a.shape, dtype=np.uint8)
    a[:8], a[-8:], a[:, :8], a[:, -8:] = 255, 255, 255, 255
    return a


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size,crop", [(224, 0.875), (64, 0.875), (32, 1.0)])
def test_crop_is_torchvisions_resize_then_center_crop(tmp_path, shape, size, crop):
    transforms = pytest.importorskip("torchvision.transforms")
    path = tmp_path / "x.png"
    Image.fromarray(_photo(*shape)).save(path)
    want = transforms.Compose([transforms.Resize(int(size / crop)), transforms.CenterCrop(size)])
    with Image.open(path) as im:
        expected = np.asarray(want(im.convert("RGB")), np.float32) / 255.0
    got = image_files.read_image(path, size, crop)
    assert got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, expected)
    # Without a crop the whole image is squashed, frame included.
    squashed = image_files.read_image(path, size)
    with Image.open(path) as im:
        whole = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(squashed, whole.astype(np.float32) / 255.0)
    # (a square image cropped by 1 is the squashed one)
    assert np.array_equal(squashed, got) == (crop == 1 and shape[0] == shape[1])


def test_arrays_are_cropped_like_files(tmp_path):
    """npz arrays (resized by JAX) land where image files (resized by PIL) do."""
    photos = np.stack([_photo(90, 150, seed) for seed in range(4)])
    np.savez(tmp_path / "d.npz", x=photos, y=np.arange(4), x_test=photos, y_test=np.arange(4))
    for seed in range(4):
        (tmp_path / "f" / str(seed)).mkdir(parents=True)
        Image.fromarray(photos[seed]).save(tmp_path / "f" / str(seed) / "a.png")
    norm = ([0.0] * 3, [1.0] * 3)
    arrays = data.load(
        f"npz:{tmp_path / 'd.npz'}", image_size=48, normalization=norm, crop=0.875
    ).x_test
    files = data.load(
        f"folder:{tmp_path / 'f'}", image_size=48, normalization=norm, crop=0.875, lazy=False
    )
    order = np.argsort(files.y_train.tolist() + files.y_test.tolist())
    pictures = np.concatenate([files.x_train, files.x_test])[order]
    assert arrays.shape == pictures.shape == (4, 48, 48, 3)
    # Two bilinear implementations: close, not equal.
    assert np.abs(arrays - pictures).mean() < 0.01
    squashed = data.load(f"npz:{tmp_path / 'd.npz'}", image_size=48, normalization=norm).x_test
    assert np.abs(squashed - pictures).mean() > 0.05


def test_lazy_folder_crops_as_the_eager_one(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(_photo(70 + 9 * i, 100, i)).save(tmp_path / c / f"{i}.png")
    got = {
        lazy: data.load(f"folder:{tmp_path}", image_size=32, lazy=lazy, crop=0.875)
        for lazy in (False, True)
    }
    np.testing.assert_array_equal(np.asarray(got[True].x_train), got[False].x_train)
    np.testing.assert_array_equal(np.asarray(got[True].x_test), got[False].x_test)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), True, "0.875"])
def test_bad_crop_is_an_error(bad):
    with pytest.raises(ValueError, match=r"crop must be a fraction in \(0, 1\]"):
        data.load("digits", image_size=8, crop=bad)


def test_16_bit_grayscale_files_read_as_their_8_bit_twins(tmp_path):
    # PIL's plain convert("RGB") clips 16-bit values: mid-grey would read as white.
    g8 = np.random.default_rng(0).integers(0, 256, size=(9, 11)).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    want = image_files.read_image(tmp_path / "g8.png", 8)
    got = image_files.read_image(tmp_path / "g16.png", 8)
    np.testing.assert_array_equal(got, want)
    assert abs(float(want.mean()) - g8.mean() / 255) < 0.05
