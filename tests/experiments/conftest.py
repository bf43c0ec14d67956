"""Tiny source checkpoints in the release's layout, and mock data, for the experiment tests.

The source models are one-block ResNets of width 4 on 16 px images with random
weights. Their BatchNorm statistics are recomputed on exactly the images the
experiment's merge sees, so that a merge at budget 2 (which recomputes the
merged model's statistics on those images) computes the same function as the
ensemble: the tests can then compare accuracies exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from experiments import common, streams
from pleas_jax import checkpoint, models, recompute_batch_norm
from pleas_jax import workflow as wf
from tests.helpers import init, randomize_norms

SIZE = 16
MOCK = 24  # examples per split of each mocked tfds source
IMAGES = 40  # merge images
BATCH = 20
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def tiny(num_classes: int) -> models.ResNet:
    """A one-block basic ResNet with an ImageNet stem: cheap to compile."""
    return models.ResNet("basic", (1,), 4, (8,), ((4,),), (True,), num_classes, "imagenet", (1,))


def write_pair(root, dirs, num_classes, specs):
    """Save two tiny models (``num_classes`` each) into ``root`` at the release
    paths ``dirs``, with BN statistics of the merge images the experiment draws
    from ``specs`` (read as model A reads them)."""
    meta: dict[str, Any] = {"image_size": SIZE, "normalization": NORM}
    sources = []
    for seed, k in enumerate(num_classes):
        module = tiny(k)
        sources.append((module, randomize_norms(init(module, SIZE, seed), seed)))
    model_a = wf.Model(*sources[0], metadata=meta, name="a")
    with common.maybe_mock_data(MOCK):
        raw = streams.merge_sample([streams.Images(s, SIZE) for s in specs], IMAGES, 0)
    batches = streams.to_batches(streams.prepare(model_a, raw), BATCH)
    paths = []
    for (module, variables), rel in zip(sources, dirs, strict=True):
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save(out, module, recompute_batch_norm(module, variables, batches), **meta)
        paths.append(out)
    return paths


@pytest.fixture(scope="session")
def domainnet_tree(tmp_path_factory):
    """A release tree with rn18 DomainNet models: clipart/v1a is itself a
    checkpoint, painting/v1b holds one in ``pleas_jax/`` (converted beside model.pth)."""
    root = tmp_path_factory.mktemp("ckpts")
    write_pair(
        root,
        ["rn18/domainnet/clipart/v1a", "rn18/domainnet/painting/v1b/pleas_jax"],
        [common.DOMAINNET_CLASSES] * 2,
        ["tfds:domainnet/clipart", "tfds:domainnet/painting"],
    )
    return root


NABIRD_CLASSES = 3


def image_folder(root, classes=NABIRD_CLASSES, per_class=10, seed=0):
    """An image-folder dataset (one sub-folder of PNGs per class), NABirds' layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"{c:04d}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"{c:04d}" / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def fine_grained_tree(tmp_path_factory):
    """``(checkpoint root, nabirds folder)``: rn18 models of cub (v1a, 200
    classes) and nabird (v1b, a 3-class image folder)."""
    root = tmp_path_factory.mktemp("ckpts_fg")
    nabirds = image_folder(tmp_path_factory.mktemp("data") / "nabirds" / "images")
    write_pair(
        root,
        ["rn18/cub/v1a", "rn18/nabird/v1b"],
        [200, NABIRD_CLASSES],
        ["tfds:caltech_birds2011", f"folder:{nabirds}"],
    )
    return root, nabirds
