"""oneDNN convolutions and BatchNorm through XLA's FFI (models/onednn.py, csrc/onednn_conv.cc):
the three passes equal `lax.conv_general_dilated` and its gradients in every memory layout,
`conv` under jit and grad with any per-pass plan, BatchNorm's two passes equal the formula and
its derivative, the switches, and the fallback when the extension is missing (the loader
pointed at nothing)."""

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import onednn

ROOT = Path(__file__).resolve().parent.parent
X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"


def _extension_or_skip():
    """Skips only where the extension cannot exist: not x86-64 Linux, or no C++ compiler to
    have built it. Anywhere else a missing extension is a failure."""
    if not X86_LINUX:
        pytest.skip(f"the oneDNN extension is built for x86-64 Linux only ({platform.machine()})")
    if not onednn.available() and shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip(f"no C++ compiler, so no extension: {onednn.unavailable_reason()}")
    assert onednn.available(), onednn.unavailable_reason()


@pytest.fixture
def extension():
    _extension_or_skip()


def _array(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _close(actual, expected, tol=2e-5):
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol * scale)


# (batch, height, width, depth, filters, kernel, strides, padding): strides 1-3, kernels 1/3/5,
# symmetric, asymmetric and zero paddings, odd sizes, 1 and 3 input channels
CASES = [
    (2, 7, 9, 1, 4, 3, (1, 1), ((1, 1), (1, 1))),
    (3, 11, 5, 3, 5, 3, (2, 2), ((1, 1), (1, 1))),
    (2, 13, 13, 3, 8, 5, (3, 3), ((2, 2), (2, 2))),
    (1, 9, 10, 1, 3, 5, (1, 2), ((0, 2), (1, 0))),
    (2, 8, 7, 3, 16, 1, (2, 3), ((0, 0), (0, 0))),
    (2, 6, 6, 16, 17, 1, (1, 1), ((0, 0), (0, 0))),
    (2, 15, 15, 16, 16, 3, (3, 1), ((2, 0), (0, 1))),
    (4, 10, 10, 32, 24, 3, (2, 2), ((0, 1), (0, 1))),
    (2, 12, 11, 8, 32, 5, (2, 1), ((2, 1), (1, 2))),
    (1, 5, 5, 3, 2, 5, (1, 1), ((0, 0), (0, 0))),
]
IDS = [
    f"{h}x{w}x{d}->{k}F{f}S{s[0]}{s[1]}P{p}".replace(" ", "") for _, h, w, d, k, f, s, p in CASES
]


def _case(case, seed=0):
    n, h, w, d, k, f, strides, padding = case
    x = _array((n, h, w, d), seed)
    kernel = _array((f, f, d, k), seed + 1) / np.sqrt(f * f * d)
    y = onednn.xla_conv(x, kernel, strides, padding)
    dy = _array(y.shape, seed + 2)
    return x, kernel, dy, strides, padding


def _xla_passes(x, kernel, dy, strides, padding):
    y, vjp = jax.vjp(lambda x, k: onednn.xla_conv(x, k, strides, padding), x, kernel)
    return (y, *vjp(dy))


@pytest.mark.parametrize("layout", sorted(onednn.LAYOUTS.values()))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_passes_equal_xla(extension, case, layout):
    x, kernel, dy, strides, padding = _case(case)
    y, dx, dw = _xla_passes(x, kernel, dy, strides, padding)

    @jax.jit
    def passes(x, kernel, dy):
        return (
            onednn.forward(x, kernel, strides, padding, layout),
            onednn.input_grad(dy, kernel, x.shape, strides, padding, layout),
            onednn.weight_grad(x, dy, kernel.shape, strides, padding, layout),
        )

    ours = passes(x, kernel, dy)
    for name, a, b in zip(onednn.PASSES, ours, (y, dx, dw), strict=True):
        assert a.shape == b.shape, name
        _close(a, b)


