"""Conv, Dense and BatchNorm layers that can expose the features they see.

A merge needs, for every conv/dense layer, the features that enter it and the
pre-normalisation features that leave it. The layers below record both in the
``"features"`` collection when (and only when) the caller asks for it with
``mutable=["features"]``; a plain ``apply`` traces to the same computation as
``flax.linen.Conv`` / ``Dense``, and the parameter tree is unchanged.
"""

from __future__ import annotations

import flax.linen as nn

FEATURES = "features"


def _keep_last(_previous, value):
    # A layer is called once per forward pass; keep that call's value rather
    # than the default tuple-append so the collection mirrors the param tree.
    return value


def _none():
    return None


class _Recording:
    """Mixin: sow the layer's input and output under the layer's own path."""

    def _record(self, name, value):
        # init makes every collection mutable; features are not variables.
        if self.is_initializing():
            return
        self.sow(FEATURES, name, value, reduce_fn=_keep_last, init_fn=_none)


class Conv(_Recording, nn.Conv):
    """``nn.Conv`` (kernel ``[kh, kw, C_in, C_out]``) that records ``in``/``out``."""

    @nn.compact
    def __call__(self, inputs):
        self._record("in", inputs)
        out = super().__call__(inputs)
        self._record("out", out)
        return out


class Dense(_Recording, nn.Dense):
    """``nn.Dense`` (kernel ``[C_in, C_out]``) that records ``in``/``out``."""

    @nn.compact
    def __call__(self, inputs):
        self._record("in", inputs)
        out = super().__call__(inputs)
        self._record("out", out)
        return out


class BatchNorm(_Recording, nn.BatchNorm):
    """``nn.BatchNorm`` that records its normalised, affine output as ``out``."""

    @nn.compact
    def __call__(self, inputs, *args, **kwargs):
        out = super().__call__(inputs, *args, **kwargs)
        self._record("out", out)
        return out
