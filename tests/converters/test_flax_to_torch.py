"""``pleas-jax export`` and converters.flax_to_torch: pleas-jax checkpoints as torch models.

Truths: a merged checkpoint's own predictions through pleas_jax (block-sparse
layers, routed heads), torchvision's resnet18 loading the file with no help from
us, and a torchvision checkpoint's tensors coming back bit for bit after
convert -> export.
"""

import json
from typing import Any

import jax
import numpy as np
import pytest
import torch
import torchvision

from converters import flax_to_torch
from pleas_jax import checkpoint, merge, models, workflow
from pleas_jax.cli import main
from tests.converters.helpers import TOLERANCE, torchvision_model
from tests.helpers import images, init, randomize_norms

SIZE = 16


def _nchw(x):
    # A copy: for one channel the transpose is already contiguous, and a view
    # of a read-only array would make a tensor torch warns about.
    return torch.from_numpy(np.array(np.transpose(x, (0, 3, 1, 2)), order="C"))


def _rel(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A budget-1.5 merge of two 5-class ResNet-20s with separate heads (block-sparse layers)."""
    m = models.resnet20(num_classes=5, width=4)
    va = randomize_norms(init(m, SIZE), 1)
    vb = randomize_norms(init(m, SIZE, seed=2), 3)
    data = [images(32, SIZE, seed=s) for s in range(2)]
    res = merge(
        (m, va),
        (m, vb),
        data,
        1.5,
        matching="weight",
        least_squares=None,
        heads="separate",
        count_xla_flops=False,
        progress=False,
    )
    assert res.module.splits  # the export must densify block-structured layers
    path = tmp_path_factory.mktemp("merged") / "ab"
    checkpoint.save(
        path,
        res.module,
        res.variables,
        heads=res.heads,
        image_size=SIZE,
        head_classes={"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]},
    )
    return path


@pytest.mark.parametrize("head", ["a", "b"])
def test_exported_merge_predicts_what_the_checkpoint_predicts(merged, head, tmp_path, capsys):
    out = tmp_path / f"ab_{head}.pth"
    rc, stdout, _ = run(["export", merged, out, "--head", head], capsys)
    assert rc == 0
    assert "verify: converters.torch_to_flax.TorchResNet" in stdout
    net, info = flax_to_torch.load(out)
    assert info["head"] == head and info["image_size"] == SIZE
    assert info["classes"] == ([0, 1, 2, 3, 4] if head == "a" else [5, 6, 7, 8, 9])
    assert info["normalization"] is None and info["config"]["splits"] == []
    x = images(8, SIZE, seed=11)
    want = workflow.predict(workflow.load_model(merged), x, head=head)
    with torch.no_grad():
        got = net(_nchw(x)).numpy()
    assert got.shape == (8, 5)
    assert _rel(got, want) < TOLERANCE


def test_a_standard_config_loads_into_torchvision_as_is(tmp_path):
    m = models.resnet("resnet18", num_classes=7)
    v = randomize_norms(init(m, 32), 4)
    sd, info = flax_to_torch.to_torch(m, v, image_size=32)
    assert info["torch_class"] == "torchvision.models.resnet18"
    path, meta = flax_to_torch.save(tmp_path / "r18.pth", sd, info)
    assert meta == tmp_path / "r18.pth.json" and json.loads(meta.read_text())["arch"] == "resnet18"
    net = torchvision.models.resnet18(num_classes=7)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = images(2, 32, seed=5)
    with torch.no_grad():
        got = net.eval()(_nchw(x)).numpy()
    with jax.default_matmul_precision("highest"):
        want = np.asarray(m.apply(v, x))
    assert _rel(got, want) < TOLERANCE


def test_convert_then_export_gives_the_torch_checkpoint_back_bit_for_bit(tmp_path, capsys):
    net = torchvision_model("resnet18", num_classes=10, seed=3)
    original = net.state_dict()
    torch.save(original, tmp_path / "in.pth")
    assert run(["convert", tmp_path / "in.pth", tmp_path / "ckpt"], capsys)[0] == 0
    rc, _, _ = run(["export", tmp_path / "ckpt", tmp_path / "out.pth", "--no-verify"], capsys)
    assert rc == 0
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(back) == list(original)
    for k, t in original.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    info = json.loads((tmp_path / "out.pth.json").read_text())
    assert info["image_size"] == 224 and info["normalization"]["mean"][0] == pytest.approx(0.485)


def test_export_errors_leave_nothing_behind(merged, tmp_path, capsys):
    out = tmp_path / "x.pth"
    rc, _, err = run(["export", merged, out], capsys)
    assert rc == 2 and "separate heads ['a', 'b']" in err and "--head" in err
    rc, _, err = run(["export", merged, tmp_path / "x.npz", "--head", "a"], capsys)
    assert rc == 2 and ".pth or .pt" in err
    rc, _, err = run(["export", merged, out, "--head", "a", "--tolerance", "0"], capsys)
    assert rc == 1 and "verification failed" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []

    single = tmp_path / "single"
    m = models.resnet20(num_classes=3, width=4)
    checkpoint.save(single, m, init(m, SIZE), image_size=SIZE)
    rc, _, err = run(["export", single, out, "--head", "a"], capsys)
    assert rc == 2 and "single classifier" in err
    out.write_bytes(b"keep")
    rc, _, err = run(["export", single, out], capsys)
    assert rc == 2 and "already exists" in err and out.read_bytes() == b"keep"
    assert run(["export", single, out, "--overwrite"], capsys)[0] == 0
    assert flax_to_torch.load(out)[1]["classes"] is None


def test_save_is_all_or_nothing_and_load_checks_what_it_reads(tmp_path, monkeypatch):
    m = models.resnet20(num_classes=3, width=4)
    sd, info = flax_to_torch.to_torch(m, init(m, SIZE), image_size=SIZE)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        flax_to_torch.save(tmp_path / "m.pth", sd, info)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    path, meta = flax_to_torch.save(tmp_path / "m.pth", sd, info)
    with pytest.raises(FileExistsError):
        flax_to_torch.save(path, sd, info)
    wider = dict(info, config=models.resnet20(num_classes=3, width=8).config())
    meta.write_text(json.dumps(wider))
    with pytest.raises(flax_to_torch.ConversionError, match="do not fit"):
        flax_to_torch.load(path)
    meta.write_text(json.dumps(dict(info, format="something else")))
    with pytest.raises(flax_to_torch.ConversionError, match="not a pleas-jax torch export"):
        flax_to_torch.load(path)
    meta.write_text(json.dumps(info)[:-20])
    with pytest.raises(flax_to_torch.ConversionError, match="m.pth.json: not valid JSON"):
        flax_to_torch.load(path)
    meta.write_text(json.dumps({k: v for k, v in info.items() if k != "config"}))
    with pytest.raises(flax_to_torch.ConversionError, match="no usable architecture config"):
        flax_to_torch.load(path)
    meta.write_text(json.dumps(info))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(flax_to_torch.ConversionError, match=r"m.pth: cannot read the weights"):
        flax_to_torch.load(path)
    path.unlink()
    with pytest.raises(flax_to_torch.ConversionError, match=r"m.pth: no such file"):
        flax_to_torch.load(path)
    meta.unlink()
    with pytest.raises(flax_to_torch.ConversionError, match="no m.pth.json beside it"):
        flax_to_torch.load(path)
    # A directory in the way is refused before anything is written.
    (tmp_path / "d.pth").mkdir()
    with pytest.raises(flax_to_torch.ConversionError, match="d.pth: is a directory"):
        flax_to_torch.save(tmp_path / "d.pth", sd, info, overwrite=True)
    assert not (tmp_path / "d.pth.json").exists()


# ------------------------------------------------------------- grey images
GREY = 12  # image side of the grey (MNIST-like) models
GREY_FACTS: dict[str, Any] = {
    "image_size": GREY,
    "normalization": {"mean": [0.1307], "std": [0.3081]},
    "crop": 0.875,
    "classes": [5, 6, 7, 8, 9],
}


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """Checkpoints of 1-channel ResNet-20s: ``r1``, a 5-class model with the
    input facts ``train`` records; ``ab``, a backbone with separate heads. And
    ``r3``, ``r1``'s RGB twin."""
    d = tmp_path_factory.mktemp("grey")
    m = models.resnet20(num_classes=5, width=4)
    checkpoint.save(d / "r1", m, randomize_norms(init(m, GREY, channels=1), 5), **GREY_FACTS)
    checkpoint.save(d / "r3", m, randomize_norms(init(m, GREY, channels=3), 5), **GREY_FACTS)
    backbone = models.resnet20(num_classes=None, width=4)
    rng = np.random.default_rng(6)
    heads = {
        h: {"kernel": rng.normal(size=(16, 5)).astype(np.float32), "bias": np.zeros(5, np.float32)}
        for h in ("a", "b")
    }
    variables = randomize_norms(init(backbone, GREY, seed=1, channels=1), 7)
    checkpoint.save(
        d / "ab",
        backbone,
        variables,
        heads=heads,
        image_size=GREY,
        head_classes={"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]},
    )
    return d


@pytest.mark.parametrize(
    "name, flags",
    [("r1", []), ("r1", ["--no-verify"]), ("ab", ["--head", "a"]), ("ab", ["--head", "b"])],
)
def test_a_grey_model_exports_and_torch_computes_its_logits(grey, name, flags, tmp_path, capsys):
    out = tmp_path / "m.pth"
    rc, stdout, err = run(["export", grey / name, out, *flags], capsys)
    assert rc == 0, err
    assert ("verify:" in stdout) is ("--no-verify" not in flags)
    net, info = flax_to_torch.load(out)
    assert info["in_channels"] == 1 and info["torch_class"].endswith("TorchResNet")
    assert net.state_dict()["conv1.weight"].shape[1] == 1
    x = images(6, GREY, seed=8, channels=1)
    head = flags[1] if "--head" in flags else None
    want = workflow.predict(workflow.load_model(grey / name), x, head=head)
    with torch.no_grad():
        got = net(_nchw(x)).numpy()
    assert got.shape == (6, 5)
    assert _rel(got, want) < TOLERANCE


def _converted_facts(path):
    meta = checkpoint.load_metadata(path)
    return {k: meta.get(k) for k in GREY_FACTS}


@pytest.mark.parametrize("name", ["r1", "r3"])
def test_convert_reads_the_facts_export_wrote_beside_the_file(grey, name, tmp_path, capsys):
    pth = tmp_path / f"{name}.pth"
    assert run(["export", grey / name, pth], capsys)[0] == 0
    rc, stdout, err = run(["convert", pth, tmp_path / "back", "--verify"], capsys)
    assert rc == 0, err
    assert f"read image_size, normalization, crop, classes from {name}.pth.json" in stdout
    assert _converted_facts(tmp_path / "back") == GREY_FACTS
    # The converted checkpoint reads images as the original does, and computes
    # the same logits bit for bit (export and convert only transpose).
    original, back = workflow.load_model(grey / name), workflow.load_model(tmp_path / "back")
    assert (back.image_size, back.normalization, back.crop) == (
        original.image_size,
        original.normalization,
        original.crop,
    )
    x = images(6, GREY, seed=9, channels=original.channels)
    np.testing.assert_array_equal(workflow.predict(back, x), workflow.predict(original, x))

    # Options given on the command line win over the sidecar.
    flags = ["--image-size", "20", "--crop", "none", "--normalization", "data"]
    assert run(["convert", pth, tmp_path / "own", *flags], capsys)[0] == 0
    assert _converted_facts(tmp_path / "own") == {
        "image_size": 20,
        "normalization": None,
        "crop": None,
        "classes": GREY_FACTS["classes"],
    }


def test_convert_ignores_a_sidecar_of_other_weights(grey, tmp_path, capsys):
    pth = tmp_path / "r1.pth"
    assert run(["export", grey / "r1", pth], capsys)[0] == 0
    meta = flax_to_torch.info_path(pth)
    info = json.loads(meta.read_text())
    # The .pth replaced after export (here: wider weights than the JSON says).
    meta.write_text(json.dumps(dict(info, config=models.resnet20(5, width=8).config())))
    rc, _, err = run(["convert", pth, tmp_path / "stale"], capsys)
    assert rc == 0 and "ignoring" in err and "another model" in err
    assert _converted_facts(tmp_path / "stale") == {
        "image_size": 32,  # the CIFAR stem's convention
        "normalization": None,
        "crop": None,
        "classes": None,
    }
    meta.write_text("{not json")
    rc, _, err = run(["convert", pth, tmp_path / "broken"], capsys)
    assert rc == 0 and "ignoring the export sidecar" in err and "not valid JSON" in err
    assert _converted_facts(tmp_path / "broken")["image_size"] == 32