PLANS = [
    onednn.Plan(fwd=onednn.BLOCKED, dx=onednn.BLOCKED, dw=onednn.BLOCKED),
    onednn.Plan(fwd=onednn.PLAIN, dx=onednn.WEIGHTS_ANY, dw=onednn.PLAIN),
    onednn.Plan(fwd=None, dx=None, dw=onednn.WEIGHTS_ANY),
    onednn.Plan(fwd=onednn.WEIGHTS_ANY, dx=None, dw=None),
    None,  # onednn.choose: the measured plan
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "choose" if p is None else repr(p))
@pytest.mark.parametrize("case", CASES[1:4] + CASES[7:8], ids=IDS[1:4] + IDS[7:8])
def test_conv_under_jit_and_grad(extension, case, plan):
    x, kernel, dy, strides, padding = _case(case, seed=3)

    def loss(conv, x, kernel):
        return jnp.vdot(conv(x, kernel, strides, padding), dy)

    expected_y = onednn.xla_conv(x, kernel, strides, padding)
    expected = jax.grad(lambda x, k: loss(onednn.xla_conv, x, k), argnums=(0, 1))(x, kernel)
    with onednn.override_plan(plan):
        y = jax.jit(lambda x, k: onednn.conv(x, k, strides, padding))(x, kernel)
        grads = jax.jit(jax.grad(lambda x, k: loss(onednn.conv, x, k), argnums=(0, 1)))(x, kernel)
        # also through value_and_grad with a kernel-only gradient, as a training step takes it
        _, dw = jax.value_and_grad(lambda k: loss(onednn.conv, x, k))(kernel)
    _close(y, expected_y)
    _close(grads[0], expected[0])
    _close(grads[1], expected[1])
    _close(dw, expected[1])


def _has_custom_call(fn, *args) -> bool:
    # a fresh function each time: JAX caches traces per function, and the plan and the switch
    # are read when tracing
    text = str(jax.make_jaxpr(lambda *a: fn(*a))(*args))
    return "ffi_call" in text or "custom_call" in text


def test_plan_routes_each_pass(extension):
    x, kernel, dy, strides, padding = _case(CASES[2])

    def grads(x, k):
        loss = lambda x, k: jnp.vdot(onednn.conv(x, k, strides, padding), dy)
        return jax.value_and_grad(loss, (0, 1))(x, k)

    with onednn.override_plan(onednn.ALL_XLA):
        assert not _has_custom_call(grads, x, kernel)
    for name in onednn.PASSES:
        plan = onednn.Plan(**{name: onednn.WEIGHTS_ANY})
        with onednn.override_plan(plan):
            hlo = jax.jit(lambda x, k: grads(x, k)).lower(x, kernel).as_text()
        assert onednn.TARGETS[name] in hlo
        others = [onednn.TARGETS[n] for n in onednn.PASSES if n != name]
        assert not any(t in hlo for t in others), name


def test_switch_off_runs_xla(extension, monkeypatch):
    x, kernel, _, strides, padding = _case(CASES[1])
    conv = lambda x, k: onednn.conv(x, k, strides, padding)
    with onednn.override_plan(onednn.Plan(onednn.PLAIN, onednn.PLAIN, onednn.PLAIN)):
        assert _has_custom_call(conv, x, kernel)
        monkeypatch.setenv(onednn.SWITCH_ENV, "0")
        assert not onednn.usable()
        assert not _has_custom_call(conv, x, kernel)
        _close(conv(x, kernel), onednn.xla_conv(x, kernel, strides, padding))


