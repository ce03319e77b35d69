"""The building blocks every family uses, defined once: conv with explicit symmetric padding,
the locally connected layer, dense, the pooling functions, normalisation and activations.

Arrays are NHWC. Parameters are float32; `dtype` is the computation dtype. On the CPU
backend the conv and the pooling layers each ask `models.cpu_kernels` once for a faster
kernel (same values; see that module and its switch, CONVNETS_CPU_KERNELS=0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import cpu_kernels

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


class Conv(nnx.Conv):
    """nnx.Conv (same parameters, same outputs) whose input goes through
    `cpu_kernels.materialized` (the identity; its own buffer on CPU)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return super().__call__(cpu_kernels.materialized(inputs))


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
        conv_general_dilated=cpu_kernels.layer_conv_general_dilated,  # lax's unless on CPU
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
        dot_general=cpu_kernels.dot_general,  # lax's unless on CPU
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


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm (same parameters, statistics and outputs) whose training pass, for float32
    inputs with the switch of `models.cpu_kernels` on, goes through `cpu_kernels.batch_norm`
    (the same values; its gradient written out)."""

    # True: the running statistics always, in training too, and left as they are (a detector
    # fine-tuned on batches unlike its classifier's, `detection.batchnorm = 'frozen'`); the
    # scale and offset still learn
    frozen = False

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if self.frozen:
            use_running_average = True
        running = self.use_running_average if use_running_average is None else use_running_average
        if (
            running is not False
            or mask is not None
            or self.axis_name is not None
            or self.axis != -1
            or self.scale is None
            or self.bias is None
            or x.dtype != jnp.float32
            or self.dtype not in (None, jnp.float32)
            or not cpu_kernels.enabled()
        ):
            return super().__call__(x, use_running_average, mask=mask)
        y, mean, var = cpu_kernels.batch_norm(x, self.scale[...], self.bias[...], self.epsilon)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y


def norm(function: str, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
    """Returns the normalisation over the last axis: 'batch' (statistics of the batch while
    training, running averages at inference) or 'layer' (statistics of each example)."""
    if function == "batch":
        layer = BatchNorm(
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


def reduce_window(
    x: jax.Array, function: str, window: int, stride: int, padding: int, axes: tuple[int, ...]
) -> jax.Array:
    """Returns the max or mean (`function`) over windows of F elements at stride S along each
    of `axes`, P padding elements on each side: -inf for max (padding never wins), zeros for
    mean (they count: the divisor is always F^len(axes))."""
    dims = tuple(window if a in axes else 1 for a in range(x.ndim))
    strides = tuple(stride if a in axes else 1 for a in range(x.ndim))
    pads = tuple((padding, padding) if a in axes else (0, 0) for a in range(x.ndim))
    if function == "max":
        # A Python -inf as the initial value lets JAX recognise the max monoid.
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pads)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads)
    return total / window ** len(axes)


def _pool_over(x, function, window, stride, padding, axes):
    if cpu_kernels.enabled():  # same value, a gradient XLA:CPU computes much faster
        return cpu_kernels.window_pool(reduce_window, x, function, window, stride, padding, axes)
    return reduce_window(x, function, window, stride, padding, axes)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max over F x F windows of [B, H, W, C]; padding never wins (it is -inf)."""
    return _pool_over(x, "max", window, stride, padding, (1, 2))


def avg_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Mean over F x F windows of [B, H, W, C]; padded zeros count (divisor always F*F)."""
    return _pool_over(x, "mean", window, stride, padding, (1, 2))


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
    return _pool_over(x, "max", window, stride, padding, (3,))


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
