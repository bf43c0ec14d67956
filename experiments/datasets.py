"""The paper's datasets as pleas-jax data specs, and the mocked tfds the tests run on.

:func:`dataset_spec` names where a dataset of the paper (``cub``, ``clipart``,
...) is read from; :mod:`experiments.streams` reads it; :func:`is_papers_source`
tells the paper's source from a ``--spec`` that replaced it. :func:`maybe_mock_data`
replaces every tfds source with small random images, so the experiments run end
to end in tests without the network or the disk.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from experiments.release import DOMAINNET, DOMAINS, ENV_NABIRDS, FINE_GRAINED, ExperimentError


# ------------------------------------------------------------------- data
def dataset_spec(name: str, overrides: Mapping[str, str], data_dir: str | None) -> str:
    """The data spec of a dataset of the paper (``cub``, ``clipart``, ...).

    NABirds is not in tfds: it is read as an image folder (one sub-folder per
    class), ``--spec nabird=folder:PATH``, else ``$NABIRDS_DIR``, else
    ``DATA_DIR/nabirds/images`` or ``DATA_DIR/nabirds`` (``DATA_DIR``: ``data_dir``,
    else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).

    Raises:
      ExperimentError: an unknown name, or NABirds not found.
    """
    if name in overrides:
        return overrides[name]
    if name in DOMAINS:
        return f"tfds:{DOMAINNET}/{name}"
    if name not in FINE_GRAINED:
        raise ExperimentError(
            f"unknown dataset {name!r}; choose from {', '.join([*FINE_GRAINED, *DOMAINS])}"
        )
    if FINE_GRAINED[name] is not None:
        return f"tfds:{FINE_GRAINED[name]}"
    candidates = []
    if os.environ.get(ENV_NABIRDS):
        candidates.append(Path(os.environ[ENV_NABIRDS]))
    # --data-dir's own default, as tfds has it.
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")
    candidates += [root / "nabirds" / "images", root / "nabirds"]
    for c in candidates:
        if c.is_dir():
            return f"folder:{c}"
    raise ExperimentError(
        "NABirds is not in tfds: download it from https://dl.allaboutbirds.org/nabirds and pass "
        f"--spec nabird=folder:PATH/nabirds/images (one folder per class), set {ENV_NABIRDS}, "
        "or put it under --data-dir as nabirds/images"
    )


def is_papers_source(name: str, spec: str) -> bool:
    """Whether ``spec`` reads the paper's dataset ``name``: its tfds source, or
    for NABirds (not in tfds) any image folder, the way it is given. Any other
    spec (``--spec cub=mnist5k[0-4]``, a label subset) replaced the dataset, and
    the report names it ``NAME=SPEC`` rather than claim it was ``NAME``."""
    if name == "nabird":
        return spec.startswith("folder:")
    if name in DOMAINS:
        return spec == f"tfds:{DOMAINNET}/{name}"
    return FINE_GRAINED.get(name) is not None and spec == f"tfds:{FINE_GRAINED[name]}"


# -------------------------------------------------------------- mock data
MOCK_IMAGE_SIZE = 16


class _MockSource:
    """A stand-in for a tfds data source (``tfds.data_source``): ``examples``
    random RGB images ``[16, 16, 3]`` with random labels of the dataset's label
    space, seeded by dataset, config and split. Images come PNG-encoded when
    the reader skips their decoding (``tfds.decode.SkipDecoding``), as array_record
    files hold them, else as arrays. tfds' own mock draws images of random
    sizes and encodes them with TensorFlow; fixed small ones keep the tests'
    reading cheap."""

    def __init__(self, builder, split, examples: int, decoders=None):
        import tensorflow_datasets as tfds

        self.dataset_info, self.split = builder.info, split
        config = builder.builder_config.name if builder.builder_config else ""
        rng = np.random.default_rng(zlib.crc32(f"{builder.name}/{config}/{split}".encode()))
        k = builder.info.features["label"].num_classes
        size = (MOCK_IMAGE_SIZE, MOCK_IMAGE_SIZE, 3)
        self._examples = [
            (rng.integers(0, 256, size, dtype=np.uint8), int(rng.integers(k)))
            for _ in range(examples)
        ]
        self._encoded = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> dict:
        image, label = self._examples[i]
        if self._encoded:
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            return {"image": buf.getvalue(), "label": label}
        return {"image": image, "label": label}

    def __getitems__(self, keys) -> list[dict]:
        return [self[int(i)] for i in keys]


def _mock_source(examples: int):
    """A stand-in for ``DatasetBuilder.as_data_source`` (:class:`_MockSource`)."""

    def as_data_source(builder, split=None, *args, decoders=None, **kwargs):
        return _MockSource(builder, split, examples, decoders)

    return as_data_source


@contextlib.contextmanager
def maybe_mock_data(examples: int | None) -> Iterator[None]:
    """Run inside ``tfds.testing.mock_data`` when ``examples`` is given (tests),
    else do nothing. Every tfds source then holds ``examples`` random images per
    split (:func:`_mock_source`) and nothing touches the network or the disk."""
    if examples is None:
        yield
        return
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=examples, as_data_source_fn=_mock_source(examples)):
        yield
