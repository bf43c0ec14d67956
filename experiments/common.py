"""What the paper's experiments share: the release's layout, methods, budgets, data and caches.

Checkpoints follow the PyTorch release's tree (``experiments/download_checkpoints.sh``
fetches it)::

    ROOT/{model_type}/{dataset}/{variant}/              fine-grained sets
    ROOT/{model_type}/domainnet/{domain}/{variant}/     DomainNet

with ``model_type`` in rn18, rn50, rn101 and ``variant`` in v1a, v1b, v2a, v2b. A
variant directory is used, in this order, as: a pleas-jax checkpoint itself (what
``pleas-jax convert-tree SRC DST`` writes into ``DST``); ``{variant}/pleas_jax/``, a
checkpoint converted beside the release's file; or ``{variant}/model.pth``, converted
on the fly into ``{variant}/pleas_jax/`` (needs torch and ``converters``).

A *method* is a merge recipe (:data:`METHODS`): a matching, whether least squares
runs, and a ratio allocation. Its names are the original launchers' ``--merging``
values plus ``zipit``.

Errors a user can fix raise :class:`ExperimentError` with one line that says what is
missing and how to get it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pleas_jax import data as data_lib
    from pleas_jax import workflow as wf

MODEL_TYPES = {"rn18": "resnet18", "rn50": "resnet50", "rn101": "resnet101"}
VARIANTS = ("v1a", "v1b", "v2a", "v2b")
# The paper's budgets (compute relative to one model) per architecture.
BUDGETS = {
    "rn18": (1.0, 1.24, 1.46, 1.71, 2.0),
    "rn50": (1.0, 1.2, 1.55, 1.8, 2.0),
    "rn101": (1.0, 1.1, 1.7, 1.8, 2.0),
}
DOMAINNET = "domainnet"
DOMAINS = ("clipart", "infograph", "painting", "real")
DOMAINNET_CLASSES = 345
# Fine-grained datasets: the release's directory name -> tfds name (NABirds is not in
# tfds; it is read as an image folder, see :func:`dataset_spec`).
FINE_GRAINED = {
    "cub": "caltech_birds2011",
    "oxford_pets": "oxford_iiit_pet",
    "stanford_dogs": "stanford_dogs",
    "nabird": None,
}
# The release's grids: unordered pairs; each is run in both model orders.
FINE_GRAINED_PAIRS = (
    ("cub", "oxford_pets"),
    ("cub", "stanford_dogs"),
    ("oxford_pets", "nabird"),
    ("nabird", "stanford_dogs"),
    ("cub", "nabird"),
    ("stanford_dogs", "oxford_pets"),
)
DOMAINNET_PAIRS = (
    ("clipart", "painting"),
    ("clipart", "infograph"),
    ("clipart", "real"),
    ("painting", "infograph"),
    ("painting", "real"),
    ("infograph", "real"),
)
ORDERS = (("v1a", "v1b"), ("v1b", "v1a"))
# ImageNet statistics: the release's torchvision models were trained on inputs
# normalised with them, and converted checkpoints do not record it.
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
RELEASE_IMAGE_SIZE = 224
RESULT_FILE = "result.json"
ENV_CHECKPOINTS = "MODEL_CHECKPOINTS_DIR"
ENV_NABIRDS = "NABIRDS_DIR"


class ExperimentError(ValueError):
    """An experiment that cannot run as asked; the message says what to do."""


def _pleas():
    # pleas_jax (JAX, orbax) is imported when a run needs it, not by the launcher
    # and the report, which only read this module's tables.
    from pleas_jax import checkpoint, workflow
    from pleas_jax import data as data_lib

    return checkpoint, data_lib, workflow


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge recipe.

    Attributes:
      matching: ``"activation"`` or ``"weight"``.
      least_squares: whether the LeaS step runs (its mode is a run setting).
      ratios: a fixed ratio allocation (ZipIt!'s is stage-wise), else ``None``:
        the run's ``--ratios``.
      label: for tables.
    """

    matching: str
    least_squares: bool
    ratios: str | None
    label: str


METHODS = {
    "pleas_activation": Method("activation", True, None, "PLeaS (activation matching)"),
    "pleas_weight": Method("weight", True, None, "PLeaS (weight matching)"),
    "weight_matching": Method("weight", False, None, "weight matching"),
    "perm_activation": Method("activation", False, None, "activation matching"),
    "zipit": Method("activation", False, "zip", "ZipIt!-style partial merging"),
}
RATIOS = ("uniform", "zip", "optimized")
LEAST_SQUARES = ("closed_form", "gd")


