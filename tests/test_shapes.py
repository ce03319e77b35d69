"""The layer formulas (models.shapes) against the real Flax layers, and the errors they raise;
the layer kinds (models.kinds): every kind built, run, summarised and translated to torch.

Real shapes come from `jax.eval_shape` on abstract modules (`nnx.eval_shape`): the layers'
own shape rules, without drawing parameters or compiling anything.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from errors import UserError
from models import kinds, network, shapes, summary
from models.builder import Builder
from models.shapes import ShapeError
from models.summary import count_params

_SETTINGS = settings(max_examples=30, deadline=None)


def _abstract_net(specs):
    return nnx.eval_shape(lambda: network.Network(specs, rngs=nnx.Rngs(0)))


def _real_out_shape(model, in_shape):
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, *in_shape), jnp.float32)
    out = jax.eval_shape(
        lambda s, x: network.capture_activations(nnx.merge(graphdef, s), x)[1], state, x
    )
    return {name: y.shape[1:] for name, y in out.items()}


def _expected_size(w, f, s, p):
    return (w + 2 * p - f) // s + 1  # floor((W1 + 2P - F)/S) + 1, Python's // is floor


conv_cases = {
    "h": st.integers(1, 12),
    "w": st.integers(1, 12),
    "f": st.integers(1, 5),
    "s": st.integers(1, 3),
    "p": st.integers(0, 2),
    "d1": st.integers(1, 3),
    "k": st.integers(1, 4),
    "use_bias": st.booleans(),
}


@_SETTINGS
@given(**conv_cases, weight_sharing=st.booleans())
def test_conv_and_local_layers_match_the_formulas(h, w, f, s, p, d1, k, use_bias, weight_sharing):
    h2, w2 = _expected_size(h, f, s, p), _expected_size(w, f, s, p)
    b = Builder((h, w, d1))
    if h2 <= 0 or w2 <= 0:
        with pytest.raises(ShapeError, match="layer 'conv'"):
            b.conv("conv", k, f, s, p, use_bias=use_bias, weight_sharing=weight_sharing)
        return
    b.conv("conv", k, f, s, p, use_bias=use_bias, weight_sharing=weight_sharing)
    (spec,) = b.specs
    per_filter_bank = (f * f * d1) * k + (k if use_bias else 0)
    assert spec.out_shape == (h2, w2, k)
    assert spec.params == per_filter_bank * (1 if weight_sharing else h2 * w2)
    if not weight_sharing:
        assert spec.shared_params == per_filter_bank

    model = _abstract_net(b.specs)
    assert _real_out_shape(model, (h, w, d1))["conv"] == (h2, w2, k)
    assert count_params(model) == spec.params


@_SETTINGS
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    d=st.integers(1, 8),
    f=st.integers(1, 4),
    s=st.integers(1, 3),
    p=st.integers(0, 2),
    function=st.sampled_from(["max", "avg", "l2", "depth"]),
)
def test_pooling_layers_match_the_formula(h, w, d, f, s, p, function):
    pooled = (d,) if function == "depth" else (h, w)
    expected = [_expected_size(n, f, s, p) for n in pooled]
    b = Builder((h, w, d))
    if min(expected) <= 0:
        with pytest.raises(ShapeError, match="layer 'pool'"):
            b.pool("pool", function, f, s, p)
        return
    b.pool("pool", function, f, s, p)
    want = (h, w, *expected) if function == "depth" else (*expected, d)
    assert b.specs[0].out_shape == want
    assert b.specs[0].params == 0
    assert _real_out_shape(_abstract_net(b.specs), (h, w, d))["pool"] == want


@_SETTINGS
@given(d1=st.integers(1, 64), k=st.integers(1, 64), use_bias=st.booleans())
def test_dense_params(d1, k, use_bias):
    b = Builder((1, 1, d1))
    b.flatten("flatten")
    b.dense("fc", k, use_bias=use_bias)
    model = _abstract_net(b.specs)
    assert b.specs[-1].params == d1 * k + (k if use_bias else 0) == count_params(model)


def test_conv_output_size_examples():
    # CS231n: 7x7 input, 3x3 filter, stride 1 pad 0 -> 5; stride 2 -> 3.
    assert shapes.conv_output_size(7, 3, 1, 0, layer="c") == 5
    assert shapes.conv_output_size(7, 3, 2, 0, layer="c") == 3
    assert shapes.conv_output_size(32, 3, 2, 1, layer="c") == 16
    assert shapes.conv_params(3, 3, 16) == (432, 16)


def test_empty_feature_map_names_the_layer_and_the_numbers():
    b = Builder((4, 4, 8))
    with pytest.raises(ShapeError) as error:
        b.conv("conv3", 16, 5, 1, 0)
    assert str(error.value) == (
        "layer 'conv3': H2 = floor((4 + 2*0 - 5)/1) + 1 = 0 <= 0; make the kernel smaller, "
        "add padding or remove a downsampling stage"
    )
    assert isinstance(error.value, UserError)


def test_receptive_field_and_jump():
    b = Builder((32, 32, 3))
    for i in range(1, 4):  # three 3x3 stride-1 convs see 3, 5, 7 pixels
        b.conv(f"conv{i}", 4, 3, 1, 1)
    assert [s.receptive_field for s in b.specs] == [3, 5, 7]
    b.pool("pool", "max", 2, 2, 0)  # 7 + (2-1)*1 = 8, jump 2
    b.conv("conv4", 4, 3, 1, 1)  # 8 + (3-1)*2 = 12
    assert [(s.receptive_field, s.jump) for s in b.specs[-2:]] == [(8, 2), (12, 2)]
    b.pool("depth", "depth", 2, 2, 0)  # pooling channels leaves H, W and the field alone
    assert (b.specs[-1].receptive_field, b.specs[-1].out_shape) == (12, (16, 16, 2))
    b.global_avg_pool("gap")  # the whole 16x16 map: 12 + 15*2
    assert b.specs[-1].receptive_field == 42


def test_residual_shapes_must_match():
    b = Builder((8, 8, 4))
    first = b.conv("a", 4, 3, 1, 1)
    b.conv("b", 8, 3, 1, 1)
    with pytest.raises(UserError, match="layer 'add' adds 'b'"):
        b.add("add", "b", first)


# --- the layer kinds (models/kinds.py) --------------------------------------------------------


def _every_kind():
    """A small network with one layer (or more) of every kind."""
    b = Builder((8, 8, 3))
    b.conv("conv", 4, 3, 1, 1)
    b.norm("batch_norm", "batch")
    block_in = b.act("relu", "relu")
    b.conv("local", 8, 3, 2, 1, weight_sharing=False)  # 4x4x8
    residual = b.norm("layer_norm", "layer")
    shortcut = b.shortcut("shortcut", 8, 2, source=block_in)
    b.add("add", residual, shortcut)
    b.pool("max", "max", 2, 1, 0)  # 3x3x8
    b.pool("depth", "depth", 2, 2, 0)  # 3x3x4
    b.pool("l2", "l2", 2, 1, 1)  # 4x4x4
    pooled = b.pool("avg", "avg", 2, 2, 0)  # 2x2x4
    roi = b.roi_pool("roi_pool", 2, source="depth")  # 3x3x4 -> 2x2x4 (overlapping bins)
    pooled = b.add("roi_add", pooled, roi)
    b.dropout("dropout", 0.5)
    b.flatten("flatten")
    dense = b.dense("hidden", 4)
    b.add("head_add", dense, b.global_avg_pool("global_pool", source=pooled))
    b.act("tanh", "tanh")
    b.dense("fc", 3)
    return b.specs


def test_every_kind_is_registered_and_its_layer_matches_its_spec():
    specs = _every_kind()
    assert {s.kind for s in specs} == set(kinds.KINDS)
    for name, kind in kinds.KINDS.items():
        assert isinstance(kind, kinds.LayerKind) and kind.kind == name
    model = _abstract_net(specs)
    assert _real_out_shape(model, (8, 8, 3)) == {s.name: s.out_shape for s in specs}
    assert count_params(model) == sum(s.params for s in specs)
    assert set(model.layers) == {s.name for s in specs if s.params or s.rate}
    rows = {line.split()[0]: line for line in summary.format_table(specs).splitlines() if line}
    assert "dropout 0.5" in rows["dropout"] and "shortcut A" in rows["shortcut"]
    assert "from hidden + global_pool" in rows["head_add"]
    assert "shared conv: 296 params" in rows["local"]


def test_every_kind_computes_in_torch_what_it_computes_here():
    """The torch translations (`torch_module`, `torch_apply`, `copy_to_torch`) of every kind,
    with random parameters and statistics: the same logits in inference mode."""
    pytest.importorskip("torch", reason="needs the bench extra: pip install -e '.[bench]'")
    from benchmarks import torch_reference

    specs = _every_kind()
    model = network.Network(specs, rngs=nnx.Rngs(0))
    for seed, kind in enumerate((nnx.Param, nnx.BatchStat)):
        leaves, treedef = jax.tree.flatten(nnx.state(model, kind))
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        random = [0.5 + jax.random.uniform(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
        nnx.update(model, jax.tree.unflatten(treedef, random))
    params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    theirs = torch_reference.Network(specs)
    torch_reference.copy_weights(theirs, nnx.to_pure_dict(params), nnx.to_pure_dict(stats))
    assert torch_reference.count_params(theirs) == sum(s.params for s in specs)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    ours = np.asarray(model(jnp.asarray(x)))
    got = torch_reference.make_eval_step(theirs)(torch_reference.to_nchw(x)).numpy()
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(got, ours, rtol=1e-4, atol=1e-5)
