"""XLA:CPU speed workarounds, in one place behind one switch.

The layers (`models.layers`) are written as the math: a conv is `nnx.Conv` with explicit
padding, a pooling layer is `lax.reduce_window`. On the CPU backend, XLA compiles three of
their parts into much slower code than it could; this module holds the rewrites that avoid
that. Each computes the same values (gradients equal up to float rounding); the layers ask for
them in one call each, and get the plain computation when the switch is off. Measured in
benchmarks/README.md ("Layer changes"), two CPU threads:

- `materialized(x)`: the conv input computed into its own buffer (a `lax.cond` both of whose
  branches return x). XLA:CPU computes a conv's weight gradient from its input transposed to
  [C, H, W, B] and fuses the input's producers (BatchNorm, ReLU, residual additions) into that
  transpose, which then recomputes them in a strided loop ~6x slower than a plain transpose.
  `lax.optimization_barrier` does not help (the CPU compiler removes barriers before fusion).
  Training: ResNet-56 1.94x, ResNet-20 1.36x, plain ConvNet 1.10x faster; All-CNN-C inference
  1.65x. Skipped where oneDNN computes the weight gradients (`onednn.takes_weight_grads`):
  no transpose to fuse into, and the conditional then costs (ResNet-56 1.39x faster without).
- `conv_general_dilated`: `lax.conv_general_dilated` whose input gradient, for a strided
  NHWC convolution with explicit padding, is one stride-1 convolution per phase of the input
  grid (`_input_grad_by_phases`) instead of a convolution of dy dilated with zeros (S^2 times
  the multiplications, most by zero). A strided conv's input gradient 2.0-2.3x faster;
  All-CNN-C training 1.06x, ResNet-56 1.05x.
- `window_pool`: pooling whose value is one `reduce_window` pass (fastest forward) and whose
  gradient is that of the same pooling written as elementwise ops on strided views, instead of
  select-and-scatter (max) or a padded reduce_window (mean). A 2x2/2 max pool's backward
  62 ms -> 2.1 ms; pooled_max training 1.61x, pooled_avg 1.44x. Windows that tile the input
  (stride F, no padding: every pooled ConvNet here) are differentiated as a reduction over a
  reshaped x instead (`_by_blocks`): one elementwise pass, no padded sums of strided views;
  pooled_max training on one core ~1.2x faster again. Ties in a max window get a valid
  subgradient, like reduce_window's pick-one: shared equally on blocks, halved at each tied
  pairwise maximum on views.
- `batch_norm`: BatchNorm's training pass (the batch's statistics) with its gradient written
  out: two sums over dy and one elementwise pass, instead of JAX's derivative of the
  statistics' computation, which XLA:CPU runs as more, slower passes. For NHWC inputs where
  `onednn.norm_usable()`, both passes are oneDNN's batch_normalization primitives instead
  (ResNet-20 training 1.11x faster on two threads).

- `dot_general`: `lax.dot_general`, except that a dense layer [B, K] x [K, N] with a wide input
  and few outputs (K >= 4096, N <= 64: the plain ConvNet's head on its full feature map) gets
  its weight gradient as the batch's sum of outer products, one reduction, instead of XLA's
  dot x^T dy, which runs such a tall, thin product at ~10 GFLOP/s: [128, 32768] x [128, 10]
  9.1 -> 2.3 ms on two threads, 16.6 -> 3.9 ms on one.

The conv, pooling, BatchNorm and dense rewrites are `jax.custom_vjp`s: reverse mode (grad, vjp)
only. Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) through a strided conv, a pooling layer or a
training-mode BatchNorm raises while the switch is on; turn it off for that.

The switch: on by default on the CPU backend, off on every other backend (where a conditional
costs a device-to-host sync and cuDNN's strided backward pass is fine). The environment
variable CONVNETS_CPU_KERNELS=0 (or off / false / no) turns it off; `set_enabled(flag)` and
`with override(flag):` set it in code (`None`: back to the default). It is read when a
function is traced: a function already compiled keeps the kernels it was traced with.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from models import onednn  # a leaf: onednn does not import this module

ENV_VAR = "CONVNETS_CPU_KERNELS"

_override: bool | None = None  # set_enabled's flag; None: the default


def default() -> bool:
    """Returns the switch's default: on for the CPU backend unless CONVNETS_CPU_KERNELS is
    0, off, false or no."""
    if onednn.switched_off(ENV_VAR):
        return False
    return jax.default_backend() == "cpu"


def enabled() -> bool:
    """Returns whether the layers use this module's kernels (read at trace time)."""
    return default() if _override is None else _override