def test_unsupported_inputs_fall_back(extension):
    x, kernel, _, strides, padding = _case(CASES[1])
    with onednn.override_plan(onednn.Plan(onednn.PLAIN, onednn.PLAIN, onednn.PLAIN)):
        for args in (
            (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), strides, padding),  # dtype
            (x, kernel, strides, "SAME"),  # padding by name
            (x, kernel, strides, ((-1, 0), (1, 1))),  # negative padding
        ):
            assert not _has_custom_call(lambda x, k, a=args: onednn.conv(x, k, *a[2:]), *args[:2])
            expected = jax.lax.conv_general_dilated(
                *args, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            _close(onednn.conv(*args).astype(jnp.float32), expected.astype(jnp.float32), 1e-2)


def test_custom_fallback_gets_the_xla_passes(extension):
    """`fallback` computes the passes the plan leaves to XLA."""
    x, kernel, dy, strides, padding = _case(CASES[1])
    calls = []

    def fallback(x, k, strides, padding):
        calls.append(1)
        return onednn.xla_conv(x, k, strides, padding)

    with onednn.override_plan(onednn.Plan(fwd=None, dx=None, dw=onednn.PLAIN)):
        grads = jax.grad(
            lambda x, k: jnp.vdot(onednn.conv(x, k, strides, padding, fallback=fallback), dy),
            (0, 1),
        )(x, kernel)
    assert calls
    _close(grads[0], _xla_passes(x, kernel, dy, strides, padding)[1])


def test_threads_and_concurrent_calls(extension):
    """One and two OpenMP threads give the same values; cached primitives serve calls from
    several threads at once."""
    x, kernel, dy, strides, padding = _case(CASES[7])
    expected = _xla_passes(x, kernel, dy, strides, padding)[2]
    dw = jax.jit(
        lambda x, dy: onednn.weight_grad(x, dy, kernel.shape, strides, padding, onednn.BLOCKED)
    )
    try:
        for threads in (1, 2):
            onednn.set_threads(threads)
            _close(dw(x, dy), expected)
    finally:
        onednn.set_threads(0)
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                results.append(np.asarray(dw(x, dy)))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    for r in results:
        _close(r, expected)


def test_implementation_names(extension):
    shape = onednn.Shape(8, 16, 16, 16, 16, 3, 3, (1, 1), ((1, 1), (1, 1)))
    assert onednn.version().startswith("3.")
    for name in onednn.PASSES:
        impl = onednn.implementation(shape, name, onednn.BLOCKED)
        assert impl and "ref" not in impl.split()[0], (name, impl)


# BatchNorm inputs (N, H, W, C): odd sizes, 1 and 3 channels, more channels than a SIMD lane
NORM_SHAPES = [(2, 3, 5, 1), (3, 7, 6, 3), (4, 8, 8, 16), (2, 5, 9, 17), (16, 4, 4, 64)]


def _reference_norm(x, scale, shift, epsilon=1e-5):
    """BatchNorm's training pass as its formula, for autodiff: y with the batch's statistics."""
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
    return (x - mean) / jnp.sqrt(var + epsilon) * scale + shift, mean, var


def _norm_case(shape, seed=0):
    c = shape[-1]
    x = _array(shape, seed) * 3.0 + 2.0  # not centred: the mean matters
    scale = jnp.asarray(np.random.default_rng(seed + 1).uniform(0.5, 1.5, c), jnp.float32)
    return x, scale, _array((c,), seed + 2), _array(shape, seed + 3)


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=["x".join(map(str, s)) for s in NORM_SHAPES])
def test_batch_norm_passes_equal_the_formula(extension, shape):
    x, scale, shift, dy = _norm_case(shape)
    (y, mean, var), vjp = jax.vjp(lambda *a: _reference_norm(*a), x, scale, shift)
    grads = vjp((dy, jnp.zeros_like(mean), jnp.zeros_like(var)))  # mean, var: no gradient
    ours = jax.jit(lambda x, s, b: onednn.batch_norm_forward(x, s, b, 1e-5))(x, scale, shift)
    for a, b in zip(ours, (y, mean, var), strict=True):
        assert a.shape == b.shape
        _close(a, b, 1e-4)
    backward = jax.jit(lambda *a: onednn.batch_norm_backward(*a, 1e-5))
    for a, b in zip(backward(x, dy, scale, ours[1], ours[2]), grads, strict=True):
        assert a.shape == b.shape
        _close(a, b, 1e-4)


def _close_trees(actual, expected, tol=1e-4):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        _close(a, b, tol)