# -------------------------------------------------------------- arguments
def csv_list(text: str) -> list[str]:
    """``"a, b,c" -> ["a", "b", "c"]`` (argparse type)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def float_list(text: str) -> list[float]:
    """``"1, 1.5" -> [1.0, 1.5]`` (argparse type)."""
    try:
        return [float(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def spec_override(text: str) -> tuple[str, str]:
    """``"nabird=folder:/data/nabirds/images" -> ("nabird", "folder:...")`` (argparse type)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC, got {text!r}")
    return name.strip(), spec.strip()


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options both experiment scripts take (the launcher forwards them)."""
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoints", "--checkpoints-dir", default=None, metavar="DIR",
                   help=f"root of the release's checkpoint tree (default ${ENV_CHECKPOINTS})")
    g.add_argument("--model-type", "--model_type", default="rn18", choices=sorted(MODEL_TYPES),
                   help="architecture directory of the tree (default rn18)")
    g.add_argument("--variants", type=csv_list, default=["v1a", "v1b"], metavar="VA,VB",
                   help="variants of models A and B (default v1a,v1b)")
    g.add_argument("--a", default=None, metavar="PATH",
                   help="checkpoint of model A (instead of the tree)")
    g.add_argument("--b", default=None, metavar="PATH",
                   help="checkpoint of model B (instead of the tree)")
    g = p.add_argument_group("merging")
    g.add_argument("--methods", "--merging", type=csv_list, default=list(METHODS),
                   metavar="M[,M...]", help=f"methods among {', '.join(METHODS)} (default all)")
    g.add_argument("--budgets", type=float_list, default=None, metavar="B[,B...]",
                   help="budgets in [1, 2] (default: the paper's for --model-type)")
    g.add_argument("--ratios", type=csv_list, default=["zip", "optimized"], metavar="R[,R...]",
                   help="ratio allocations among uniform, zip, optimized (default zip,optimized)")
    g.add_argument("--least-squares", default="closed_form", choices=LEAST_SQUARES,
                   help="least-squares mode of the PLeaS methods (default closed_form)")
    g.add_argument("--gd-steps", "--max-steps", "--max_steps", type=int, default=400,
                   help="steps of --least-squares gd (default 400, as the paper's code)")
    g.add_argument("--images", type=int, default=1000,
                   help="training images each merge sees, half from each task (default 1000)")
    g.add_argument("--batch-size", type=int, default=100, help="merge and evaluation batch size")
    g.add_argument("--matching-data", default=None, metavar="SPEC",
                   help="PLeaS-free: take the merge images (matching, least squares, BatchNorm "
                        "statistics) from this data spec's training split instead of the tasks'")
    g.add_argument("--matching-cache", default=None, metavar="DIR",
                   help="keep matchings here, so runs of other budgets of the same pair reuse them")
    g.add_argument("--seed", type=int, default=0, help="seed of the merge images, weight matching "
                   "and probes (default 0)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", "--data_dir", default=None, metavar="DIR",
                   help="tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets); also "
                        "where NABirds is looked for (DIR/nabirds/images)")
    g.add_argument("--image-size", type=int, default=None,
                   help="image side (default: the checkpoint's, 224 for converted release models)")
    g.add_argument("--spec", type=spec_override, action="append", default=[], metavar="NAME=SPEC",
                   help="read dataset NAME from this data spec instead (repeatable), e.g. "
                        "nabird=folder:/data/nabirds/images")
    g.add_argument("--mock-data", type=int, default=None, metavar="N",
                   help=argparse.SUPPRESS)  # tests: tfds.testing.mock_data with N examples
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", "--output_dir", required=True, metavar="DIR",
                   help=f"where this run writes {RESULT_FILE}")
    g.add_argument("--progress", action="store_true", help="progress bars")


def check_common(args: argparse.Namespace) -> None:
    """Raise :class:`ExperimentError` for option values argparse cannot check."""
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        raise ExperimentError(f"unknown method {bad[0] if bad else '(none)'}; choose from "
                              f"{', '.join(METHODS)}")
    bad = [r for r in args.ratios if r not in RATIOS]
    if bad or not args.ratios:
        raise ExperimentError(f"unknown ratios {bad[0] if bad else '(none)'}; choose from "
                              f"{', '.join(RATIOS)}")
    if len(args.variants) != 2 or any(v not in VARIANTS for v in args.variants):
        raise ExperimentError(f"--variants needs two of {', '.join(VARIANTS)}, got "
                              f"{','.join(args.variants)}")
    budgets = args.budgets if args.budgets is not None else BUDGETS[args.model_type]
    for b in budgets:
        if not 1.0 <= b <= 2.0:
            raise ExperimentError(f"budget {b} is outside [1, 2] (compute relative to one model)")
    args.budgets = list(budgets)
    if args.images < 2 or args.batch_size < 1:
        raise ExperimentError("--images must be at least 2 and --batch-size positive")
    if (args.a is None) != (args.b is None):
        raise ExperimentError("pass both --a and --b, or neither (then the tree is read)")


def method_runs(methods: Sequence[str], ratios: Sequence[str]) -> list[tuple[str, str]]:
    """``(method, ratios)`` pairs to run: each method with each allocation, once
    for a method with its own allocation. A pair whose recipe (matching, least
    squares, ratios) is that of a named method with its own allocation is left to
    that method (``perm_activation`` with ``zip`` ratios is ``zipit``)."""
    recipe = lambda m, r: (METHODS[m].matching, METHODS[m].least_squares, r)  # noqa: E731
    named = {recipe(m, METHODS[m].ratios) for m in methods if METHODS[m].ratios}
    out = []
    for m in methods:
        own = METHODS[m].ratios
        for r in [own] if own else ratios:
            if (m, r) not in out and (own or recipe(m, r) not in named):
                out.append((m, r))
    return out


MOCK_IMAGE_SIZE = 16


def _mock_source(examples: int):
    """A stand-in for ``DatasetBuilder.as_data_source``: ``examples`` random RGB
    images ``[16, 16, 3]`` with random labels of the dataset's label space, seeded
    by dataset, config and split. tfds' own mock draws images of random sizes;
    fixed small ones keep the tests' reading cheap."""

    def as_data_source(builder, split=None, *args, **kwargs):
        config = builder.builder_config.name if builder.builder_config else ""
        seed = zlib.crc32(f"{builder.name}/{config}/{split}".encode())
        rng = np.random.default_rng(seed)
        k = builder.info.features["label"].num_classes
        size = (MOCK_IMAGE_SIZE, MOCK_IMAGE_SIZE, 3)
        return [{"image": rng.integers(0, 256, size, dtype=np.uint8),
                 "label": int(rng.integers(k))} for _ in range(examples)]

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

    with tfds.testing.mock_data(num_examples=examples,
                                as_data_source_fn=_mock_source(examples)):
        yield


