"""Reading checkpoint files: containers, prefixes, EMA copies, safetensors, bad files."""

import pytest
import torch
from safetensors.torch import save_file

from converters import (
    ConversionError,
    load_state_dict,
)
from tests.converters.helpers import TorchResNet20


# ----------------------------------------------------------------- file forms
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
