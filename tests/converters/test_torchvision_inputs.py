"""A converted torchvision model reads image files as torchvision evaluates it.

Truth: torchvision's own evaluation pipeline (``Resize(int(S / 0.875))``,
``CenterCrop(S)``, ``ToTensor``, ``Normalize`` with ImageNet's statistics) and
forward pass, on photos of several aspect ratios; ours is ``pleas-jax convert``
with its defaults, then :func:`pleas_jax.workflow.dataset_for` and ``predict``.
"""

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from pleas_jax import workflow
from pleas_jax.cli import main
from pleas_jax.data import IMAGENET_NORMALIZATION
from tests.converters.helpers import TOLERANCE, torchvision_model

SIZE = 64
SHAPES = [(90, 140), (150, 100), (80, 80)]


def test_a_converted_model_reads_a_folder_as_torchvision_evaluates_it(tmp_path):
    net = torchvision_model("resnet18", num_classes=4)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    assert (
        main(["convert", str(tmp_path / "r18.pth"), str(tmp_path / "c"), "--image-size", "64"]) == 0
    )

    rng = np.random.default_rng(0)
    files = []
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i, (h, w) in enumerate(SHAPES):
                yy, xx = np.mgrid[0:h, 0:w]
                a = np.stack([xx * 2, yy * 2, xx + yy], -1) % 256
                a = (a + rng.integers(0, 40, a.shape)).clip(0, 255).astype(np.uint8)
                path = tmp_path / "imgs" / split / c / f"{i}.png"
                Image.fromarray(a).save(path)
                if split == "val":
                    files.append(path)

    model = workflow.load_model(tmp_path / "c")
    assert model.image_size == SIZE and model.crop == 0.875
    dataset = workflow.dataset_for(model, f"folder:{tmp_path / 'imgs'}")
    ours = workflow.predict(model, dataset.x_test)

    pipeline = transforms.Compose(
        [
            transforms.Resize(int(SIZE / 0.875)),
            transforms.CenterCrop(SIZE),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_NORMALIZATION["mean"], IMAGENET_NORMALIZATION["std"]),
        ]
    )
    with torch.no_grad():
        x = torch.stack([pipeline(Image.open(p).convert("RGB")) for p in files])
        theirs = net(x).numpy()
    assert ours.shape == theirs.shape == (len(files), 4)
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) <= TOLERANCE
