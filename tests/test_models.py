"""The model families: presets, published parameter counts, pooling numerics, the CPU kernels
(same values and gradients, the switch), forward passes in float32 and bfloat16, train/eval
behaviour, and real shapes equal to the summary's."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from errors import UserError
from models import cpu_kernels, layers, network, onednn
from models.summary import count_params, totals

ROOT = Path(__file__).resolve().parent.parent
CIFAR = (32, 32, 3)


def _key(seed):
    # The 'rbg' generator compiles and draws several times faster on CPU than the default
    # threefry, which keeps these tests quick; the models do not depend on it.
    return jax.random.key(seed, impl="rbg")


def _rngs(seed=0):
    return nnx.Rngs(_key(seed))


def _images(shape):
    return jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)


def _cfg(preset, fields=None, **more):
    cfg = models.preset(preset)
    cfg.update({**(fields or {}), **more})
    return cfg


def _params(preset, input_shape=CIFAR, num_classes=10):
    return totals(models.architecture(models.preset(preset), input_shape, num_classes))["params"]


# --- presets and published parameter counts ------------------------------------------------


def test_presets_are_complete():
    required = {
        "plain", "plain_local", "pooled_max", "pooled_avg", "pooled_l2", "pooled_depth",
        "model_c", "strided_c", "convpool_c", "allcnn_c", "resnet20", "resnet32", "resnet44",
        "resnet56", "resnet110", "resnet20_b", "wide_resnet", "mlp",
    }  # fmt: skip
    assert required <= set(models.PRESETS)
    for name in models.PRESETS:
        cfg = models.preset(name)
        assert cfg.name in models.FAMILIES and cfg.dtype == "float32"
        for shape in (CIFAR, (28, 28, 1)):  # CIFAR-10 and Fashion-MNIST
            assert models.architecture(cfg, shape, 10)[-1].out_shape == (10,)


def _cifar_resnet_params(n, option="A", classes=10):
    """He et al. 2015 sec. 4.2, counted by hand: 3x3 convs without bias, each followed by a
    BatchNorm (scale + offset per channel), widths 16/32/64, FC with bias."""
    conv = lambda d_in, k, f=3: f * f * d_in * k + 2 * k  # weights + BN scale and offset
    total = conv(3, 16)
    d_in = 16
    for stage, width in enumerate((16, 32, 64)):
        total += conv(d_in, width) + conv(width, width) + (n - 1) * 2 * conv(width, width)
        if stage > 0 and option == "B":
            total += conv(d_in, width, f=1)  # 1x1 projection + BN where the shape changes
        d_in = width
    return total + 64 * classes + classes


@pytest.mark.parametrize(
    "preset, n, published",
    [("resnet20", 3, 0.27), ("resnet32", 5, 0.46), ("resnet44", 7, 0.66),
     ("resnet56", 9, 0.85), ("resnet110", 18, 1.7)],
)  # fmt: skip
def test_resnet_params_match_he_et_al_table_6(preset, n, published):
    count = _params(preset)
    assert count == _cifar_resnet_params(n)
    digits = 1 if published >= 1 else 2  # the table rounds to 2 significant digits
    assert round(count / 1e6, digits) == published


def test_resnet_exact_counts():
    assert _params("resnet20") == 269_722  # trained params (BatchNorm scale and offset included)
    resnet20 = models.architecture(models.preset("resnet20"), CIFAR, 10)
    assert totals(resnet20)["batch_stats"] == 1_376  # running mean and variance: not trained
    assert _params("resnet20_b") == _cifar_resnet_params(3, "B") == 272_474
    assert _params("resnet56") == 853_018 and _params("resnet110") == 1_727_962


def _model_c_params(variant, classes=10):
    """Springenberg et al. 2014, Tables 1 and 2, counted by hand (all convs have biases)."""
    conv = lambda d_in, k, f=3: f * f * d_in * k + k
    stage1 = [conv(3, 96), conv(96, 96)]
    stage2 = [conv(96, 192), conv(192, 192)]
    if variant in ("convpool", "allcnn"):  # an extra 3x3 conv before / instead of each pool
        stage1.append(conv(96, 96))
        stage2.append(conv(192, 192))
    head = [conv(192, 192), conv(192, 192, f=1), conv(192, classes, f=1)]
    return sum(stage1 + stage2 + head)


@pytest.mark.parametrize(
    "preset, variant, published",
    [("model_c", "base", 1.3), ("strided_c", "strided", 1.3),
     ("convpool_c", "convpool", 1.4), ("allcnn_c", "allcnn", 1.4)],
)  # fmt: skip
def test_model_c_family_params(preset, variant, published):
    count = _params(preset)
    assert count == _model_c_params(variant)
    if variant in ("convpool", "allcnn"):
        assert round(count / 1e6, 1) == published
    else:
        # The paper's table says ~1.3M, but the layers of its own Table 1 hold 0.95M
        # (ConvPool-C minus the two extra 3x3 convs): we follow the layers.
        assert count == 954_730
    assert _params("allcnn_c") == 1_369_738


def _layers(preset):
    """(name, F, S, P, output shape) of the window layers, and the dropout rates."""
    specs = models.architecture(models.preset(preset), CIFAR, 10)
    windows = [(s.name, s.kernel_size, s.stride, s.padding, s.out_shape) for s in specs
               if s.kind in ("conv", "pool")]  # fmt: skip
    return windows, [s.rate for s in specs if s.kind == "dropout"], specs


def test_model_c_and_all_cnn_c_have_the_papers_layers():
    windows, dropout, specs = _layers("model_c")
    assert windows == [
        ("conv1", 3, 1, 1, (32, 32, 96)), ("conv2", 3, 1, 1, (32, 32, 96)),
        ("pool1", 3, 2, 1, (16, 16, 96)),
        ("conv3", 3, 1, 1, (16, 16, 192)), ("conv4", 3, 1, 1, (16, 16, 192)),
        ("pool2", 3, 2, 1, (8, 8, 192)),
        ("conv5", 3, 1, 0, (6, 6, 192)), ("conv6", 1, 1, 0, (6, 6, 192)),
        ("conv7", 1, 1, 0, (6, 6, 10)),
    ]  # fmt: skip
    assert dropout == [0.2, 0.5, 0.5]
    assert specs[-1].kind == "global_pool" and not any(s.kind == "norm" for s in specs)
    windows, dropout, _ = _layers("allcnn_c")
    assert [w[1:] for w in windows] == [
        (3, 1, 1, (32, 32, 96)), (3, 1, 1, (32, 32, 96)), (3, 2, 1, (16, 16, 96)),
        (3, 1, 1, (16, 16, 192)), (3, 1, 1, (16, 16, 192)), (3, 2, 1, (8, 8, 192)),
        (3, 1, 0, (6, 6, 192)), (1, 1, 0, (6, 6, 192)), (1, 1, 0, (6, 6, 10)),
    ]  # fmt: skip
    assert dropout == [0.2, 0.5, 0.5]
    strided = [w[1:4] for w in _layers("strided_c")[0]]
    assert strided[:4] == [(3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1)]


def test_weight_sharing_counts():
    assert _params("plain") == 342_026
    assert _params("plain_local") == 15_007_754
    # The dense comparison network is about as big as the plain ConvNet.
    assert abs(_params("mlp") / _params("plain") - 1) < 0.05


@pytest.mark.parametrize("preset", models.PRESETS)
def test_real_model_matches_its_specs(preset):
    """Real parameter count and every layer's real output shape equal the specs'."""
    cfg = models.preset(preset)
    specs = models.architecture(cfg, CIFAR, 10)
    model = nnx.eval_shape(lambda: models.create_model(cfg, CIFAR, 10, rngs=nnx.Rngs(0)))
    assert count_params(model) == totals(specs)["params"]
    for spec in specs:
        if spec.kind in ("conv", "local", "dense", "norm"):
            assert count_params(model.layers[spec.name]) == spec.params, spec.name
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, *CIFAR), jnp.float32)
    logits, acts = jax.eval_shape(
        lambda s, x: network.capture_activations(nnx.merge(graphdef, s), x), state, x
    )
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert {n: a.shape[1:] for n, a in acts.items()} == {s.name: s.out_shape for s in specs}


# --- building blocks against references ----------------------------------------------------


def _np_pool(x, reduce, f, s, p, pad_value):
    """NumPy reference: pad, then reduce every F x F window at stride S over H and W."""
    x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=pad_value)
    h2, w2 = (x.shape[1] - f) // s + 1, (x.shape[2] - f) // s + 1
    out = np.empty((x.shape[0], h2, w2, x.shape[3]), x.dtype)
    for i in range(h2):
        for j in range(w2):
            out[:, i, j] = reduce(x[:, i * s : i * s + f, j * s : j * s + f], axis=(1, 2))
    return out


def _np_l2(window, axis):
    return np.sqrt(np.mean(np.square(window), axis=axis))


@pytest.mark.parametrize("f, s, p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_pooling_functions_match_numpy(f, s, p):
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype(np.float32)
    references = {
        "max": _np_pool(x, np.max, f, s, p, -np.inf),
        "avg": _np_pool(x, np.mean, f, s, p, 0.0),  # padded zeros count
        "l2": _np_pool(x, _np_l2, f, s, p, 0.0),
    }
    for function, want in references.items():
        got = layers.pool(jnp.asarray(x), function, f, s, p)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=function)


@pytest.mark.parametrize("f, s, p", [(2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_depth_pooling_matches_numpy_and_keeps_h_w(f, s, p):
    x = np.random.default_rng(1).normal(size=(2, 5, 4, 8)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (0, 0), (p, p)), constant_values=-np.inf)
    d2 = (8 + 2 * p - f) // s + 1
    want = np.stack([padded[..., k * s : k * s + f].max(-1) for k in range(d2)], axis=-1)
    got = layers.pool(jnp.asarray(x), "depth", f, s, p)
    assert got.shape == (2, 5, 4, d2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("function", ["max", "avg", "l2", "depth"])
def test_pooling_gradients_are_finite(function):
    # All-zero windows are common after a ReLU: sqrt's slope is infinite there.
    x = jnp.zeros((1, 4, 4, 2)).at[0, 0, 0, 0].set(1.0)
    grad = jax.grad(lambda x: layers.pool(x, function, 2, 2, 0).sum())(x)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(grad.sum()) > 0


def _local_layer(in_shape, filters, f, s, p):
    h2, w2 = ((n + 2 * p - f) // s + 1 for n in in_shape[:2])
    return layers.LocallyConnected(in_shape, (h2, w2, filters), f, s, p, use_bias=True,
                                   dtype=jnp.float32, rngs=_rngs())  # fmt: skip


def test_locally_connected_matches_numpy():
    """One filter bank per output position: each output unit is its own window's dot product."""
    f, s, p = 3, 2, 1
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 2)).astype(np.float32)
    local = _local_layer(x.shape[1:], 3, f, s, p)
    local.bias[...] = np.random.default_rng(1).normal(size=local.bias.shape)
    kernel, bias = np.asarray(local.kernel[...]), np.asarray(local.bias[...])
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h2, w2 = kernel.shape[:2]
    want = np.empty((2, h2, w2, 3), np.float32)
    for i in range(h2):
        for j in range(w2):
            window = padded[:, i * s : i * s + f, j * s : j * s + f, :].reshape(2, -1)
            want[:, i, j] = window @ kernel[i, j] + bias[i, j]
    np.testing.assert_allclose(local(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


def test_locally_connected_with_equal_filters_is_the_conv():
    """Same receptive fields: copying the shared kernel to every position reproduces the conv."""
    shape, f, s, p = (6, 5, 3), 3, 2, 1
    conv = layers.conv(3, 4, f, s, p, use_bias=True, dtype=jnp.float32, rngs=_rngs())
    conv.bias[...] = jnp.arange(4.0)
    local = _local_layer(shape, 4, f, s, p)
    local.kernel[...] = jnp.broadcast_to(conv.kernel[...].reshape(-1, 4), local.kernel.shape)
    local.bias[...] = jnp.broadcast_to(conv.bias[...], local.bias.shape)
    x = _images((2, *shape))
    np.testing.assert_allclose(local(x), conv(x), rtol=1e-5, atol=1e-5)


# --- the CPU kernels (models/cpu_kernels.py): same values, same gradients, one switch --------


@pytest.fixture
def kernels_on():
    """The CPU kernels switched on, whatever the backend and the environment."""
    with cpu_kernels.override(True):
        yield


def _reduce_window_pool(x, function, f, s, p):
    """The previous implementation (lax.reduce_window, differentiated by JAX)."""
    pads = ((0, 0), (p, p), (p, p), (0, 0))
    if function == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, f, f, 1), (1, s, s, 1), pads)
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, f, f, 1), (1, s, s, 1), pads)
    return summed / (f * f)


