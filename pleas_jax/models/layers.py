"""Conv, Dense and BatchNorm layers that can expose the features they see.

A merge needs, for every conv/dense layer, the features that enter it and the
pre-normalisation features that leave it. The layers below record both in the
``"features"`` collection when (and only when) the caller asks for it with
``mutable=["features"]``; a plain ``apply`` traces to the same computation as
``flax.linen.Conv`` / ``Dense``, and the parameter tree is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

FEATURES = "features"
NORM_AFFINE = "norm_affine"

# (in_sizes, out_sizes): each (merged, A-only, B-only) channel counts.
Splits = tuple[tuple[int, int, int], tuple[int, int, int]]


def _keep_last(_previous, value):
    # A layer is called once per forward pass; keep that call's value rather
    # than the default tuple-append so the collection mirrors the param tree.
    return value


def _none():
    return None


class _Recording:
    """Mixin: sow the layer's input and output under the layer's own path."""

    if TYPE_CHECKING:  # provided by the flax module this is mixed into
        is_initializing: Any
        sow: Any

    def _record(self, name, value):
        # init makes every collection mutable; features are not variables.
        if self.is_initializing():
            return
        self.sow(FEATURES, name, value, reduce_fn=_keep_last, init_fn=_none)


def block_apply(op, x, kernel, splits: Splits):
    """Apply a linear ``op(x, kernel)`` whose kernel is block-structured.

    The kernel ``[..., C_in, C_out]`` of a partially merged layer has channels
    ``[merged | A-only | B-only]`` on both axes, and its A-only <-> B-only
    blocks are zero. Computing only the blocks that can be non-zero makes the
    layer cost what the budget accounts for: merged outputs read every input,
    A-only outputs read ``[merged | A-only]``, B-only outputs ``[merged | B-only]``.

    Returns ``op`` of the full kernel, ``[..., C_out]``.
    """
    (mi, ai, bi), (mo, ao, bo) = splits
    if x.shape[-1] != mi + ai + bi or kernel.shape[-1] != mo + ao + bo:
        raise ValueError(f"splits {splits} do not fit input {x.shape} and kernel {kernel.shape}")
    outs = []
    if mo:
        outs.append(op(x, kernel[..., :mo]))
    if ao:
        # [merged | A-only] inputs are contiguous: one op.
        outs.append(op(x[..., : mi + ai], kernel[..., : mi + ai, mo : mo + ao]))
    if bo:
        cols = kernel[..., mo + ao :]
        parts = []
        if mi:
            parts.append(op(x[..., :mi], cols[..., :mi, :]))
        if bi:
            parts.append(op(x[..., mi + ai :], cols[..., mi + ai :, :]))
        if not parts:
            # No input may feed these outputs: they are zero (shaped by op).
            parts.append(op(x[..., :1], jnp.zeros_like(cols[..., :1, :])))
        outs.append(parts[0] if len(parts) == 1 else parts[0] + parts[1])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


class Conv(_Recording, nn.Conv):
    """``nn.Conv`` (kernel ``[kh, kw, C_in, C_out]``) that records ``in``/``out``.

    With ``splits`` set, the kernel is a partially merged one and only its
    possibly non-zero blocks are computed (see :func:`block_apply`).
    """

    splits: Splits | None = None

    @nn.compact
    def __call__(self, inputs):
        self._record("in", inputs)
        if self.splits is None:
            out = super().__call__(inputs)
        else:
            out = self._block_conv(inputs, self.splits)
        self._record("out", out)
        return out

    def _block_conv(self, x, splits: Splits):
        if self.use_bias or self.feature_group_count != 1:
            raise ValueError("block-structured convs support neither bias nor feature groups")
        # As flax reads it: an int kernel size is a 1-D conv.
        ks = self.kernel_size
        kernel_size = (ks,) if isinstance(ks, int) else tuple(ks)
        nd = len(kernel_size)
        if nd != 2 or x.ndim != 4:
            raise ValueError(
                f"block-structured convs are 2-D on [N, H, W, C]; got kernel size {ks} "
                f"on input shape {x.shape}"
            )
        shape = (*kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)

        tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
        strides, dilation = tup(self.strides or 1), tup(self.kernel_dilation or 1)
        padding = canonicalize_padding(self.padding, nd)
        if isinstance(padding, str) and padding not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"block-structured convs do not support padding {padding!r}")

        def op(xs, k):
            return jax.lax.conv_general_dilated(
                xs,
                k,
                strides,
                padding,
                rhs_dilation=dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=self.precision,
            )

        return block_apply(op, x, kernel, splits)


class Dense(_Recording, nn.Dense):
    """``nn.Dense`` (kernel ``[C_in, C_out]``) that records ``in``/``out``.

    ``splits`` as for :class:`Conv`.
    """

    splits: Splits | None = None

    @nn.compact
    def __call__(self, inputs):
        self._record("in", inputs)
        if self.splits is None:
            out = super().__call__(inputs)
        else:
            kernel = self.param(
                "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype
            )
            dtype = self.dtype or inputs.dtype
            x, k = inputs.astype(dtype), kernel.astype(dtype)
            out = block_apply(
                lambda xs, ks: jnp.dot(xs, ks, precision=self.precision), x, k, self.splits
            )
            if self.use_bias:
                bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                out = out + bias.astype(dtype)
        self._record("out", out)
        return out


class BatchNorm(_Recording, nn.BatchNorm):
    """``nn.BatchNorm`` that records its input ``in`` and its normalised, affine
    output ``out``.

    In inference mode (running statistics) the layer is the per-channel map
    ``out = in * scale + shift``; it records ``scale`` and ``shift`` (float32
    ``[C]``) in the ``"norm_affine"`` collection when asked, so that moments of
    ``out`` can be had from those of ``in`` without touching the features
    again (:mod:`pleas_jax.matching.activations`).
    """

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None):
        self._record("in", x)
        out = super().__call__(x, use_running_average, mask=mask)
        self._record("out", out)
        running = self.use_running_average if use_running_average is None else use_running_average
        if (
            running
            and not self.is_initializing()
            and self.is_mutable_collection(NORM_AFFINE)
            and self.axis in (-1, x.ndim - 1)
        ):
            f32 = jnp.float32
            var: jax.Array = self.get_variable("batch_stats", "var").astype(f32)
            mean: jax.Array = self.get_variable("batch_stats", "mean").astype(f32)
            scale = jax.lax.rsqrt(var + self.epsilon)
            if self.use_scale:
                scale = scale * self.get_variable("params", "scale").astype(f32)
            shift = -mean * scale
            if self.use_bias:
                shift = shift + self.get_variable("params", "bias").astype(f32)
            self.sow(NORM_AFFINE, "scale", scale, reduce_fn=_keep_last, init_fn=_none)
            self.sow(NORM_AFFINE, "shift", shift, reduce_fn=_keep_last, init_fn=_none)
        return out