def set_enabled(flag: bool | None) -> bool | None:
    """Turns the kernels on (True) or off (False), or back to the default (None); returns the
    previous setting, for restoring it."""
    global _override
    previous, _override = _override, None if flag is None else bool(flag)
    return previous


@contextlib.contextmanager
def override(flag: bool | None) -> Iterator[None]:
    """`with override(False): ...` traces the code inside with the kernels off (True: on)."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


# --- the conv input in its own buffer --------------------------------------------------------


def materialized(x: jax.Array) -> jax.Array:
    """Returns `x` unchanged; with the switch on, computed into its own buffer that later
    operations cannot fuse into (a conditional both of whose branches return x)."""
    if not enabled() or onednn.takes_weight_grads(x):
        return x
    # The NaN branch adds 0.0, which XLA cannot simplify away (it turns -0.0 into 0.0), so the
    # conditional survives; it returns the same values as the other branch.
    return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda y: y + 0.0, lambda y: y, x)


# --- strided convolutions' input gradient by phases --------------------------------------------

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
    """`jax.lax.conv_general_dilated`; with the switch on, a strided 2-D NHWC convolution with
    explicit padding has its input gradient computed by phases (`_input_grad_by_phases`).

    Same values, same weight gradient; the input gradient equal up to float rounding. Every
    other convolution, and every one with the switch off, goes to `jax.lax.conv_general_dilated`
    unchanged. A `jax.custom_vjp`: forward mode through a strided convolution raises.
    """
    by_phases = (
        enabled()
        and onednn.plain_nhwc_conv(
            lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, kwargs,
        )
        and max(window_strides) > 1
    )  # fmt: skip
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


# --- pooling gradients by strided views --------------------------------------------------------


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


_BY_VIEWS = {"max": _max_by_views, "mean": _mean_by_views}


def _by_blocks(function, x, window, axes):
    """Pooling over non-overlapping windows (stride F, no padding) as a reduction over the
    window axes of a reshaped `x`: its gradient is one elementwise pass over x (for max, a
    window's tied maxima share its gradient equally; on the views each tied pairwise maximum
    halves it). Rows and columns past the last whole window are cropped (they get no
    gradient, as in any F/F pooling)."""
    shape, index = [], []
    for a, size in enumerate(x.shape):
        if a in axes:
            whole = size // window
            shape += [whole, window]
            index.append(slice(0, whole * window))
        else:
            shape.append(size)
            index.append(slice(None))
    blocks = x[tuple(index)].reshape(shape)
    window_axes = tuple(a + i + 1 for i, a in enumerate(sorted(axes)))
    reduce = jnp.max if function == "max" else jnp.mean
    return reduce(blocks, axis=window_axes)


# reduce(x, function, window, stride, padding, axes): the plain pooling (models.layers)
Reduce = Callable[[jax.Array, str, int, int, int, tuple[int, ...]], jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 2, 3, 4, 5, 6))
def _window_pool(reduce, x, function, window, stride, padding, axes):
    return reduce(x, function, window, stride, padding, axes)


def _window_pool_fwd(reduce, x, function, window, stride, padding, axes):
    if stride == window and not padding:
        return jax.vjp(lambda x: _by_blocks(function, x, window, axes), x)
    return jax.vjp(lambda x: _BY_VIEWS[function](x, window, stride, padding, axes), x)


def _window_pool_bwd(reduce, function, window, stride, padding, axes, vjp, cotangent):
    return vjp(cotangent)


_window_pool.defvjp(_window_pool_fwd, _window_pool_bwd)


def window_pool(
    reduce: Reduce,
    x: jax.Array,
    function: str,
    window: int,
    stride: int,
    padding: int,
    axes: tuple[int, ...],
) -> jax.Array:
    """Returns `reduce(x, function, window, stride, padding, axes)` (the plain pooling, whose
    value is kept), differentiated as the same pooling (function max|mean over `axes`) on
    blocks of a reshaped x where the windows tile it (stride F, no padding), else on strided
    views. A `jax.custom_vjp`: forward mode raises. The caller asks `enabled()`."""
    return _window_pool(reduce, x, function, window, stride, padding, axes)


# --- BatchNorm's training pass with its gradient written out ---------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, through_onednn):
    return _batch_norm_fwd(x, scale, bias, epsilon, through_onednn)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, through_onednn):
    if through_onednn:
        y, mean, var = onednn.batch_norm_forward(x, scale, bias, epsilon)
        return (y, mean, var), (x, mean, var, scale)
    axes = tuple(range(x.ndim - 1))
    # E[x] and E[x^2] in one pass over x (Flax's `use_fast_variance`), clipped at 0 as Flax's.
    mean = jnp.mean(x, axes)
    var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
    y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
    return (y, mean, var), (x, mean, var, scale)


def _batch_norm_bwd(epsilon, through_onednn, residuals, cotangents):
    x, mean, var, scale = residuals
    dy = cotangents[0]  # mean's and var's cotangents are zero: batch_norm stops their gradient
    if through_onednn:
        return onednn.batch_norm_backward(x, dy, scale, mean, var, epsilon)
    inv = jax.lax.rsqrt(var + epsilon)
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centred = x - mean
    dy_sum = jnp.sum(dy, axes)
    dy_centred_sum = jnp.sum(dy * centred, axes)  # with dy_sum, one pass over dy and x
    dx = (scale * inv) * (
        dy - dy_sum / count - centred * (dy_centred_sum * jnp.square(inv) / count)
    )
    return dx, dy_centred_sum * inv, dy_sum


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns BatchNorm's training pass over the last axis of float32 `x`: (y, mean, var), y =
    (x - mean) / sqrt(var + epsilon) * scale + bias with the batch's mean and (biased)
    variance, as `nnx.BatchNorm` computes them. Its gradient is written out (two sums over dy
    and one elementwise pass) instead of differentiated through the statistics' computation;
    mean and var carry no gradient (they only feed the running averages). A `jax.custom_vjp`:
    forward mode raises. The caller asks `enabled()`."""
    through_onednn = x.ndim == 4 and onednn.norm_usable()
    y, mean, var = _batch_norm(x, scale, bias, epsilon, through_onednn)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