# ------------------------------------------------------------ checkpoints
def checkpoints_root(given: str | None) -> Path:
    """``--checkpoints``, else ``$MODEL_CHECKPOINTS_DIR``.

    Raises:
      ExperimentError: neither is set, or the directory does not exist.
    """
    root = given or os.environ.get(ENV_CHECKPOINTS)
    if not root:
        raise ExperimentError(
            f"no checkpoint tree: pass --checkpoints DIR or set {ENV_CHECKPOINTS} (get the "
            "paper's with experiments/download_checkpoints.sh, or pass --a/--b checkpoints "
            "made by `pleas-jax train` or `pleas-jax convert`)"
        )
    path = Path(root)
    if not path.is_dir():
        raise ExperimentError(
            f"{path}: no such checkpoint tree (download it with "
            "experiments/download_checkpoints.sh, or convert one with `pleas-jax convert-tree`)"
        )
    return path


def release_dir(root: Path, model_type: str, dataset: str, variant: str) -> Path:
    """``root/{model_type}/{dataset}/{variant}``; DomainNet domains are
    ``domainnet/{domain}``."""
    sub = f"{DOMAINNET}/{dataset}" if dataset in DOMAINS else dataset
    return root / model_type / sub / variant


def _is_checkpoint(path: Path) -> bool:
    checkpoint = _pleas()[0]
    return (path / checkpoint.METADATA_FILE).is_file() and (path / checkpoint.ARRAYS_DIR).is_dir()


