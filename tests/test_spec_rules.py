"""The graph and the per-primitive rules: what each primitive joins, what it cannot trace.

Whole models through the rules (ResNets, VGG, a zoo of primitives) are in
test_spec.py, where ``derive_spec`` and ``check_spec`` meet them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive

from pleas_jax import spec, spec_rules
from pleas_jax.spec import UnsupportedPrimitiveError, derive_spec
from pleas_jax.spec_rules import _Graph, _reshape_blocks


def test_spec_re_exports_the_rules_names():
    for name in spec_rules.__all__:
        assert name in spec.__all__
        assert getattr(spec, name) is getattr(spec_rules, name)
    assert spec.UnsupportedPrimitiveError is spec_rules.UnsupportedPrimitiveError


@pytest.mark.parametrize(
    "src, dst, blocks",
    [
        ((2, 3, 4), (6, 4), [([0, 1], [0]), ([2], [1])]),
        ((1, 8, 1, 5), (8, 5), [([1], [0]), ([3], [1])]),
        ((4, 6), (2, 12), [([0, 1], [0, 1])]),
    ],
)
def test_reshape_pairs_runs_of_equal_product(src, dst, blocks):
    assert list(_reshape_blocks(src, dst)) == blocks


def test_graph_joins_and_fixes_but_never_size_one_axes():
    g = _Graph()
    a, b, c = g.new((3, 1)), g.new((3, 1)), g.new((3,))
    g.join(a, 0, b, 0)
    g.join(a, 1, b, 1)  # size 1: nothing to permute, joins nothing
    assert g.find((a, 0)) == g.find((b, 0))
    assert g.find((a, 1)) != g.find((b, 1))
    g.fix(c)
    assert g.is_fixed((c, 0)) and not g.is_fixed((a, 0))
    g.join(b, 0, c, 0)
    assert g.is_fixed((a, 0))
    # A constant pins the axes it varies along, not the uniform ones.
    k = g.constant(np.array([[1.0, 2.0], [1.0, 2.0]]), (2, 2))
    assert g.is_fixed((k, 1)) and not g.is_fixed((k, 0))


# ------------------------------------------------------------ errors
class _Sorts(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.sort(nn.Dense(4)(x), axis=-1)


_custom = Primitive("pleas_test_op")
_custom.def_impl(lambda x: x)
_custom.def_abstract_eval(lambda x: x)


class _Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(_custom.bind(nn.Dense(4)(x)))


class _Scans(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4)(x)
        return jax.lax.scan(lambda c, _: (c * 2, None), y, None, length=3)[0]


@pytest.mark.parametrize(
    "module, primitive", [(_Sorts(), "sort"), (_Custom(), "pleas_test_op"), (_Scans(), "scan")]
)
def test_unsupported_primitive_is_named(module, primitive):
    x = jnp.ones((2, 3))
    v = module.init(jax.random.key(0), x)
    with pytest.raises(
        UnsupportedPrimitiveError, match=f"'{primitive}'.*test_spec_rules.py"
    ) as err:
        derive_spec(module, v, x)
    assert "add a rule to pleas_jax.spec_rules" in str(err.value)  # where the rules now live
