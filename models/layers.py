"""The building blocks every family uses, defined once: conv with explicit symmetric padding,
the locally connected layer, dense, the pooling functions, normalisation and activations.

Arrays are NHWC. Parameters are float32; `dtype` is the computation dtype.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# He et al. 2015, "Delving deep into rectifiers" (arXiv 1502.01852): variance 2/fan_in keeps
# the activations' scale through ReLU layers; the CIFAR ResNet paper (1512.03385, sec. 3.4)
# initialises this way too.
KERNEL_INIT = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

# BatchNorm: running averages updated as 0.9*old + 0.1*batch and epsilon 1e-5, the Torch
# defaults that the CIFAR ResNet reference implementations (fb.resnet.torch) used.
BATCH_NORM_MOMENTUM = 0.9
NORM_EPSILON = 1e-5

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nnx.relu,
    "elu": nnx.elu,
    "gelu": nnx.gelu,
    "leaky_relu": nnx.leaky_relu,
    "silu": nnx.silu,
    "tanh": jnp.tanh,
    "sigmoid": nnx.sigmoid,
}
POOL_FUNCTIONS = ("max", "avg", "l2", "depth")
NORMS = ("none", "batch", "layer")
DTYPES = ("float32", "bfloat16")


def _symmetric(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((padding, padding), (padding, padding))


def materialized(x: jax.Array) -> jax.Array:
    """Returns `x` unchanged, computed into its own buffer that later operations cannot fuse
    into (a conditional both of whose branches return x).

    Why: XLA:CPU computes a conv's weight gradient from a copy of its input transposed to
    [C, H, W, B]. It fuses the input's producers (BatchNorm, ReLU, residual additions) into
    that transpose, which then recomputes them in a strided loop about 6x slower than a plain
    transpose of the stored input. `lax.optimization_barrier` does not prevent this: the CPU
    compiler removes barriers before fusion. Measured in benchmarks/README.md: ResNet-20
    training 1.37x, the plain ConvNet 1.15x faster, All-CNN-C inference 1.6x.
    """
    if jax.default_backend() != "cpu":  # a conditional costs a device-to-host sync on GPUs
        return x
    # The NaN branch adds 0.0, which XLA cannot simplify away (it turns -0.0 into 0.0), so the
    # conditional survives; it returns the same values as the other branch.
    return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda y: y + 0.0, lambda y: y, x)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _input_grad_by_phases(dy: jax.Array, kernel: jax.Array, x_shape, strides, padding):
    """Returns the gradient of `_conv(x, kernel, strides, padding)` with respect to x, given the
    output's gradient dy, as one stride-1 convolution per phase of the input grid.

    With stride S, padded input row S*q + r receives dy[q - t] * kernel[S*t + r] over the taps
    t of phase r only. XLA instead convolves dy dilated with S-1 zeros between rows and columns
    with the whole flipped kernel: S^2 times the multiplications, most by zero. Here each of
    the S^2 phases convolves dy, undilated, with its own taps kernel[r::S, c::S] (flipped,
    channels swapped); the phases are then interleaved and the padding cropped.
    """
    batch, height, width, depth = x_shape
    (s_h, s_w), ((lo_h, hi_h), (lo_w, hi_w)) = strides, padding
    out_h, out_w = dy.shape[1:3]
    # rows and columns of each phase: the padded input's, divided by the stride, rounded up
    q_h, q_w = -(-(height + lo_h + hi_h) // s_h), -(-(width + lo_w + hi_w) // s_w)
    rows = []
    for r in range(s_h):
        phases = []
        for c in range(s_w):
            taps = kernel[r::s_h, c::s_w]  # [T_h, T_w, D1, K]
            t_h, t_w = taps.shape[:2]
            if t_h == 0 or t_w == 0:  # kernel smaller than the stride: no tap reaches here
                phases.append(jnp.zeros((batch, q_h, q_w, depth), dy.dtype))
                continue
            taps = jnp.flip(taps, (0, 1)).swapaxes(2, 3)  # [T_h, T_w, K, D1]
            pads = ((t_h - 1, q_h - out_h), (t_w - 1, q_w - out_w))
            phases.append(_conv(dy, taps, (1, 1), pads))
        rows.append(jnp.stack(phases, axis=3))  # [B, q_h, q_w, s_w, D1]
    grid = jnp.stack(rows, axis=2).reshape(batch, q_h * s_h, q_w * s_w, depth)
    return grid[:, lo_h : lo_h + height, lo_w : lo_w + width, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding)


def _strided_conv_fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _strided_conv_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)
    return _input_grad_by_phases(dy, kernel, x.shape, strides, padding), kernel_vjp(dy)[0]


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    **kwargs,
):
    """`jax.lax.conv_general_dilated`, whose input gradient is computed by phases
    (`_input_grad_by_phases`) for a strided 2-D NHWC convolution with explicit padding on CPU.

    Same values, same weight gradient; the input gradient equal up to float rounding. XLA:CPU's
    own input gradient of a stride-2 convolution (dy dilated with zeros) was 2.0-2.3x slower
    at these networks' sizes (benchmarks/README.md). On GPUs, cuDNN's strided backward pass is
    used as it is. Every other convolution goes to `jax.lax.conv_general_dilated` unchanged.
    Like the pooling layers' gradients, it is a `jax.custom_vjp`: reverse mode (grad, vjp)
    only; forward mode (jax.jvp, jacfwd) through a strided convolution on CPU raises.
    """
    by_phases = (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and max(window_strides) > 1
        and not isinstance(padding, str)
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1
        and dimension_numbers is not None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and all(v is None for v in kwargs.values())  # precision, preferred type, sharding
    )
    if by_phases:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return _strided_conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        **kwargs,
    )


class Conv(nnx.Conv):
    """nnx.Conv whose input is `materialized` first (same parameters, same outputs), and whose
    strided convolutions' input gradient is computed by phases (`conv_general_dilated`)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return super().__call__(materialized(inputs))