@pytest.mark.parametrize("function", ["max", "avg"])
@pytest.mark.parametrize("f, s, p", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
@pytest.mark.usefixtures("kernels_on")
def test_pooling_gradients_equal_reduce_window(function, f, s, p):
    # distinct values: no ties, so every max window has one well-defined gradient
    x = jnp.asarray(np.random.default_rng(0).permutation(2 * 7 * 7 * 3).reshape(2, 7, 7, 3) / 50)
    x = x.astype(jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 7, 3)), jnp.float32)

    def loss(pool):
        return lambda x: jnp.sum(pool(x) * weights[:, : pool(x).shape[1], : pool(x).shape[2]])

    ours = lambda x: layers.pool(x, function, f, s, p)
    theirs = lambda x: _reduce_window_pool(x, function, f, s, p)
    np.testing.assert_array_equal(ours(x), theirs(x))
    np.testing.assert_allclose(
        jax.grad(loss(ours))(x), jax.grad(loss(theirs))(x), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("function", ["max", "depth"])
@pytest.mark.usefixtures("kernels_on")
def test_non_overlapping_max_pooling_shares_ties(function):
    """F/F windows without padding are differentiated by blocks (one pass over x): a window's
    equal maxima share its gradient equally (reduce_window's gradient gives it all to one),
    other windows as on the strided views; rows and columns past the last whole window get
    none."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 5, 6)), jnp.float32)
    x = x.at[:, :2, :2, :2].set(7.0)  # a window (of either kind) whose maxima all tie
    axes = (3,) if function == "depth" else (1, 2)
    out_shape = (2, 5, 5, 3) if function == "depth" else (2, 2, 2, 6)
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=out_shape), jnp.float32)
    pool = lambda x: layers.pool(x, function, 2, 2, 0)
    by_views = lambda x: cpu_kernels._BY_VIEWS["max"](x, 2, 2, 0, axes)
    np.testing.assert_array_equal(pool(x), by_views(x))
    ours = np.asarray(jax.vjp(pool, x)[1](cotangent)[0])
    views = np.asarray(jax.vjp(by_views, x)[1](cotangent)[0])
    tied = np.zeros(x.shape, bool)
    tied[:, :2, :2, :2] = True
    if function == "max":
        quarter = np.repeat(np.repeat(cotangent[:, :1, :1, :2] / 4, 2, axis=1), 2, axis=2)
        np.testing.assert_allclose(ours[:, :2, :2, :2], quarter, rtol=1e-6)
        assert not np.any(ours[:, 4, :, :]) and not np.any(ours[:, :, 4, :])
    else:
        np.testing.assert_allclose(
            ours[:, :2, :2, :2], np.repeat(cotangent[:, :2, :2, :1] / 2, 2, axis=3), rtol=1e-6
        )
    np.testing.assert_allclose(ours[~tied], views[~tied], rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("kernels_on")
def test_depth_pooling_gradient_equals_reduce_window():
    x = jnp.asarray(np.random.default_rng(2).permutation(2 * 3 * 3 * 8).reshape(2, 3, 3, 8) / 9)
    x = x.astype(jnp.float32)
    previous = lambda x: jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 1, 1, 3), (1, 1, 1, 2), ((0, 0), (0, 0), (0, 0), (1, 1))
    )
    ours = lambda x: layers.pool(x, "depth", 3, 2, 1)
    np.testing.assert_array_equal(ours(x), previous(x))
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(ours(x) ** 2))(x),
        jax.grad(lambda x: jnp.sum(previous(x) ** 2))(x),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "size, f, s, padding",
    [
        (32, 3, 2, ((1, 1), (1, 1))),  # the ResNets' and All-CNN-C's downsampling
        (32, 1, 2, ((0, 0), (0, 0))),  # a 1x1 projection: three of four phases get no tap
        (9, 3, 2, ((1, 1), (1, 1))),  # odd size: the last phase row is cropped
        (10, 5, 3, ((2, 2), (2, 2))),  # stride 3, kernel 5
        (11, 2, 2, ((0, 1), (1, 0))),  # even kernel, asymmetric padding
        (7, 3, 3, ((0, 0), (0, 0))),  # windows that skip input rows: zero gradient there
    ],
)
@pytest.mark.usefixtures("kernels_on")
def test_strided_conv_gradients_equal_lax(size, f, s, padding):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(f, f, 3, 5)), jnp.float32)
    dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def conv(implementation):
        return lambda x, k: implementation(x, k, (s, s), padding, dimension_numbers=dims)

    ours, theirs = conv(cpu_kernels.conv_general_dilated), conv(jax.lax.conv_general_dilated)
    np.testing.assert_array_equal(ours(x, kernel), theirs(x, kernel))
    weights = jnp.asarray(rng.normal(size=theirs(x, kernel).shape), jnp.float32)
    grads = [
        jax.jit(jax.grad(lambda x, k, c=c: jnp.sum(c(x, k) * weights), argnums=(0, 1)))(x, kernel)
        for c in (ours, theirs)
    ]
    for a, b in zip(*grads, strict=True):
        assert a.shape == b.shape and float(jnp.max(jnp.abs(b))) > 0.1
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if f <= s and not any(padding[0]):  # rows no window reads get no gradient
        covered = np.zeros(size, bool)
        for start in range(0, size - f + 1, s):
            covered[start : start + f] = True
        assert not np.any(np.asarray(grads[0][0])[:, ~covered])


@pytest.mark.usefixtures("kernels_on")
def test_strided_conv_layer_uses_phases_and_unstrided_ones_lax(monkeypatch):
    monkeypatch.setenv("CONVNETS_ONEDNN", "0")  # the XLA path (oneDNN's: tests/test_onednn.py)

    def backward(layer, x):
        return jax.jit(jax.grad(lambda x: jnp.sum(layer(x)))).lower(x).as_text()

    x = jnp.ones((1, 8, 8, 3))
    dims = ("NHWC", "HWIO", "NHWC")
    strided = layers.conv(3, 4, 3, 2, 1, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    kernel = strided.kernel[...]
    lax_strided = lambda x: jax.lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1),) * 2, None, None, dims
    )
    # XLA's own input gradient dilates dy with zeros; the layer's does not
    assert "lhs_dilate = [2, 2]" in backward(lax_strided, x)
    assert "lhs_dilate = [2, 2]" not in backward(strided, x)
    # stride 1, or padding given by name: lax's convolution, untouched
    plain = layers.conv(3, 4, 3, 1, 1, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert "custom_vjp" not in str(jax.make_jaxpr(plain)(x))
    named = lambda x: cpu_kernels.conv_general_dilated(
        x, kernel, (2, 2), "SAME", dimension_numbers=dims
    )
    assert "custom_vjp" not in str(jax.make_jaxpr(named)(x))
    assert "custom_vjp" in str(jax.make_jaxpr(strided)(x))
    # dimension numbers given as strings, as conv_parts.py does, mean the same
    by_name = lambda x: cpu_kernels.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1),) * 2, None, None, dims
    )
    assert "custom_vjp" in str(jax.make_jaxpr(by_name)(x))
    nchw = jnp.ones((1, 3, 8, 8))  # other layouts: lax's
    by_nchw = lambda x: cpu_kernels.conv_general_dilated(
        x, kernel.transpose(3, 2, 0, 1), (2, 2), ((1, 1),) * 2, dimension_numbers=None
    )
    assert "custom_vjp" not in str(jax.make_jaxpr(by_nchw)(nchw))


@pytest.mark.usefixtures("kernels_on")
def test_materialized_is_the_identity_under_jit_grad_and_vmap(monkeypatch):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5, 5, 2)), jnp.float32)
    if onednn.usable():  # oneDNN computes the weight gradients: nothing to keep apart
        assert onednn.takes_weight_grads(x)
        # fresh functions: traces are cached per function, the switch is read when tracing
        assert "cond" not in str(jax.make_jaxpr(lambda x: cpu_kernels.materialized(x))(x))
    monkeypatch.setenv(onednn.SWITCH_ENV, "0")  # XLA's convolutions: the conditional
    assert "cond" in str(jax.make_jaxpr(lambda x: cpu_kernels.materialized(x))(x))
    np.testing.assert_array_equal(jax.jit(cpu_kernels.materialized)(x), x)
    np.testing.assert_array_equal(jax.vmap(cpu_kernels.materialized)(x), x)
    gradient = jax.grad(lambda x: jnp.sum(cpu_kernels.materialized(x) * x))(x)
    np.testing.assert_array_equal(gradient, 2 * x)
    nan = x.at[0, 0, 0, 0].set(jnp.nan)
    np.testing.assert_array_equal(cpu_kernels.materialized(nan), nan)  # the other branch


def test_switch_default_environment_and_overrides(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    on_cpu = jax.default_backend() == "cpu"
    assert cpu_kernels.enabled() == cpu_kernels.default() == on_cpu
    for value in ("0", "off", "False", " no "):
        monkeypatch.setenv(cpu_kernels.ENV_VAR, value)
        assert not cpu_kernels.enabled(), value
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "1")
    assert cpu_kernels.enabled() == on_cpu
    with cpu_kernels.override(True):
        assert cpu_kernels.enabled()
        with cpu_kernels.override(False):
            assert not cpu_kernels.enabled()
        assert cpu_kernels.enabled()
    assert cpu_kernels.enabled() == on_cpu
    previous = cpu_kernels.set_enabled(False)
    try:
        assert previous is None and not cpu_kernels.enabled()
    finally:
        cpu_kernels.set_enabled(previous)
    assert cpu_kernels.enabled() == on_cpu


def test_environment_variable_turns_the_kernels_off_in_a_new_process():
    program = (
        "import jax, jax.numpy as jnp\n"
        "from flax import nnx\n"
        "from models import cpu_kernels, layers\n"
        "conv = layers.conv(3, 4, 3, 2, 1, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))\n"
        "grad = jax.jit(jax.grad(lambda x: jnp.sum(conv(x))))\n"
        "hlo = grad.lower(jnp.ones((1, 8, 8, 3))).as_text()\n"
        "print(cpu_kernels.enabled(), 'lhs_dilate = [2, 2]' in hlo)\n"
    )  # fmt: skip
    for value, printed in (("0", "False True"), ("1", "True False")):
        env = {**os.environ, cpu_kernels.ENV_VAR: value, "JAX_PLATFORMS": "cpu"}
        run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split() == printed.split(), value


def test_switched_off_the_layers_are_lax_and_forward_mode_works():
    x, tangent = _images((2, 8, 8, 3)), jnp.cos(_images((2, 8, 8, 3)))
    conv = layers.conv(3, 4, 3, 2, 1, use_bias=True, dtype=jnp.float32, rngs=_rngs())
    kernel, bias = conv.kernel[...], conv.bias[...]
    lax_conv = lambda x: (
        bias
        + jax.lax.conv_general_dilated(
            x, kernel, (2, 2), ((1, 1),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    max_pool = lambda x: layers.pool(x, "max", 3, 2, 1)
    lax_max_pool = lambda x: jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )
    with cpu_kernels.override(True):  # custom VJPs: reverse mode only
        for layer in (conv, max_pool):
            with pytest.raises(TypeError, match="forward-mode"):
                jax.jvp(layer, (x,), (tangent,))
    with cpu_kernels.override(False):
        for ours, theirs in ((conv, lax_conv), (max_pool, lax_max_pool)):
            (value, derivative), (want_value, want_derivative) = (
                jax.jvp(f, (x,), (tangent,)) for f in (ours, theirs)
            )
            np.testing.assert_allclose(value, want_value, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(derivative, want_derivative, rtol=1e-6, atol=1e-6)
        # XLA's own input gradient, dy dilated with zeros; no custom VJP left
        backward = jax.jit(jax.grad(lambda x: jnp.sum(conv(x)))).lower(x).as_text()
        assert "lhs_dilate = [2, 2]" in backward
        assert "custom_vjp" not in str(jax.make_jaxpr(conv)(x))
        assert "custom_vjp" not in str(jax.make_jaxpr(max_pool)(x))
        assert "cond" not in str(jax.make_jaxpr(conv)(x))  # not materialized either


@pytest.mark.parametrize("case", ["pooled_max", "resnet"])
def test_models_compute_the_same_with_the_kernels_off(case, monkeypatch):
    """Switched off, a model is plain lax: the same logits, gradients to float rounding. (The
    rewrites keep XLA's values exactly; oneDNN's convolutions, which differ from XLA's by float
    rounding, are compared with XLA's in tests/test_onednn.py and left out here.)"""
    monkeypatch.setenv("CONVNETS_ONEDNN", "0")
    model = models.create_model(_cfg(*FAMILY_CASES[case]), TINY, 10, rngs=_rngs())
    _randomize_scores_layer(model)
    graphdef, state = nnx.split(model)
    x = _images((2, *TINY))
    results = []
    for flag in (True, False):

        def run(state, x):  # a new function for each setting: the switch is read when tracing
            m = nnx.merge(graphdef, state)
            loss = lambda m: m(x, train=True).std()
            return m(x), nnx.state(nnx.grad(loss)(m), nnx.Param)

        with cpu_kernels.override(flag):
            results.append(jax.jit(run)(state, x))
    (on_logits, on_grads), (off_logits, off_grads) = results
    np.testing.assert_array_equal(on_logits, off_logits)
    for a, b in zip(jax.tree.leaves(on_grads), jax.tree.leaves(off_grads), strict=True):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- forward passes ----------------------------------------------------------------------

TINY = (12, 12, 3)
# One small model per family and per distinct code path (compiling dominates these tests).
FAMILY_CASES = {
    "plain_local": ("plain_local", {"widths": (4, 8)}),
    "pooled_max": ("pooled_max", {"widths": (4, 8), "pool_after": (1, 2)}),
    "mlp": ("mlp", {"dense_widths": (8,)}),
    "model_c": ("model_c", {"widths": (4, 8)}),
    "resnet": ("resnet20", {"depth": 8, "widths": (4, 8, 16), "stem_width": 4}),
    "wide_resnet": ("wide_resnet", {"depth": 10, "widths": (4, 8, 16), "dropout": 0.3}),
}


def _randomize_scores_layer(model) -> None:
    last = model.specs[-1]
    if last.kind == "dense":
        kernel = model.layers[last.name].kernel
        kernel[...] = jax.random.normal(_key(7), kernel[...].shape) * 0.1


@pytest.mark.parametrize("preset", ["plain", "pooled_max", "mlp", "resnet20"])
def test_class_scores_start_at_zero(preset):
    """The dense scores layer is zero-initialised: the first loss is exactly ln(classes)."""
    model = models.create_model(models.preset(preset), TINY, 10, rngs=_rngs())
    np.testing.assert_array_equal(model(_images((3, *TINY))), np.zeros((3, 10), np.float32))


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_forward_in_float32_and_bfloat16(case):
    preset, fields = FAMILY_CASES[case]
    x = _images((2, *TINY))

    def train_grads(m, x):
        loss = lambda m: m(x, train=True, rngs=nnx.Rngs(dropout=_key(1))).std()
        return nnx.grad(loss)(m)

    logits = {}
    for dtype in ("float32", "bfloat16"):
        model = models.create_model(_cfg(preset, fields, dtype=dtype), TINY, 10, rngs=_rngs())
        _randomize_scores_layer(model)  # a zero head would block every earlier gradient
        param_dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
        assert param_dtypes == {jnp.dtype(jnp.float32)}
        if dtype == "float32":
            logits[dtype] = nnx.jit(lambda m, x: m(x))(model, x)
        else:  # one compilation for both checks: compiling dominates this test
            logits[dtype], grads = nnx.jit(lambda m, x: (m(x), train_grads(m, x)))(model, x)
        assert logits[dtype].shape == (2, 10) and logits[dtype].dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits[dtype])))
    # Every layer is differentiable in training mode (dropout, batch statistics on).
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    # Same seed, same float32 parameters: bfloat16 only rounds the computation.
    scale = float(jnp.abs(logits["float32"]).max()) + 1e-3
    np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=0.1 * scale)