def test_layer_batch_norm_goes_through_onednn_unless_switched_off(extension, monkeypatch):
    """`cpu_kernels.batch_norm` (what the BatchNorm layers call while training) takes oneDNN's
    two passes for NHWC inputs, under jit and grad, with the formula's values; with
    CONVNETS_ONEDNN_NORM=0 it is XLA's again while the convolutions stay on oneDNN, and 2-D
    inputs always are."""
    from models import cpu_kernels

    x, scale, shift, dy = _norm_case((4, 6, 5, 8), seed=5)

    def loss(norm, x, scale, shift):
        y, _, _ = norm(x, scale, shift)
        return jnp.vdot(jax.nn.relu(y), dy)

    def layer_norm(x, s, b):
        return cpu_kernels.batch_norm(x, s, b, 1e-5)

    expected = jax.value_and_grad(lambda *a: loss(_reference_norm, *a), (0, 1, 2))(x, scale, shift)
    fn = jax.value_and_grad(lambda *a: loss(layer_norm, *a), (0, 1, 2))
    text = lambda *args: str(jax.make_jaxpr(lambda *a: fn(*a))(*args))
    with cpu_kernels.override(True):
        assert onednn.TARGETS["bn_fwd"] in text(x, scale, shift)
        assert onednn.TARGETS["bn_bwd"] in text(x, scale, shift)
        _close_trees(jax.jit(fn)(x, scale, shift), expected)
        flat = (x.reshape(-1, 8), scale, shift)
        assert "bn_fwd" not in str(jax.make_jaxpr(lambda *a: layer_norm(*a))(*flat))
        monkeypatch.setenv(onednn.NORM_SWITCH_ENV, "0")
        assert onednn.usable() and not onednn.norm_usable()
        assert "convnets_onednn_bn" not in text(x, scale, shift)
        _close_trees(jax.jit(fn)(x, scale, shift), expected)


@contextlib.contextmanager
def _loader_pointed_at(monkeypatch, path):
    """The extension loader pointed at `path` ($CONVNETS_ONEDNN_LIBRARY) and loading afresh;
    afterwards back at the built extension."""
    monkeypatch.setenv(onednn.LIBRARY_ENV, str(path))
    onednn._reset_for_tests()
    try:
        yield
    finally:
        monkeypatch.delenv(onednn.LIBRARY_ENV)
        onednn._reset_for_tests()


def test_missing_extension_falls_back(monkeypatch):
    """The loader pointed at nothing: available() is False with a reason, and conv is XLA's,
    same values and gradients."""
    with _loader_pointed_at(monkeypatch, ROOT / "no_such_dir" / "_onednn_conv.so"):
        assert not onednn.available()
        assert "no_such_dir" in onednn.unavailable_reason()
        assert not onednn.usable()
        x, kernel, dy, strides, padding = _case(CASES[2])
        conv = lambda x, k: onednn.conv(x, k, strides, padding)
        assert not _has_custom_call(conv, x, kernel)
        y, vjp = jax.vjp(conv, x, kernel)
        expected = _xla_passes(x, kernel, dy, strides, padding)
        for a, b in zip((y, *vjp(dy)), expected, strict=True):
            _close(a, b)
        assert not onednn.norm_usable() and not onednn.takes_weight_grads(x)


def test_an_extension_from_older_sources_falls_back_saying_to_rebuild(monkeypatch):
    """The loader pointed at a real library without this version's handlers (as a worktree
    whose extension was built before a handler was added): the fallback, and the reason says
    to rebuild."""
    runtime = onednn._runtime_library()
    if runtime is None:
        pytest.skip(f"no {onednn.RUNTIME_LIBRARY} to point the loader at")
    with _loader_pointed_at(monkeypatch, runtime):  # it loads, but has no convnets_* symbol
        assert not onednn.available() and not onednn.usable()
        reason = onednn.unavailable_reason()
        assert "convnets_onednn_conv_fwd" in reason and "older" in reason, reason
        assert "pip install -e ." in reason


def test_missing_extension_in_a_fresh_process():
    """A process whose loader finds nothing logs one line and computes XLA's values."""
    code = (
        "import jax, jax.numpy as jnp; from models import onednn\n"
        "x = jnp.ones((2, 6, 6, 3)); k = jnp.ones((3, 3, 3, 4))\n"
        "y = onednn.conv(x, k, (1, 1), ((1, 1), (1, 1)))\n"
        "y = onednn.conv(x, k, (2, 2), ((1, 1), (1, 1)))\n"
        "print(onednn.available(), float(y.sum()))\n"
    )
    env = dict(os.environ, **{onednn.LIBRARY_ENV: "/nonexistent/_onednn_conv.so"})
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    expected = onednn.xla_conv(
        jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4)), (2, 2), ((1,) * 2,) * 2
    )
    assert out.stdout.split() == ["False", str(float(expected.sum()))]
    assert out.stderr.count("oneDNN convolutions off") == 1, out.stderr