def conv(
    in_channels: int,
    filters: int,
    kernel_size: int,
    stride: int,
    padding: int,
    *,
    use_bias: bool,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """Returns a conv layer F x F, stride S, P zeros on every side (never 'SAME': the padding
    is what the config says). Maps [B, H, W, D1] -> [B, H2, W2, K]."""
    return Conv(
        in_channels,
        filters,
        (kernel_size, kernel_size),
        strides=stride,
        padding=_symmetric(padding),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=KERNEL_INIT,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


class LocallyConnected(nnx.Module):
    """A conv layer without weight sharing: the same receptive fields, but its own F x F x D1
    filter bank (and bias) at every output position. Maps [B, H, W, D1] -> [B, H2, W2, K].

    kernel: [H2, W2, F*F*D1, K], each position's window unfolded in the order (row, column,
    channel) of a conv kernel [F, F, D1, K]; bias: [H2, W2, K].
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_shape: tuple[int, int, int],
        kernel_size: int,
        stride: int,
        padding: int,
        *,
        use_bias: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        h2, w2, filters = out_shape
        fan_in = kernel_size * kernel_size * in_shape[2]
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal", batch_axis=(0, 1))
        self.kernel = nnx.Param(init(rngs.params(), (h2, w2, fan_in, filters), jnp.float32))
        self.bias = (
            nnx.Param(jnp.zeros((h2, w2, filters), jnp.float32)) if use_bias else nnx.data(None)
        )
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        f, s, p = self.kernel_size, self.stride, self.padding
        h2, w2 = self.kernel.shape[:2]
        # Output positions first, [H, W, B, D1], so that the per-position matmul below needs
        # no transpose of the (F*F times larger) patches.
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0))).transpose(1, 2, 0, 3)
        # The F*F shifted, strided views of the input side by side: [H2, W2, B, F*F*D1].
        # (lax.conv_general_dilated_local unfolds the windows with an identity-kernel conv,
        # (F*F*D1)^2 multiply-adds per position: several times slower on CPU here.)
        patches = jnp.concatenate(
            [
                x[i : i + s * (h2 - 1) + 1 : s, j : j + s * (w2 - 1) + 1 : s]
                for i in range(f)
                for j in range(f)
            ],
            axis=-1,
        )
        y = jnp.einsum("hwbi,hwio->bhwo", patches, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def dense(
    in_features: int, features: int, *, use_bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.Linear:
    """Returns a fully connected layer [B, D1] -> [B, K]."""
    return nnx.Linear(
        in_features,
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=KERNEL_INIT,
        rngs=rngs,
    )


class RunningStat(nnx.BatchStat):
    """A BatchNorm running statistic (an `nnx.BatchStat`) whose update under tracing skips
    Flax's sharding comparison.

    `nnx.BatchNorm` updates its statistics with `stat[...] = new`, and for that Flax compares
    the shardings of the old and new values. Under jit both are tracers, whose `sharding`
    raises an AttributeError whose message JAX builds by walking the whole program traced so
    far: quadratic in depth. Replacing the value directly (what Flax does when the shardings
    match, as two tracers' always do) traces ResNet-56's train step in 1.6 s instead of 2.2 s
    and ResNet-110's in 3.0 s instead of 5.9 s (benchmarks/README.md).
    """

    def __setitem__(self, key, value) -> None:
        old = self.get_value()
        if (
            key is Ellipsis
            and isinstance(value, jax.core.Tracer)
            and value.shape == old.shape
            and value.dtype == old.dtype
        ):
            self.set_value(value)
        else:
            super().__setitem__(key, value)


def norm(function: str, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
    """Returns the normalisation over the last axis: 'batch' (statistics of the batch while
    training, running averages at inference) or 'layer' (statistics of each example)."""
    if function == "batch":
        layer = nnx.BatchNorm(
            channels,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=NORM_EPSILON,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        layer.mean = RunningStat(layer.mean.get_value())
        layer.var = RunningStat(layer.var.get_value())
        return layer
    if function == "layer":
        return nnx.LayerNorm(
            channels, epsilon=NORM_EPSILON, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
        )
    raise ValueError(f"unknown norm {function!r}; valid: {', '.join(NORMS[1:])}")


def _strided_views(
    x: jax.Array, window: int, stride: int, padding: int, pad_value: float, axes: tuple[int, ...]
) -> list[jax.Array]:
    """Returns the F^len(axes) strided views of `x` (padded with `pad_value`, P on each side of
    `axes`) that hold, for each offset in the window, that element of every window: each view
    has the pooled output's shape, and pooling is an elementwise reduction over them."""
    if padding:
        pads = [(padding, padding) if a in axes else (0, 0) for a in range(x.ndim)]
        x = jnp.pad(x, pads, constant_values=pad_value)
    size = {a: (x.shape[a] - window) // stride + 1 for a in axes}
    views = []
    for offsets in itertools.product(range(window), repeat=len(axes)):
        index = [slice(None)] * x.ndim
        for a, o in zip(axes, offsets, strict=True):
            index[a] = slice(o, o + stride * (size[a] - 1) + 1, stride)
        views.append(x[tuple(index)])
    return views


def _max_by_views(x, window, stride, padding, axes):
    return functools.reduce(jnp.maximum, _strided_views(x, window, stride, padding, -jnp.inf, axes))


def _mean_by_views(x, window, stride, padding, axes):
    total = functools.reduce(jnp.add, _strided_views(x, window, stride, padding, 0.0, axes))
    return total / window ** len(axes)


def _reduce_window(x, function, window, stride, padding, axes):
    dims = tuple(window if a in axes else 1 for a in range(x.ndim))
    strides = tuple(stride if a in axes else 1 for a in range(x.ndim))
    pads = tuple((padding, padding) if a in axes else (0, 0) for a in range(x.ndim))
    if function == "max":
        # A Python -inf as the initial value lets JAX recognise the max monoid.
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pads)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads)
    return total / window ** len(axes)


_BY_VIEWS = {"max": _max_by_views, "mean": _mean_by_views}


# The value comes from one reduce_window pass (fastest forward, e.g. at inference); the
# gradient is that of the same pooling written as elementwise ops on strided views. XLA
# differentiates reduce_window through select_and_scatter (max) or a padded reduce_window
# (mean), which on CPU made max-pooled training steps several times slower; the views'
# gradient is a few fused elementwise passes (a 2x2/2 max pool's backward: ~30x faster here,
# benchmarks/README.md). Ties in a max window share its gradient equally (a valid subgradient,
# like reduce_window's pick-one).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _window_pool(x, function, window, stride, padding, axes):
    return _reduce_window(x, function, window, stride, padding, axes)


def _window_pool_fwd(x, function, window, stride, padding, axes):
    return jax.vjp(lambda x: _BY_VIEWS[function](x, window, stride, padding, axes), x)


def _window_pool_bwd(function, window, stride, padding, axes, vjp, cotangent):
    return vjp(cotangent)


_window_pool.defvjp(_window_pool_fwd, _window_pool_bwd)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max over F x F windows of [B, H, W, C]; padding never wins (it is -inf)."""
    return _window_pool(x, "max", window, stride, padding, (1, 2))


def avg_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Mean over F x F windows of [B, H, W, C]; padded zeros count (divisor always F*F)."""
    return _window_pool(x, "mean", window, stride, padding, (1, 2))


def l2_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """sqrt(mean of squares) over F x F windows of [B, H, W, C]; padded zeros count."""
    mean_square = avg_pool(jnp.square(x), window, stride, padding)
    # sqrt has an infinite slope at 0, and all-zero windows are common after a ReLU: clamp at
    # the smallest normal number so the gradient there is 0 instead of NaN.
    return jnp.sqrt(jnp.maximum(mean_square, jnp.finfo(mean_square.dtype).tiny))


def depth_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max over windows of F neighbouring channels: [B, H, W, D1] -> [B, H, W, D2] with
    D2 = floor((D1 + 2P - F)/S) + 1; H and W unchanged (the maxout unit of Goodfellow et al.
    2013, arXiv 1302.4389)."""
    return _window_pool(x, "max", window, stride, padding, (3,))


_POOLS = {"max": max_pool, "avg": avg_pool, "l2": l2_pool, "depth": depth_pool}


def pool(x: jax.Array, function: str, window: int, stride: int, padding: int) -> jax.Array:
    """Applies the pooling `function` (max|avg|l2|depth) with window F, stride S, padding P."""
    return _POOLS[function](x, window, stride, padding)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H and W: [B, H, W, C] -> [B, C]."""
    return jnp.mean(x, axis=(1, 2))


def zero_pad_shortcut(x: jax.Array, filters: int, stride: int) -> jax.Array:
    """He et al. 2015 (arXiv 1512.03385) shortcut option A: the identity, subsampled by
    `stride`, with zero channels appended up to `filters`. No parameters.
    [B, H, W, D] -> [B, ceil(H/S), ceil(W/S), K]."""
    x = x[:, ::stride, ::stride, :]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, filters - x.shape[-1])))
