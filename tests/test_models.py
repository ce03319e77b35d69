"""The model families: presets, published parameter counts, pooling numerics, forward passes
in float32 and bfloat16, train/eval behaviour, and real shapes equal to the summary's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from errors import UserError
from models import layers, network
from models.summary import count_params, totals

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