def test_dropout_acts_only_in_training():
    cfg = _cfg(*FAMILY_CASES["model_c"])
    model = models.create_model(cfg, TINY, 10, rngs=_rngs())
    x = _images((2, *TINY))
    run = nnx.jit(lambda m, x, train, key: m(x, train=train, rngs=nnx.Rngs(dropout=key)),
                  static_argnames="train")  # fmt: skip
    key1, key2 = _key(1), _key(2)
    evals = run(model, x, False, key1), run(model, x, False, key2)
    np.testing.assert_array_equal(*evals)  # eval: deterministic, keys unused
    np.testing.assert_array_equal(evals[0], model(x))
    train1, train2 = run(model, x, True, key1), run(model, x, True, key2)
    assert not np.allclose(train1, evals[0])
    assert not np.allclose(train1, train2)  # another key, another mask
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        model(x, train=True)


def test_batchnorm_uses_batch_statistics_in_training():
    cfg = _cfg(*FAMILY_CASES["resnet"])
    model = models.create_model(cfg, TINY, 10, rngs=_rngs())
    _randomize_scores_layer(model)  # so that the logits show what BatchNorm did
    x = 3.0 + _images((4, *TINY))
    step = nnx.jit(lambda m, x, train: m(x, train=train), static_argnames="train")
    stats = lambda: jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    before = stats()
    eval_logits = step(model, x, False)
    jax.tree.map(np.testing.assert_array_equal, stats(), before)  # eval leaves them alone
    train_logits = step(model, x, True)
    mean = model.layers["stem_norm"].mean[...]
    assert float(jnp.abs(mean).max()) > 0  # running averages moved towards the batch's
    assert not np.allclose(train_logits, eval_logits)


