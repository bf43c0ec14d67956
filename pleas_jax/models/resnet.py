"""The ResNet family in Flax Linen, with torchvision's structure and names.

One definition serves torchvision's ResNet-18/34/50/101/152 (7x7 stride-2 stem,
max-pool, BasicBlock or Bottleneck with the stride on the 3x3 conv, 1x1 conv +
BN downsample, global average pool, classifier) and the CIFAR-style ResNet-20
(3x3 stem, three stages). Every channel count is a field, because merged models
have non-standard widths in every permutation group.

Parameter paths mirror torchvision's module names with ``.`` between a module
and its index replaced by ``_``: ``layer1.0.downsample.1`` is
``layer1_0/downsample_1``. Layout is NHWC; kernels are HWIO.

Example::

    model = resnet18(num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, x)                       # inference
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    logits, feats = model.apply(variables, x, mutable=["features"])
    feats["features"]["layer1_0"]["conv1"]["in"]             # [N, H, W, C_in]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pleas_jax.models.layers import BatchNorm, Conv, Dense

# torch.nn.BatchNorm2d defaults: eps 1e-5, running-average momentum 0.1.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def _norm(train: bool, name: str, dtype) -> BatchNorm:
    # The compute dtype reaches the norms too, so a bf16 model runs bf16 end
    # to end (flax still reduces batch statistics in float32).
    return BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # torch pads k // 2 on both sides; Flax "SAME" would pad asymmetrically
    # under stride 2, which changes the function.
    p = k // 2
    return ((p, p), (p, p))


def _conv_factory(dtype, splits=(), prefix=""):
    table = dict(splits)

    def conv(features: int, k: int, stride: int, name: str) -> Conv:
        return Conv(
            features,
            (k, k),
            (stride, stride),
            padding=_pad(k),
            use_bias=False,
            dtype=dtype,
            splits=table.get(prefix + name),
            name=name,
        )

    return conv


class Block(nn.Module):
    """A residual block: ``relu(convs(x) + shortcut(x))``.

    Attributes:
      block: ``"basic"`` (3x3, 3x3) or ``"bottleneck"`` (1x1, 3x3, 1x1).
      widths: output channels of each conv; the last is the stream width.
      stride: the block's stride, applied on its (first) 3x3 conv as in
        torchvision v1.5, and on the shortcut conv.
      downsample: whether the shortcut is a 1x1 conv + BN (else identity).
    """

    block: str
    widths: tuple[int, ...]
    stride: int
    downsample: bool
    dtype: Any = jnp.float32
    splits: tuple = ()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """``x [N, H, W, C_in] -> [N, H/stride, W/stride, widths[-1]]``."""
        conv = _conv_factory(self.dtype, self.splits, f"{self.name}/")
        ks = (3, 3) if self.block == "basic" else (1, 3, 1)
        strides = [1] * len(ks)
        strides[ks.index(3)] = self.stride
        y = x
        for i, (w, k, st) in enumerate(zip(self.widths, ks, strides, strict=True)):
            y = conv(w, k, st, f"conv{i + 1}")(y)
            y = _norm(train, f"bn{i + 1}", self.dtype)(y)
            if i < len(ks) - 1:
                y = nn.relu(y)
        shortcut = x
        if self.downsample:
            shortcut = conv(self.widths[-1], 1, self.stride, "downsample_0")(x)
            shortcut = _norm(train, "downsample_1", self.dtype)(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """A ResNet with an independent width for every permutation group.

    Attributes:
      block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1).
      stage_sizes: number of blocks per stage, e.g. ``(2, 2, 2, 2)``.
      stem_width: output channels of the stem conv ``conv1``.
      stream_widths: per stage, the residual stream's width (the block outputs).
      inner_widths: per block (stages flattened in order), the output widths of
        its inner convs: one entry for a basic block, two for a bottleneck.
      downsample: per block, whether it has a 1x1 conv + BN shortcut.
      num_classes: classifier outputs; ``None`` returns the pooled features.
      stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"cifar"`` (3x3/1).
      stage_strides: stride of each stage's first block.
      dtype: computation dtype (parameters stay float32).
      splits: for a partially merged model, ``(layer path, splits)`` pairs such
        as ``("layer1_0/conv1", ((m, a, b), (m, a, b)))``: the layer's input and
        output channel blocks, so that it computes only the blocks that can be
        non-zero (:func:`pleas_jax.models.layers.block_apply`).
    """

    block: str
    stage_sizes: tuple[int, ...]
    stem_width: int
    stream_widths: tuple[int, ...]
    inner_widths: tuple[tuple[int, ...], ...]
    downsample: tuple[bool, ...]
    num_classes: int | None = 1000
    stem: str = "imagenet"
    stage_strides: tuple[int, ...] = (1, 2, 2, 2)
    dtype: Any = jnp.float32
    splits: tuple = ()

    def validate(self) -> None:
        """Raise ``ValueError`` for an inconsistent configuration (wrong entry
        counts, or a block without a shortcut conv that changes width or
        stride). Every forward pass checks this; a module built from outside
        data (a converter) can check it before any tracing."""
        n_blocks = sum(self.stage_sizes)
        n_inner = 1 if self.block == "basic" else 2
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if len(self.stream_widths) != len(self.stage_sizes) or len(self.stage_strides) != len(
            self.stage_sizes
        ):
            raise ValueError("stream_widths and stage_strides need one entry per stage")
        if len(self.inner_widths) != n_blocks or len(self.downsample) != n_blocks:
            raise ValueError(f"inner_widths and downsample need one entry per block ({n_blocks})")
        for i, w in enumerate(self.inner_widths):
            if len(w) != n_inner:
                raise ValueError(
                    f"inner_widths[{i}] has {len(w)} widths, a {self.block} block has {n_inner}"
                )
        # Without a shortcut conv the residual add needs equal widths.
        width_in, b = self.stem_width, 0
        for s, size in enumerate(self.stage_sizes):
            for j in range(size):
                stride = self.stage_strides[s] if j == 0 else 1
                if not self.downsample[b] and (width_in != self.stream_widths[s] or stride != 1):
                    raise ValueError(
                        f"block layer{s + 1}_{j} has no downsample but maps width {width_in} -> "
                        f"{self.stream_widths[s]} with stride {stride}"
                    )
                width_in, b = self.stream_widths[s], b + 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Forward pass.

        Args:
          x: images ``[N, H, W, C]``.
          train: use batch statistics in BatchNorm (and update ``batch_stats``
            when it is mutable) instead of the running averages.

        Returns:
          logits ``[N, num_classes]``, or pooled features ``[N, C]`` when
          ``num_classes`` is ``None``.
        """
        self.validate()
        x = x.astype(self.dtype)
        conv = _conv_factory(self.dtype, self.splits)
        if self.stem == "imagenet":
            x = conv(self.stem_width, 7, 2, "conv1")(x)
            x = nn.relu(_norm(train, "bn1", self.dtype)(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(self.stem_width, 3, 1, "conv1")(x)
            x = nn.relu(_norm(train, "bn1", self.dtype)(x))

        b = 0
        for s, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = Block(
                    block=self.block,
                    widths=(*self.inner_widths[b], self.stream_widths[s]),
                    stride=self.stage_strides[s] if j == 0 else 1,
                    downsample=self.downsample[b],
                    dtype=self.dtype,
                    splits=self.splits,
                    name=f"layer{s + 1}_{j}",
                )(x, train)
                b += 1

        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes is None:
            return x
        return Dense(
            self.num_classes, dtype=self.dtype, splits=dict(self.splits).get("fc"), name="fc"
        )(x)

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """A JSON-able description from which :func:`from_config` rebuilds the module."""
        return {
            "block": self.block,
            "stage_sizes": list(self.stage_sizes),
            "stem_width": self.stem_width,
            "stream_widths": list(self.stream_widths),
            "inner_widths": [list(w) for w in self.inner_widths],
            "downsample": list(self.downsample),
            "num_classes": self.num_classes,
            "stem": self.stem,
            "stage_strides": list(self.stage_strides),
            "splits": [[name, [list(i), list(o)]] for name, (i, o) in self.splits],
        }


def from_config(config: dict) -> ResNet:
    """Inverse of :meth:`ResNet.config`."""
    try:
        return ResNet(
            block=config["block"],
            stage_sizes=tuple(config["stage_sizes"]),
            stem_width=int(config["stem_width"]),
            stream_widths=tuple(int(w) for w in config["stream_widths"]),
            inner_widths=tuple(tuple(int(v) for v in w) for w in config["inner_widths"]),
            downsample=tuple(bool(d) for d in config["downsample"]),
            num_classes=None if config["num_classes"] is None else int(config["num_classes"]),
            stem=config["stem"],
            stage_strides=tuple(config["stage_strides"]),
            splits=tuple((name, (tuple(i), tuple(o))) for name, (i, o) in config.get("splits", ())),
        )
    except KeyError as e:
        raise ValueError(f"model config lacks the field {e.args[0]!r}") from None


# ---------------------------------------------------------------------- presets
_IMAGENET = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
ARCHITECTURES = (*_IMAGENET, "resnet20")


def _standard(block: str, stage_sizes: Sequence[int], base: int, stem_width: int, strides):
    expansion = 1 if block == "basic" else 4
    stream, inner, down = [], [], []
    width_in = stem_width
    for s, size in enumerate(stage_sizes):
        planes = base * 2**s
        stream.append(planes * expansion)
        for j in range(size):
            stride = strides[s] if j == 0 else 1
            inner.append((planes,) if block == "basic" else (planes, planes))
            down.append(stride != 1 or width_in != planes * expansion)
            width_in = planes * expansion
    return tuple(stream), tuple(inner), tuple(down)


def resnet(
    arch: str,
    num_classes: int | None = 1000,
    width: int | None = None,
    dtype: Any = jnp.float32,
) -> ResNet:
    """A standard-width model by name.

    Args:
      arch: one of :data:`ARCHITECTURES`.
      num_classes: classifier outputs, ``None`` for the backbone only.
      width: base width (channels of the first stage's inner convs): 64 for the
        ImageNet models, 16 for ResNet-20 unless given.
    """
    if arch == "resnet20":
        base = 16 if width is None else int(width)
        strides: tuple[int, ...] = (1, 2, 2)
        stream, inner, down = _standard("basic", (3, 3, 3), base, base, strides)
        return ResNet(
            "basic", (3, 3, 3), base, stream, inner, down, num_classes, "cifar", strides, dtype
        )
    if arch not in _IMAGENET:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    block, sizes = _IMAGENET[arch]
    base = 64 if width is None else int(width)
    strides = (1, 2, 2, 2)
    stream, inner, down = _standard(block, sizes, base, base, strides)
    return ResNet(block, sizes, base, stream, inner, down, num_classes, "imagenet", strides, dtype)


def resnet18(num_classes: int | None = 1000, **kw) -> ResNet:
    return resnet("resnet18", num_classes, **kw)


def resnet34(num_classes: int | None = 1000, **kw) -> ResNet:
    return resnet("resnet34", num_classes, **kw)


def resnet50(num_classes: int | None = 1000, **kw) -> ResNet:
    return resnet("resnet50", num_classes, **kw)


def resnet101(num_classes: int | None = 1000, **kw) -> ResNet:
    return resnet("resnet101", num_classes, **kw)


def resnet152(num_classes: int | None = 1000, **kw) -> ResNet:
    return resnet("resnet152", num_classes, **kw)


def resnet20(num_classes: int | None = 10, **kw) -> ResNet:
    return resnet("resnet20", num_classes, **kw)


def with_widths_of(module: ResNet, params: dict, splits: tuple = ()) -> ResNet:
    """``module`` with every width read from ``params`` (kernel shapes), and
    the given ``splits``: the module of a merged or resized variables tree."""
    try:
        stem = params["conv1"]["kernel"].shape[-1]
        inner, stream, b = [], [], 0
        n_inner = 1 if module.block == "basic" else 2
        for s, size in enumerate(module.stage_sizes):
            for j in range(size):
                blk = params[f"layer{s + 1}_{j}"]
                inner.append(tuple(blk[f"conv{i + 1}"]["kernel"].shape[-1] for i in range(n_inner)))
                b += 1
            stream.append(blk[f"conv{n_inner + 1}"]["kernel"].shape[-1])
    except KeyError as e:
        raise ValueError(f"params lack the layer {e.args[0]!r} of this architecture") from None
    return module.clone(
        stem_width=int(stem),
        stream_widths=tuple(int(w) for w in stream),
        inner_widths=tuple(tuple(int(v) for v in w) for w in inner),
        splits=tuple(splits),
    )


def arch_name(module: ResNet) -> str | None:
    """The preset whose structure (not widths) ``module`` has, or ``None``."""
    for name in ARCHITECTURES:
        ref = resnet(name)
        if (ref.block, ref.stage_sizes, ref.stem, ref.downsample, ref.stage_strides) == (
            module.block,
            module.stage_sizes,
            module.stem,
            module.downsample,
            module.stage_strides,
        ):
            return name
    return None