def resolve_checkpoint(
    root: Path, model_type: str, dataset: str, variant: str, *,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """The pleas-jax checkpoint of one model of the release's tree, converting
    ``model.pth`` on the fly when no converted checkpoint exists.

    Raises:
      ExperimentError: nothing usable in the variant directory, or a failed conversion.
    """
    where = release_dir(root, model_type, dataset, variant)
    for candidate in (where, where / "pleas_jax"):
        if _is_checkpoint(candidate):
            return candidate
    pth = where / "model.pth"
    if not pth.is_file():
        raise ExperimentError(
            f"{where}: no checkpoint (neither a pleas-jax checkpoint nor model.pth); download "
            "the paper's with experiments/download_checkpoints.sh, or write one there with "
            "`pleas-jax convert` or `pleas-jax train`"
        )
    try:
        from converters.tree import convert_checkpoint
    except ImportError as e:
        raise ExperimentError(
            f"{pth}: converting the release's torch checkpoint needs PyTorch and "
            f"converters.tree ({e}); install pleas-jax[torch], or convert the tree first with "
            "`pleas-jax convert-tree`"
        ) from None
    log(f"converting {pth} -> {where / 'pleas_jax'}")
    try:
        convert_checkpoint(pth, where / "pleas_jax", verify=True)
    except Exception as e:  # ConversionError and torch's own errors alike
        raise ExperimentError(f"{pth}: conversion failed: {e}") from None
    return where / "pleas_jax"


def load_source(path: str | os.PathLike, image_size: int | None = None) -> wf.Model:
    """A source checkpoint as a :class:`pleas_jax.workflow.Model` whose metadata
    says how to read its inputs.

    A checkpoint converted from the release records neither image size nor input
    normalisation; its models were trained on ImageNet-normalised 224 px images,
    so those are filled in. ``image_size`` overrides the checkpoint's.

    Raises:
      ExperimentError: not a checkpoint (with how to get one).
    """
    checkpoint, _, wf = _pleas()
    try:
        model = wf.load_model(path)
    except checkpoint.CheckpointError as e:
        raise ExperimentError(
            f"{e}; make one with `pleas-jax train` or `pleas-jax convert`, or download the "
            "paper's with experiments/download_checkpoints.sh"
        ) from None
    meta = dict(model.metadata)
    converted = meta.get("converted_from") == "torch"
    if "normalization" not in meta and converted:
        meta["normalization"] = IMAGENET_NORMALIZATION
    if image_size is not None:
        meta["image_size"] = int(image_size)
    elif "image_size" not in meta and converted:
        meta["image_size"] = RELEASE_IMAGE_SIZE
    if model.module.num_classes is None:
        raise ExperimentError(f"{path}: a backbone without classifier; experiments merge "
                              "source models with their heads")
    return dataclasses.replace(model, metadata=meta)


def source_paths(args, dataset_a: str, dataset_b: str, log=lambda s: None) -> tuple[Path, Path]:
    """Checkpoint paths of models A and B: ``--a/--b``, else the tree."""
    if args.a is not None:
        return Path(args.a), Path(args.b)
    root = checkpoints_root(args.checkpoints)
    va, vb = args.variants
    return (
        resolve_checkpoint(root, args.model_type, dataset_a, va, log=log),
        resolve_checkpoint(root, args.model_type, dataset_b, vb, log=log),
    )


# ------------------------------------------------------------------- data
def dataset_spec(name: str, overrides: Mapping[str, str], data_dir: str | None) -> str:
    """The data spec of a dataset of the paper (``cub``, ``clipart``, ...).

    NABirds is not in tfds: it is read as an image folder (one sub-folder per
    class), ``--spec nabird=folder:PATH``, else ``$NABIRDS_DIR``, else
    ``DATA_DIR/nabirds/images`` or ``DATA_DIR/nabirds``.

    Raises:
      ExperimentError: an unknown name, or NABirds not found.
    """
    if name in overrides:
        return overrides[name]
    if name in DOMAINS:
        return f"tfds:{DOMAINNET}/{name}"
    if name not in FINE_GRAINED:
        raise ExperimentError(f"unknown dataset {name!r}; choose from "
                              f"{', '.join([*FINE_GRAINED, *DOMAINS])}")
    if FINE_GRAINED[name] is not None:
        return f"tfds:{FINE_GRAINED[name]}"
    candidates = []
    if os.environ.get(ENV_NABIRDS):
        candidates.append(Path(os.environ[ENV_NABIRDS]))
    if data_dir:
        candidates += [Path(data_dir) / "nabirds" / "images", Path(data_dir) / "nabirds"]
    for c in candidates:
        if c.is_dir():
            return f"folder:{c}"
    raise ExperimentError(
        "NABirds is not in tfds: download it from https://dl.allaboutbirds.org/nabirds and pass "
        f"--spec nabird=folder:PATH/nabirds/images (one folder per class), set {ENV_NABIRDS}, "
        "or put it under --data-dir as nabirds/images"
    )


# ---------------------------------------------------------------- caching
def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_key(path: Path) -> dict[str, Any]:
    """What identifies a checkpoint's content for caches: its resolved path and
    the metadata file's modification time."""
    checkpoint = _pleas()[0]
    meta = Path(path) / checkpoint.METADATA_FILE
    return {"path": str(Path(path).resolve()), "mtime": meta.stat().st_mtime_ns}


class MatchingCache:
    """Matchings ``(perm, costs)`` of a pair, in memory and, with a directory, on
    disk (one ``.npz`` per key), so that runs at other budgets reuse them."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = None if directory is None else Path(directory)
        self.memory: dict[str, tuple[dict, dict]] = {}

    def _file(self, digest: str) -> Path | None:
        return None if self.directory is None else self.directory / f"matching-{digest}.npz"

    def get(self, key: Mapping[str, Any]) -> tuple[dict, dict] | None:
        digest = _digest(key)
        if digest in self.memory:
            return self.memory[digest]
        file = self._file(digest)
        if file is None or not file.is_file():
            return None
        with np.load(file) as f:
            groups = json.loads(str(f["groups"]))
            perm = {g: f[f"perm_{i}"] for i, g in enumerate(groups)}
            costs = {g: f[f"costs_{i}"] for i, g in enumerate(groups)}
        self.memory[digest] = (perm, costs)
        return perm, costs

    def put(self, key: Mapping[str, Any], perm: Mapping, costs: Mapping) -> None:
        digest = _digest(key)
        perm = {g: np.asarray(p) for g, p in perm.items()}
        costs = {g: np.asarray(costs[g]) for g in perm}
        self.memory[digest] = (perm, costs)
        file = self._file(digest)
        if file is None:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        groups = list(perm)
        arrays = {"groups": np.asarray(json.dumps(groups))}
        for i, g in enumerate(groups):
            arrays[f"perm_{i}"], arrays[f"costs_{i}"] = perm[g], costs[g]
        # Another run may read the file while this one writes: rename into place.
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, file)


def features_model(model: wf.Model) -> wf.Model:
    """A source model without its classifier: it returns pooled features ``[N, C]``."""
    params = {k: v for k, v in model.variables["params"].items() if k != "fc"}
    return dataclasses.replace(
        model, module=model.module.clone(num_classes=None),
        variables={**model.variables, "params": params},
    )


def write_result(out_dir: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """Write a run's JSON into ``out_dir`` (created) atomically."""
    wf = _pleas()[2]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return wf.write_json(out / RESULT_FILE, result)


def read_result(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A finished run's JSON in ``out_dir``, else ``None`` (missing or unreadable)."""
    file = Path(out_dir) / RESULT_FILE
    try:
        result = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) and result.get("status") == "done" else None


class Timer:
    """Seconds since construction (``timer()``)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def run_main(fn: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse ``argv``, run ``fn(args)``; user errors become one line on stderr
    (exit status 2), as the ``pleas-jax`` command does."""
    checkpoint, data_lib, wf = _pleas()
    import sys

    args = parser.parse_args(argv)
    try:
        fn(args)
    except (ExperimentError, wf.RunError, data_lib.DataError, checkpoint.CheckpointError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------- merges
def merge_grid(
    args: argparse.Namespace,
    a: wf.Model,
    b: wf.Model,
    batches: Sequence[np.ndarray],
    *,
    heads: str,
    cache_key: Mapping[str, Any],
    score: Callable[[wf.Model], dict[str, Any]],
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Merge A and B with every method and ratio allocation at every budget of
    ``args`` and score each merged model.

    A pair's matchings depend on neither the budget nor the ratios: each kind
    (activation, weight) is computed once, or read from ``--matching-cache``;
    so are its least-squares sums when several merges fit them.

    Args:
      batches: the merge images, ``[batch, H, W, C]`` each.
      heads: ``"shared"`` or ``"separate"`` (see :func:`pleas_jax.merge.merge`).
      cache_key: what else identifies the matchings (data, images, seed, ...).
      score: merged model (with heads ``a``/``b`` when separate) -> metrics.

    Returns:
      ``(rows, matching_seconds)``: one row per (budget, method, ratios) with
      ``method``, ``ratios``, ``budget``, ``achieved_budget``, ``macs``,
      ``params``, ``seconds`` and the metrics; seconds spent per matching kind.
    """
    wf = _pleas()[2]
    from pleas_jax.merge import merge

    cache = MatchingCache(args.matching_cache)
    rows, matching_seconds = [], {}
    runs = method_runs(args.methods, args.ratios)
    # With several least-squares merges in this process, the pair's sums are taken
    # once and projected for each budget and matching; for one, per-merge sums are
    # cheaper (see pleas_jax.merge.merge's ``statistics``).
    fits = len(args.budgets) * sum(METHODS[m].least_squares for m, _ in runs)
    statistics: Any = "pair" if fits > 1 else "per_merge"
    for budget in args.budgets:
        for name, ratios in runs:
            method = METHODS[name]
            key = {**cache_key, "matching": method.matching, "heads": heads,
                   "a": checkpoint_key(Path(a.name)), "b": checkpoint_key(Path(b.name))}
            cached = cache.get(key)
            timer = Timer()
            result = merge(
                (a.module, a.variables), (b.module, b.variables), batches, float(budget),
                matching=method.matching, ratios=ratios,
                least_squares=args.least_squares if method.least_squares else None,
                heads=heads, gd_steps=args.gd_steps, seed=args.seed,
                precomputed_matching=cached, count_xla_flops=False, progress=args.progress,
                **({"statistics": statistics} if method.least_squares else {}),
            )
            if getattr(result, "pair_statistics", None) is not None:
                statistics = result.pair_statistics
            if cached is None:
                cache.put(key, result.perm, result.costs)
                matching_seconds[method.matching] = result.report["seconds"]["matching"]
            merged = wf.Model(result.module, result.variables, result.heads,
                              name=f"{name}/{ratios}@{budget:g}")
            metrics = score(merged)
            rep = result.report
            rows.append({
                "method": name, "ratios": ratios, "budget": float(budget),
                "matching": method.matching,
                "least_squares": args.least_squares if method.least_squares else None,
                "achieved_budget": rep["achieved_budget"], "macs": rep["macs"],
                "macs_source": rep["macs_source"], "params": rep["params"],
                **metrics, "merge_seconds": rep["seconds"], "seconds": timer(),
            })
            log(f"{name} ({ratios}) @ {budget:g}: accuracy {metrics['accuracy']:.4f} "
                f"({timer():.0f} s)")
    return rows, matching_seconds


def settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The run's settings for its JSON."""
    keys = ("model_type", "variants", "methods", "budgets", "ratios", "least_squares",
            "gd_steps", "images", "batch_size", "matching_data", "seed", "data_dir",
            "image_size", "mock_data")
    return {**{k: getattr(args, k) for k in keys}, "specs": dict(args.spec), **extra}


def finish_run(
    args: argparse.Namespace,
    experiment: str,
    *,
    pair: Sequence[str],
    paths: tuple[Path, Path],
    batches: Sequence[Any],
    seconds: float,
    **fields: Any,
) -> dict[str, Any]:
    """A finished run's JSON (the fields every experiment shares, then
    ``fields``: eval sets, metric, settings, sources, results, ...), written
    to ``args.output_dir``."""
    result = {
        "experiment": experiment,
        "status": "done",
        "model_type": args.model_type,
        "pair": list(pair),
        "variants": list(args.variants),
        "checkpoints": {"a": str(paths[0]), "b": str(paths[1])},
        "command": getattr(args, "command", None),
        **fields,
        "merge_images": int(sum(len(x) for x in batches)),
        "seconds": seconds,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_result(args.output_dir, result)
    return result


def experiment_main(
    run: Callable[..., dict[str, Any]], parser: argparse.ArgumentParser, module: str,
    argv: Sequence[str] | None,
) -> int:
    """An experiment's command-line entry point: run it with progress on
    stdout, then print the result file's path."""

    def go(args):
        args.command = command_line(argv, module)
        result = run(args, log=lambda s: print(s, flush=True))
        print(f"wrote {args.output_dir}/{RESULT_FILE} ({len(result['results'])} merges, "
              f"{result['seconds']:.0f} s)", flush=True)

    return run_main(go, parser, argv)


def command_line(argv: Sequence[str] | None, module: str) -> str:
    """The command that reproduces a run, for its JSON."""
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *argv])