def test_batchnorm_running_statistics_update_as_flax_does():
    """layers.norm('batch') swaps Flax's running-statistic variables for RunningStat (a cheaper
    trace); under jit and eagerly, the updated statistics and outputs are Flax's own."""
    ours = layers.norm("batch", 8, dtype=jnp.float32, rngs=_rngs())
    flax_bn = nnx.BatchNorm(
        8, momentum=layers.BATCH_NORM_MOMENTUM, epsilon=layers.NORM_EPSILON, rngs=_rngs()
    )
    assert isinstance(ours.mean, nnx.BatchStat) and isinstance(ours.mean, layers.RunningStat)
    step = nnx.jit(lambda m, x: m(x, use_running_average=False))
    for i in range(3):
        x = 2.0 + 3.0 * jax.random.normal(jax.random.key(i), (4, 5, 5, 8))
        np.testing.assert_allclose(step(ours, x), step(flax_bn, x), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            ours(x, use_running_average=False),
            flax_bn(x, use_running_average=False),
            rtol=1e-6,
            atol=1e-6,
        )
    for name in ("mean", "var"):
        got, want = getattr(ours, name)[...], getattr(flax_bn, name)[...]
        assert float(jnp.abs(got - jnp.array(0.0 if name == "mean" else 1.0)).min()) > 0.1
        np.testing.assert_allclose(got, want, rtol=1e-6)
    ours.mean[...] = jnp.ones(8)  # a concrete full replacement still goes through Flax
    np.testing.assert_array_equal(ours.mean[...], np.ones(8))