# --- a dense layer's weight gradient as a sum of outer products --------------------------------

# Where the outer products beat XLA's dot (batch 128, float32, benchmarks/README.md): inputs of
# at least this many features and at most this many outputs.
OUTER_MIN_IN, OUTER_MAX_OUT = 4096, 64
_DENSE = (((1,), (0,)), ((), ()))  # [B, K] x [K, N]: contract K, no batch dimensions


def _nested_tuples(value):
    return tuple(map(_nested_tuples, value)) if isinstance(value, (list, tuple)) else value


@jax.custom_vjp
def _dense(x, kernel):
    return x @ kernel


def _dense_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _dense_bwd(residuals, dy):
    x, kernel = residuals
    # the weight gradient x^T dy as sum_b x[b] (outer) dy[b]: XLA fuses the products into the
    # reduction over the batch, so the [B, K, N] products are never stored
    return dy @ kernel.T, jnp.sum(x[:, :, None] * dy[:, None, :], axis=0)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
) -> jax.Array:
    """`lax.dot_general` with its signature; with the switch on, a float32 [B, K] x [K, N]
    product with K >= OUTER_MIN_IN and N <= OUTER_MAX_OUT (and no other options) is the same
    product whose weight gradient is computed as a sum of outer products. What the dense layers
    take as their `dot_general`. Decided when traced."""
    if (
        enabled()
        and _nested_tuples(dimension_numbers) == _DENSE
        and lhs.ndim == rhs.ndim == 2
        and lhs.dtype == rhs.dtype == jnp.float32
        and precision is None
        and preferred_element_type is None
        and all(v is None for v in kwargs.values())
        and rhs.shape[0] >= OUTER_MIN_IN
        and rhs.shape[1] <= OUTER_MAX_OUT
    ):
        return _dense(lhs, rhs)
    return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
    )


# oneDNN's convolutions (models/onednn.py: the kernels PyTorch uses on CPU, called through
# XLA's FFI) take the passes they were measured to win when the extension is built, this
# module's switch is on and CONVNETS_ONEDNN is not off; every other pass, and every other case
# (not float32, several devices, another backend, no extension), is `conv_general_dilated`
# above. Whole training steps 1.23-1.38x faster on the 2-core CPU (benchmarks/README.md).
layer_conv_general_dilated = onednn.routed(conv_general_dilated, enabled)
