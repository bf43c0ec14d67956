"""torch (torchvision layout) <-> Flax conversion: parity, exact round trip, file handling."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from converters import (
    ConversionError,
    TorchResNet,
    flax_to_state_dict,
    infer_module,
    load_state_dict,
    num_batches_tracked,
    randomize_batch_norm,
    state_dict_to_flax,
    torch_shapes,
    verify,
)
from pleas_jax import models
from pleas_jax.tree import flatten, to_dict

# Relative to the largest |logit|; the acceptance bound. Never relax it.
TOLERANCE = 1e-4


def torchvision_model(arch, num_classes=1000, seed=0):
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return randomize_batch_norm(net, seed).eval()


@pytest.fixture(scope="module")
def resnet18():
    return torchvision_model("resnet18")


class TorchResNet20(nn.Module):
    """ResNet-20 for CIFAR written out by hand, independent of the converter's mirror.

    3x3 stride-1 stem without max-pool; three stages of three basic blocks of
    widths w, 2w, 4w; a 1x1 conv + BN shortcut where stride or width changes.
    """

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for s, stride in enumerate((1, 2, 2)):
            cout = width * 2**s
            blocks = [
                self.Block(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(3)
            ]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def resnet20_torch(num_classes=10, width=16, seed=0):
    torch.manual_seed(seed)
    return randomize_batch_norm(TorchResNet20(num_classes, width), seed).eval()


def _flax_logits(module, variables, x_nchw):
    with jax.default_matmul_precision("highest"):
        return np.asarray(module.apply(variables, jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy())))


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_logits_match_torchvision(arch, resnet18):
    net = resnet18 if arch == "resnet18" else torchvision_model(arch)
    sd = net.state_dict()
    module, variables = state_dict_to_flax(sd, arch="auto")
    assert models.arch_name(module) == arch
    assert module.config() == models.resnet(arch, 1000).config()
    # Two random 224x224 inputs, fp32, eval mode.
    report = verify(module, variables, sd, batch_size=2, image_size=224, seed=1)
    print(f"{arch}: max abs {report.max_abs:.3e}, max rel {report.max_rel:.3e}")
    assert report.reference == f"torchvision.models.{arch}"
    assert report.shape == (2, 1000)
    assert report.max_rel <= TOLERANCE


def test_every_conv_output_matches_resnet18(resnet18):
    module, variables = state_dict_to_flax(resnet18.state_dict())
    want = {}

    def hook(name):
        def record(_module, _inputs, output):
            want[name] = output.detach().permute(0, 2, 3, 1).numpy()

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in resnet18.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        resnet18(x)
    for h in handles:
        h.remove()
    with jax.default_matmul_precision("highest"):
        _, state = module.apply(
            variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), mutable=["features"]
        )
    assert len(want) == 20  # stem + 16 block convs + 3 downsample convs
    for name, out in want.items():
        path = tuple(re.sub(r"\.(\d+)", r"_\1", name).split("."))
        node = state["features"]
        for k in path:
            node = node[k]
        got = np.asarray(node["out"])
        assert got.shape == out.shape, name
        rel = np.max(np.abs(got - out)) / np.max(np.abs(out))
        assert rel <= TOLERANCE, f"{name}: relative difference {rel:.3e}"


@pytest.mark.parametrize("width", [16, 32])
def test_logits_match_resnet20(width):
    net = resnet20_torch(num_classes=10, width=width)
    sd = net.state_dict()
    module, variables = state_dict_to_flax(sd, arch="auto")
    assert module.config() == models.resnet("resnet20", 10, width=width).config()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = net(x).numpy()
    got = _flax_logits(module, variables, x)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel <= TOLERANCE
    # The converter's own torch mirror agrees with the hand-written ResNet-20.
    report = verify(module, variables, sd, batch_size=4)
    assert report.reference.endswith("TorchResNet")
    assert report.max_rel <= TOLERANCE


def test_parity_check_catches_a_misplaced_bn_tensor():
    # Negative control: one misplaced BN tensor is far outside the tolerance.
    net = resnet20_torch()
    module, variables = state_dict_to_flax(net.state_dict())
    bn = variables["params"]["layer2_1"]["bn1"]
    bn["scale"], bn["bias"] = bn["bias"], bn["scale"]
    assert verify(module, variables, net.state_dict(), batch_size=2).max_rel > 100 * TOLERANCE
    # A swapped mean/var gives negative variances, NaN outputs: never "within tolerance".
    bn["scale"], bn["bias"] = bn["bias"], bn["scale"]
    stats = variables["batch_stats"]["layer2_1"]["bn1"]
    stats["mean"], stats["var"] = stats["var"], stats["mean"]
    assert verify(module, variables, net.state_dict(), batch_size=2).max_rel == np.inf


def test_torch_mirror_equals_torchvision(resnet18):
    # TorchResNet stands in for torchvision wherever torchvision cannot express
    # the widths; for a standard config it must be torchvision, name for name.
    mirror = TorchResNet(models.resnet("resnet18")).eval()
    sd = resnet18.state_dict()
    assert [(k, v.shape) for k, v in mirror.state_dict().items()] == [
        (k, v.shape) for k, v in sd.items()
    ]
    mirror.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(mirror(x), resnet18(x), rtol=0, atol=0)
    r50 = torchvision.models.resnet50(weights=None)
    assert [(k, v.shape) for k, v in r50.state_dict().items()] == [
        (k, v.shape) for k, v in TorchResNet(models.resnet("resnet50")).state_dict().items()
    ]


def _odd_widths_resnet50(num_classes=7):
    std = models.resnet("resnet50", num_classes)
    rng = np.random.default_rng(0)
    return models.ResNet(
        block="bottleneck",
        stage_sizes=std.stage_sizes,
        stem_width=40,
        stream_widths=tuple(int(w) + int(rng.integers(1, 9)) for w in std.stream_widths),
        inner_widths=tuple(
            tuple(int(v) - int(rng.integers(1, 9)) for v in w) for w in std.inner_widths
        ),
        downsample=std.downsample,
        num_classes=num_classes,
    )


@pytest.mark.parametrize(
    "module",
    [models.resnet("resnet18", 10), models.resnet20(num_classes=None), _odd_widths_resnet50()],
    ids=["resnet18", "resnet20-backbone", "resnet50-odd-widths"],
)
def test_layout_matches_flax_init(module):
    # torch_shapes / the conversion are written from the config; the Flax
    # module's own init is the authority on paths and shapes.
    torch_net = TorchResNet(module)
    assert {k: tuple(v.shape) for k, v in torch_net.state_dict().items()} == dict(
        torch_shapes(module)
    )
    inferred, variables = state_dict_to_flax(torch_net.state_dict())
    assert inferred.config() == module.config()
    init = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert {p: tuple(v.shape) for p, v in flatten(to_dict(init)).items()} == {
        p: v.shape for p, v in flatten(variables).items()
    }


def test_odd_widths_verify_against_mirror():
    # Fewer blocks than resnet50 keep the op-by-op CPU run short; widths all odd.
    module = models.ResNet(
        block="bottleneck",
        stage_sizes=(2, 1, 1, 1),
        stem_width=24,
        stream_widths=(70, 90, 130, 150),
        inner_widths=((20, 22), (17, 21), (33, 35), (41, 39), (57, 61)),
        downsample=(True, False, True, True, True),
        num_classes=5,
    )
    net = randomize_batch_norm(TorchResNet(module), 5).eval()
    inferred, variables = state_dict_to_flax(net.state_dict())
    report = verify(inferred, variables, net.state_dict(), batch_size=1, image_size=64)
    assert report.reference.endswith("TorchResNet")
    assert report.max_rel <= TOLERANCE


# ------------------------------------------------------------------ round trip
def test_round_trip_is_exact(resnet18):
    sd = resnet18.state_dict()
    module, variables = state_dict_to_flax(sd)
    back = flax_to_state_dict(module, variables, num_batches_tracked(sd))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_round_trip_resnet20_and_default_counter():
    net = resnet20_torch(width=16)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    sd = net.state_dict()
    module, variables = state_dict_to_flax(sd)
    back = flax_to_state_dict(module, variables)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())


def test_flax_to_state_dict_names_a_bad_leaf():
    module, variables = state_dict_to_flax(resnet20_torch().state_dict())
    del variables["batch_stats"]["layer2_0"]["bn1"]["var"]
    with pytest.raises(ConversionError, match="batch_stats/layer2_0/bn1/var"):
        flax_to_state_dict(module, variables)


# ------------------------------------------------------------------- inference
def test_infer_resnet50_37_classes():
    sd = torchvision.models.resnet50(weights=None, num_classes=37).state_dict()
    module = infer_module(sd)
    assert module.config() == models.resnet("resnet50", 37).config()
    with pytest.raises(ConversionError, match="37 classes but num_classes=10"):
        infer_module(sd, num_classes=10)


def test_backbone_without_fc():
    sd = {k: v for k, v in resnet20_torch().state_dict().items() if not k.startswith("fc.")}
    module, variables = state_dict_to_flax(sd)
    assert module.num_classes is None
    assert "fc" not in variables["params"]


def test_requested_arch_accepts_width_multiplier():
    sd = resnet20_torch(width=64).state_dict()
    module, _ = state_dict_to_flax(sd, arch="resnet20")
    assert module.config() == models.resnet("resnet20", 10, width=64).config()


# ----------------------------------------------------------------- file forms
@pytest.fixture(scope="module")
def r20():
    return resnet20_torch(seed=7).state_dict()


def _same(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _ema(sd):
    return {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize(
    "wrap, ema, expect_ema",
    [
        (lambda sd: sd, False, False),
        (lambda sd: {"model": sd, "epoch": 3}, False, False),
        (lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, False, False),
        (lambda sd: {"model": sd, "model_ema": _ema(sd)}, False, False),
        (lambda sd: {"model": sd, "model_ema": _ema(sd)}, True, True),
        (lambda sd: {"state_dict": sd, "state_dict_ema": _ema(sd)}, True, True),
        (lambda sd: {"ema": _ema(sd)}, True, True),
        (
            lambda sd: {
                **{f"module.{k}": v for k, v in sd.items()},
                **{f"module.ema_model.{k}": v for k, v in _ema(sd).items()},
            },
            True,
            True,
        ),
        (lambda sd: {**sd, **{f"ema.{k}": v for k, v in _ema(sd).items()}}, False, False),
        (lambda sd: {**sd, **{f"ema.{k}": v for k, v in _ema(sd).items()}}, True, True),
        # torch.optim.swa_utils.AveragedModel's state_dict inside an EMA container.
        (
            lambda sd: {
                "model": sd,
                "model_ema": {"n_averaged": torch.tensor(5)}
                | {f"module.{k}": v for k, v in _ema(sd).items()},
            },
            True,
            True,
        ),
    ],
    ids=[
        "bare",
        "model",
        "state_dict-module",
        "model+ema/plain",
        "model+ema/ema",
        "state_dict_ema",
        "ema-only",
        "module.ema_model-prefix",
        "ema-prefix/plain",
        "ema-prefix/ema",
        "averaged-model",
    ],
)
def test_load_state_dict_forms(tmp_path, r20, wrap, ema, expect_ema):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(r20), path)
    got = load_state_dict(path, ema=ema)
    assert _same(got, _ema(r20) if expect_ema else r20)


def test_safetensors(tmp_path, r20):
    path = tmp_path / "model.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in r20.items()}, str(path))
    # Also when the file is misnamed: the content decides.
    misnamed = tmp_path / "model.pt"
    misnamed.write_bytes(path.read_bytes())
    for p in (path, misnamed):
        got = load_state_dict(p)
        # safetensors keeps keys sorted, not in insertion order.
        assert sorted(got) == sorted(r20) and all(torch.equal(got[k], r20[k]) for k in r20)


def test_ema_flag_errors(tmp_path, r20):
    only_ema = tmp_path / "only_ema.pth"
    torch.save({"model_ema": r20}, only_ema)
    with pytest.raises(ConversionError, match="only an EMA copy.*--ema"):
        load_state_dict(only_ema)
    plain = tmp_path / "plain.pth"
    torch.save({"model": r20}, plain)
    with pytest.raises(ConversionError, match="no EMA copy"):
        load_state_dict(plain, ema=True)


# ------------------------------------------------------------------ bad inputs
def test_refuses_pickled_code(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(TorchResNet20(), path)  # a whole module, not a state_dict
    with pytest.raises(
        ConversionError, match=r"refuses to unpickle code .*TorchResNet20.*not a plain state_dict"
    ):
        load_state_dict(path)


def test_truncated_and_missing_files(tmp_path, r20):
    path = tmp_path / "full.pth"
    torch.save(r20, path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cut.pth: cannot read it as a PyTorch checkpoint"):
        load_state_dict(tmp_path / "cut.pth")
    with pytest.raises(ConversionError, match="nope.pth: no such file"):
        load_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize(
    "edit, arch, message",
    [
        (lambda sd: sd.pop("layer2.0.bn1.running_var"), "auto", "lacks 'layer2.0.bn1.running_var'"),
        (lambda sd: sd.update(extra=torch.ones(3)), "auto", "unexpected key 'extra'"),
        (
            lambda sd: sd.update({"layer2.1.conv1.weight": torch.ones(32, 32, 1, 1)}),
            "resnet20",
            r"'layer2.1.conv1.weight' has shape \(32, 32, 1, 1\); a resnet20 .* expects \(32, 32, 3, 3\)",
        ),
        (
            lambda sd: sd["layer1.0.conv2.weight"].view(-1)[5].fill_(float("nan")),
            "auto",
            "'layer1.0.conv2.weight' is not finite: 1 NaN",
        ),
        (
            lambda sd: sd["fc.bias"].fill_(float("inf")),
            "auto",
            "'fc.bias' is not finite: 0 NaN and 10 inf",
        ),
        (lambda sd: None, "resnet18", "holds a resnet20 .*not the requested resnet18"),
        (lambda sd: None, "resnet21", "unknown architecture 'resnet21'"),
    ],
    ids=["missing", "unexpected", "shape", "nan", "inf", "other-arch", "unknown-arch"],
)
def test_state_dict_errors(r20, edit, arch, message):
    sd = {k: v.clone() for k, v in r20.items()}
    edit(sd)
    with pytest.raises(ConversionError, match=message):
        state_dict_to_flax(sd, arch=arch)