def _batchnorm_pair():
    ours = layers.norm("batch", 6, dtype=jnp.float32, rngs=_rngs())
    flax_bn = nnx.BatchNorm(
        6, momentum=layers.BATCH_NORM_MOMENTUM, epsilon=layers.NORM_EPSILON, rngs=_rngs()
    )
    for bn in (ours, flax_bn):  # scale and bias away from 1 and 0, the same in both
        bn.scale[...] = jnp.linspace(0.5, 2.0, 6)
        bn.bias[...] = jnp.linspace(-1.0, 1.0, 6)
    return ours, flax_bn


def _batchnorm_grads(bn, x, weights):
    """Gradients of a loss through BatchNorm (training mode) and a ReLU: d/dx, d/dscale,
    d/dbias; and the updated running statistics."""
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def loss(params, x):
        model = nnx.merge(graphdef, params, stats, copy=True)  # as training.steps does
        y = model(x, use_running_average=False)
        return jnp.sum(jax.nn.relu(y) * weights), nnx.state(model, nnx.BatchStat)

    (grads, grad_x), new_stats = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return grad_x, grads["scale"][...], grads["bias"][...], new_stats


@pytest.mark.usefixtures("kernels_on")
def test_batchnorm_kernel_gradients_equal_flax():
    """The CPU kernel's BatchNorm (its gradient written out) against nnx.BatchNorm
    differentiated by JAX: the same gradients for x, scale and bias, the same statistics."""
    ours, flax_bn = _batchnorm_pair()
    rng = np.random.default_rng(5)
    x = jnp.asarray(2.0 + 3.0 * rng.normal(size=(4, 5, 7, 6)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    got, want = _batchnorm_grads(ours, x, weights), _batchnorm_grads(flax_bn, x, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.abs(w).max()) > 1e-3  # nothing vacuous: every gradient is non-zero
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    # the kernel is what ran: a custom VJP in the traced program, none with the switch off
    assert "custom_vjp_call" in _batchnorm_program(ours, x, training=True)
    with cpu_kernels.override(False):
        assert "custom_vjp_call" not in _batchnorm_program(ours, x, training=True)
        np.testing.assert_allclose(
            _batchnorm_grads(ours, x, weights)[0], want[0], rtol=2e-5, atol=2e-5
        )
    # running averages and bfloat16 computations keep Flax's own code
    assert "custom_vjp_call" not in _batchnorm_program(ours, x, training=False)
    bf16 = layers.norm("batch", 6, dtype=jnp.bfloat16, rngs=_rngs())
    assert "custom_vjp_call" not in _batchnorm_program(bf16, x, training=True)


def _batchnorm_program(bn, x, *, training: bool) -> str:
    graphdef, state = nnx.split(bn)
    apply = lambda state, x: nnx.merge(graphdef, state, copy=True)(
        x, use_running_average=not training
    )
    return str(jax.make_jaxpr(apply)(state, x))


def test_capture_activations_under_jit():
    cfg = _cfg(*FAMILY_CASES["pooled_max"])
    model = models.create_model(cfg, TINY, 10, rngs=_rngs())
    x = jnp.ones((1, *TINY))
    logits, acts = nnx.jit(network.capture_activations)(model, x)
    specs = models.architecture(cfg, TINY, 10)
    assert {n: a.shape[1:] for n, a in acts.items()} == {s.name: s.out_shape for s in specs}
    np.testing.assert_allclose(acts["fc"], logits, rtol=1e-6)
    # Outside a capture nothing is stored on the module.
    model(x)
    assert not nnx.state(model, nnx.Intermediate)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, fields, message",
    [
        ("plain", {"name": "vgg"}, "model.name = 'vgg': unknown model; valid names: convnet"),
        ("plain", {"stride": -1}, "model.stride = -1: must be an integer >= 1"),
        ("plain", {"pool": "median", "pool_after": (1,)}, "model.pool = 'median'"),
        ("plain", {"activation": "swish"}, "model.activation = 'swish': must be one of relu"),
        ("plain", {"dtype": "float64"}, "model.dtype"),
        ("pooled_max", {"pool_after": (4,)}, "only 3 conv layers"),
        ("pooled_max", {"pool_after": ()}, "model.pool_after is empty"),
        ("pooled_max", {"pool_padding": 2}, "model.pool_padding = 2: at most half"),
        ("resnet20", {"depth": 21}, "model.depth = 21: a 'basic' ResNet with 3 stages has depth"),
        ("resnet20", {"widths": (32, 16, 64)}, "use model.shortcut = 'B'"),
        ("allcnn_c", {"variant": "d"}, "model.variant = 'd'"),
        ("plain", {"pool_after": (1, 2)}, "model.pool_after = (1, 2) but model.pool = 'none'"),
        ("plain", {"pool_window": 0}, "model.pool_window = 0: must be an integer >= 1"),
        ("plain", {"widths": ()}, "model.widths = (): must have at least 1 value(s)"),
        ("allcnn_c", {"pool": "median"}, "model.pool = 'median'"),
        ("allcnn_c", {"kernel_size": 4}, "model.kernel_size = 4: must be odd"),
        ("pooled_max", {"widths": (8,) * 6, "pool_after": (1, 2, 3, 4, 5, 6)},
         "layer 'pool6': H2 = floor((1 + 2*0 - 2)/2) + 1 = 0 <= 0"),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_field_or_layer(preset, fields, message):
    cfg = models.preset(preset)
    cfg.update(fields)
    with pytest.raises(UserError, match=re.escape(message)):
        models.architecture(cfg, CIFAR, 10)


def test_unknown_preset_and_field():
    with pytest.raises(UserError, match="valid presets: plain, plain_local"):
        models.preset("resnet21")
    cfg = models.preset("plain")
    cfg.widht = 3
    with pytest.raises(UserError, match="model.widht: not a field of the 'convnet' model"):
        models.architecture(cfg, CIFAR, 10)


@pytest.mark.usefixtures("kernels_on")
def test_dense_weight_gradient_as_outer_products_equals_lax():
    """A dense layer with a wide input and few outputs (the plain ConvNet's head) gets its
    weight gradient as a sum of outer products: the same values and gradients as lax's dot,
    under jit; other shapes, bfloat16 and the switch off keep lax's dot."""
    rng = np.random.default_rng(9)
    k_in = cpu_kernels.OUTER_MIN_IN + 3

    def grads(layer, x, dy):
        graphdef, params = nnx.split(layer)
        loss = lambda params, x: jnp.vdot(nnx.merge(graphdef, params)(x), dy)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    def program(layer, x) -> str:
        graphdef, params = nnx.split(layer)
        return str(jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(params, x))

    def pair(k_in, n_out, dtype=jnp.float32):
        x = jnp.asarray(rng.normal(size=(6, k_in)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(6, n_out)), jnp.float32)
        layer = layers.dense(k_in, n_out, use_bias=True, dtype=dtype, rngs=_rngs())
        return layer, x, dy

    layer, x, dy = pair(k_in, 10)
    assert "custom_vjp_call" in program(layer, x)
    got = grads(layer, x, dy)
    with cpu_kernels.override(False):
        assert "custom_vjp_call" not in program(layer, x)
        want = grads(layer, x, dy)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.abs(w).max()) > 1e-3
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    for k, n, dtype in (
        (cpu_kernels.OUTER_MIN_IN - 1, 10, jnp.float32),  # too few inputs
        (k_in, cpu_kernels.OUTER_MAX_OUT + 1, jnp.float32),  # too many outputs
        (k_in, 10, jnp.bfloat16),
    ):
        layer, x, _ = pair(k, n, dtype)
        assert "custom_vjp_call" not in program(layer, x), (k, n, dtype)