def test_routed_matches_lax_and_passes_the_rest_on(extension):
    """`routed` sends NHWC convolutions to `conv` and anything else to the function it wraps."""
    x, kernel, dy, strides, padding = _case(CASES[2])
    seen = []

    def project_conv(*args, **kwargs):
        seen.append(kwargs.get("dimension_numbers", args[6] if len(args) > 6 else None))
        return jax.lax.conv_general_dilated(*args, **kwargs)

    routed = onednn.routed(project_conv)
    nhwc = ("NHWC", "HWIO", "NHWC")
    with onednn.override_plan(onednn.Plan(onednn.WEIGHTS_ANY, onednn.WEIGHTS_ANY, None)):
        loss = lambda x, k: jnp.vdot(
            routed(x, k, strides, padding, None, None, nhwc, 1, precision=None), dy
        )
        assert _has_custom_call(loss, x, kernel)
        value, grads = jax.value_and_grad(loss, (0, 1))(x, kernel)
    y, dx, dw = _xla_passes(x, kernel, dy, strides, padding)
    _close(value, jnp.vdot(y, dy))
    _close(grads[0], dx)
    _close(grads[1], dw)
    # NCHW goes through unchanged
    seen.clear()
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    kernel_oihw = jnp.transpose(kernel, (3, 2, 0, 1))
    out = routed(nchw, kernel_oihw, strides, padding, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    assert seen == [("NCHW", "OIHW", "NCHW")]
    _close(jnp.transpose(out, (0, 2, 3, 1)), y)


@pytest.mark.parametrize("preset", ["resnet20", "plain"])
def test_training_with_and_without_onednn(extension, monkeypatch, preset):
    """A few SGD steps of a real model, its convolutions through oneDNN (the plan of
    `choose`) and through XLA, end within float tolerance of each other."""
    import optax
    from flax import nnx

    import models

    images = _array((8, 32, 32, 3), 7)
    labels = jnp.arange(8) % 10

    calls = []
    traced = onednn._call

    def spy(name, *args):
        calls.append(name)
        return traced(name, *args)

    monkeypatch.setattr(onednn, "_call", spy)

    def train(route: bool):
        # the layers' convolution (cpu_kernels.layer_conv_general_dilated) is routed through
        # oneDNN unless CONVNETS_ONEDNN is off; read when the step is traced
        monkeypatch.setenv(onednn.SWITCH_ENV, "1" if route else "0")
        model = models.create_model(models.preset(preset), (32, 32, 3), 10, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, y):
            def loss_fn(model):
                logits = model(x, train=True, rngs=nnx.Rngs(dropout=0))
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        losses = [float(step(model, optimizer, images, labels)) for _ in range(3)]
        return losses, nnx.state(model, nnx.Param)

    with onednn.override_plan(None):
        losses_xla, params_xla = train(route=False)
        assert not calls
        losses_onednn, params_onednn = train(route=True)
    assert calls, "no convolution went through oneDNN"
    np.testing.assert_allclose(losses_onednn, losses_xla, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params_onednn), jax.tree.leaves(params_xla), strict=True):
        _close(a, b, 1e-4)


def test_passes_load_the_extension_themselves():
    """`forward` & co. register the FFI targets on first use, in a process that never asked
    `available()`."""
    _extension_or_skip()
    code = (
        "import jax.numpy as jnp; from models import onednn\n"
        "x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1))\n"
        "y = onednn.forward(x, k, (1, 1), ((1, 1), (1, 1)))\n"
        "print(float(y.sum()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    # each of the 4x4 pixels of both channels is in 2-3 windows per axis: (2+3+3+2)^2 x 2
    assert float(out.stdout) == 200.0
