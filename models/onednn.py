"""2-D convolutions and BatchNorm through oneDNN (the kernels PyTorch uses on CPU), inside jit, via
XLA's FFI.

XLA:CPU computes convolutions with Eigen, at 0.10-0.96 of oneDNN's speed pass by pass
(benchmarks/README.md); the PyPI jaxlib cannot hand them to its own oneDNN. This module calls
oneDNN's convolution primitives as XLA FFI custom calls: the C++ handlers are csrc/onednn_conv.cc,
compiled into `models/_onednn_conv*.so` when the project is installed (setup.py) and linked to
`libdnnl.so.3` of the `onednn-cpu-gomp` package (oneDNN 3.2, GNU OpenMP).

    from models import onednn
    onednn.available()                        # the extension loaded (one log line if not)
    y = onednn.conv(x, kernel, strides, padding)   # == lax.conv_general_dilated, NHWC/HWIO

`batch_norm_forward` and `batch_norm_backward` are BatchNorm's training pass and its gradient
(`models.cpu_kernels.batch_norm` calls them for NHWC float32 inputs while `norm_usable()`).

`conv` is a `jax.custom_vjp` whose forward pass, input gradient (dx) and weight gradient (dw)
each go to oneDNN or to XLA, per pass and per shape (`choose`, from measurements of
benchmarks/onednn_parts.py). Where the extension is missing or cannot be used (not x86-64
Linux, no compiler at install time, library missing, another backend than CPU, several devices
where the custom call would need partitioning, not float32), `conv` is the XLA convolution
(`xla_conv`) itself: same values up to float rounding, never a failure.

Environment:
- CONVNETS_ONEDNN=0 (off / false / no): never use oneDNN (read when `conv` is traced).
- CONVNETS_ONEDNN_NORM=0: BatchNorm on XLA, the convolutions still through oneDNN.
- CONVNETS_ONEDNN_LIBRARY=path: load the extension from `path` instead of models/ (tests point
  it at nothing to exercise the fallback).
- CONVNETS_ONEDNN_THREADS=n: OpenMP threads per oneDNN call (default: one per CPU).
- OMP_WAIT_POLICY: set to PASSIVE when the extension loads unless set (or GOMP_SPINCOUNT).

Like `models.cpu_kernels`' rewrites, the custom VJP supports reverse mode only: forward-mode
autodiff (`jax.jvp`) through `conv` raises while oneDNN is in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.metadata
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

SWITCH_ENV = "CONVNETS_ONEDNN"
LIBRARY_ENV = "CONVNETS_ONEDNN_LIBRARY"
THREADS_ENV = "CONVNETS_ONEDNN_THREADS"
OFF_VALUES = ("0", "off", "false", "no")  # what turns a CONVNETS_* switch off

EXTENSION = "_onednn_conv"  # models/_onednn_conv<EXT_SUFFIX>, built by setup.py
RUNTIME_DIST, RUNTIME_LIBRARY = "onednn-cpu-gomp", "libdnnl.so.3"
TARGETS = {
    "fwd": "convnets_onednn_conv_fwd",
    "dx": "convnets_onednn_conv_dx",
    "dw": "convnets_onednn_conv_dw",
    "bn_fwd": "convnets_onednn_bn_fwd",
    "bn_bwd": "convnets_onednn_bn_bwd",
}
PASSES = ("fwd", "dx", "dw")

# Memory formats of a oneDNN primitive (csrc/onednn_conv.cc): PLAIN reads and writes XLA's
# NHWC/HWIO buffers directly; WEIGHTS_ANY lets oneDNN pick the weights' layout (a reorder of
# the small kernel); BLOCKED lets it pick every operand's (activations reordered in and out).
PLAIN, WEIGHTS_ANY, BLOCKED = 0, 1, 2
LAYOUTS = {"plain": PLAIN, "weights_any": WEIGHTS_ANY, "blocked": BLOCKED}

# OpenMP threads per oneDNN call; the calls run on one of XLA's CPU threads, beside its pool.
DEFAULT_THREADS = 0  # 0: one per CPU this process may run on
# How OpenMP's threads wait at the end of a parallel region, unless the environment says
# (OMP_WAIT_POLICY or GOMP_SPINCOUNT): PASSIVE sleeps at once instead of spinning, which leaves
# the cores to XLA's threads between calls and keeps a team from collapsing when another
# process holds a core (benchmarks/README.md).
DEFAULT_WAIT_POLICY = "PASSIVE"

_NHWC = ("NHWC", "HWIO", "NHWC")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None  # why the extension is not available
_loaded = False
_registered: set[str] = set()  # FFI targets registered in this process (once each)


# --------------------------------------------------------------------------------------------
# Loading


def _runtime_library() -> Path | None:
    """Returns the path of libdnnl.so.3 as the onednn-cpu-gomp package installed it, if so."""
    try:
        files = importlib.metadata.distribution(RUNTIME_DIST).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == RUNTIME_LIBRARY:
            path = Path(file.locate()).resolve()
            if path.exists():
                return path
    candidate = Path(sys.prefix) / "lib" / RUNTIME_LIBRARY
    return candidate if candidate.exists() else None


def _extension_path() -> Path | None:
    """Returns the extension to load: $CONVNETS_ONEDNN_LIBRARY, or the one built into models/."""
    override = os.environ.get(LIBRARY_ENV)
    if override is not None:
        return Path(override)
    import sysconfig

    path = Path(__file__).with_name(EXTENSION + sysconfig.get_config_var("EXT_SUFFIX"))
    return path if path.exists() else None


def _threads() -> int:
    value = os.environ.get(THREADS_ENV, "").strip()
    threads = int(value) if value else DEFAULT_THREADS
    return threads if threads > 0 else len(os.sched_getaffinity(0))


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """Loads the runtime library and the extension and registers the FFI targets; returns
    (library, None) or (None, why not)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"oneDNN kernels are built for x86-64 Linux only, not {platform.machine()}"
    path = _extension_path()
    if path is None:
        return None, (
            f"the extension models/{EXTENSION}*.so was not built (no C++ compiler or no "
            "oneDNN headers at install time?); reinstall with `pip install -e .`"
        )
    runtime = _runtime_library()
    if runtime is None:
        return None, f"{RUNTIME_LIBRARY} not found: the {RUNTIME_DIST} package is not installed"
    # libgomp reads OMP_WAIT_POLICY once, when it loads (below, as libdnnl's dependency); the
    # variable is removed again so that child processes (and other OpenMP runtimes loaded
    # later, e.g. torch's) do not inherit it
    set_policy = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    if set_policy:
        os.environ["OMP_WAIT_POLICY"] = DEFAULT_WAIT_POLICY
    try:
        ctypes.CDLL(str(runtime), mode=ctypes.RTLD_GLOBAL)
        library = ctypes.CDLL(str(path))
        missing = [t for t in TARGETS.values() if not hasattr(library, t)]
        if missing:  # it loads, but a handler of this version is not in it
            return None, (
                f"{path} lacks this version's handlers ({', '.join(missing)}): it was built "
                "from an older csrc/onednn_conv.cc; rebuild it with `pip install -e .`"
            )
        for target in TARGETS.values():
            capsule = jax.ffi.pycapsule(getattr(library, target))
            if target not in _registered:
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
                _registered.add(target)
    except (OSError, AttributeError) as e:
        return None, f"cannot load {path} with {runtime}: {e}"
    finally:
        if set_policy:
            del os.environ["OMP_WAIT_POLICY"]
    library.convnets_onednn_set_threads.argtypes = [ctypes.c_int]
    library.convnets_onednn_set_threads(_threads())
    return library, None


def _ensure_loaded() -> ctypes.CDLL | None:
    global _library, _reason, _loaded
    with _lock:
        if not _loaded:
            _library, _reason = _load()
            _loaded = True
            if _reason is not None:
                logging.warning("oneDNN convolutions off, XLA's used instead: %s", _reason)
    return _library


def available() -> bool:
    """Returns whether the extension is built and loaded (logs once why not)."""
    return _ensure_loaded() is not None


def unavailable_reason() -> str | None:
    """Returns why the extension is not available, or None when it is."""
    _ensure_loaded()
    return _reason


def switched_off(variable: str) -> bool:
    """Whether the environment variable `variable` is set to 0 / off / false / no."""
    return os.environ.get(variable, "").strip().lower() in OFF_VALUES


def switched_on() -> bool:
    """Returns False when CONVNETS_ONEDNN is 0 / off / false / no."""
    return not switched_off(SWITCH_ENV)


def usable() -> bool:
    """Returns whether `conv` will use oneDNN when traced now: the switch on, the extension
    loaded, the CPU backend with one device (a custom call is not partitioned across
    devices)."""
    return (
        switched_on() and available() and jax.default_backend() == "cpu" and jax.device_count() == 1
    )


def set_threads(threads: int) -> None:
    """Sets the OpenMP threads of every later oneDNN call (0: one per available CPU)."""
    library = _ensure_loaded()
    if library is not None:
        library.convnets_onednn_set_threads(threads if threads > 0 else _threads())


def version() -> str | None:
    """Returns the loaded oneDNN's version ("3.2.0"), or None."""
    library = _ensure_loaded()
    if library is None:
        return None
    v = library.convnets_onednn_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


# --------------------------------------------------------------------------------------------
# Which pass goes where


@dataclasses.dataclass(frozen=True)
class Shape:
    """One convolution: input [batch, height, width, depth], `filters` kernels of kernel_h x
    kernel_w, strides and explicit ((top, bottom), (left, right)) padding."""

    batch: int
    height: int
    width: int
    depth: int
    filters: int
    kernel_h: int
    kernel_w: int
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per pass, the oneDNN memory layout to use (PLAIN, WEIGHTS_ANY, BLOCKED), or None for
    XLA's convolution."""

    fwd: int | None = None
    dx: int | None = None
    dw: int | None = None

    def get(self, name: str) -> int | None:
        return getattr(self, name)


ALL_XLA = Plan()


def choose(shape: Shape) -> Plan:
    """The measured choice (benchmarks/onednn_parts.py, recorded in benchmarks/README.md):
    for each pass of `shape`, oneDNN's layout that beat XLA's convolution, or None. Every
    shape's weight gradient goes to oneDNN (`takes_weight_grads` relies on it)."""
    if shape.kernel_h == shape.kernel_w == 1:
        # a 1x1 convolution is a matmul to XLA: its forward pass and input gradient are as
        # fast as oneDNN's; its weight gradient is 3-13x slower
        return Plan(dw=WEIGHTS_ANY)
    return Plan(fwd=WEIGHTS_ANY, dx=WEIGHTS_ANY, dw=WEIGHTS_ANY)


_plan_override: Plan | Callable[[Shape], Plan] | None = None


@contextlib.contextmanager
def override_plan(plan: Plan | Callable[[Shape], Plan] | None) -> Iterator[None]:
    """`with override_plan(Plan(dw=BLOCKED)):` traces `conv` with that plan (or a function of
    the shape) instead of `choose` (benchmarks and tests)."""
    global _plan_override
    previous, _plan_override = _plan_override, plan
    try:
        yield
    finally:
        _plan_override = previous


def takes_weight_grads(x: jax.Array) -> bool:
    """Whether `conv` computes the weight gradient of every convolution of input `x` through
    oneDNN (when traced now): a 4-D float32 input, `usable()`, and `choose`, which puts every
    shape's weight gradient there (not an `override_plan`)."""
    return x.ndim == 4 and x.dtype == jnp.float32 and _plan_override is None and usable()


def _plan_for(shape: Shape) -> Plan:
    if _plan_override is None:
        return choose(shape)
    return _plan_override(shape) if callable(_plan_override) else _plan_override


# --------------------------------------------------------------------------------------------
# The convolution


def xla_conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """XLA's convolution, NHWC input, HWIO kernel, explicit padding: the reference and the
    default fallback."""
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _attrs(strides, padding, layout: int) -> dict:
    (top, bottom), (left, right) = padding
    values = {
        "stride_h": strides[0],
        "stride_w": strides[1],
        "pad_top": top,
        "pad_bottom": bottom,
        "pad_left": left,
        "pad_right": right,
        "layout": layout,
    }
    return {k: np.int64(v) for k, v in values.items()}


def _call(name: str, a: jax.Array, b: jax.Array, out_shape, strides, padding, layout: int):
    if _ensure_loaded() is None:  # registers the FFI targets on first use
        raise RuntimeError(f"oneDNN convolutions are not available: {_reason}")
    result = jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[name], result, vmap_method="sequential")
    return call(a, b, **_attrs(strides, padding, layout))


def _output_shape(x_shape, k_shape, strides, padding) -> tuple[int, int, int, int]:
    n, h, w, _ = x_shape
    kh, kw, _, k = k_shape
    (top, bottom), (left, right) = padding
    oh = (h + top + bottom - kh) // strides[0] + 1
    ow = (w + left + right - kw) // strides[1] + 1
    return n, oh, ow, k


def forward(x, kernel, strides, padding, layout: int = BLOCKED) -> jax.Array:
    """The forward pass through oneDNN (no fallback: the extension must be available)."""
    out = _output_shape(x.shape, kernel.shape, strides, padding)
    return _call("fwd", x, kernel, out, strides, padding, layout)


def input_grad(dy, kernel, x_shape, strides, padding, layout: int = BLOCKED) -> jax.Array:
    """dL/dx from dL/dy through oneDNN (no fallback)."""
    return _call("dx", dy, kernel, x_shape, strides, padding, layout)


def weight_grad(x, dy, kernel_shape, strides, padding, layout: int = BLOCKED) -> jax.Array:
    """dL/dkernel from the input and dL/dy through oneDNN (no fallback)."""
    return _call("dw", x, dy, kernel_shape, strides, padding, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, padding, plan: Plan, fallback):
    if plan.fwd is None:
        return fallback(x, kernel, strides, padding)
    return forward(x, kernel, strides, padding, plan.fwd)


def _conv_fwd(x, kernel, strides, padding, plan, fallback):
    return _conv(x, kernel, strides, padding, plan, fallback), (x, kernel)


def _conv_bwd(strides, padding, plan, fallback, residuals, dy):
    x, kernel = residuals
    if plan.dx is None:
        dx = jax.vjp(lambda x: fallback(x, kernel, strides, padding), x)[1](dy)[0]
    else:
        dx = input_grad(dy, kernel, x.shape, strides, padding, plan.dx)
    if plan.dw is None:
        dw = jax.vjp(lambda k: fallback(x, k, strides, padding), kernel)[1](dy)[0]
    else:
        dw = weight_grad(x, dy, kernel.shape, strides, padding, plan.dw)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _normalise(strides, padding) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]] | None:
    """Returns (strides, padding) as int tuples, or None if oneDNN cannot take them."""
    if isinstance(padding, str) or len(strides) != 2 or len(padding) != 2:
        return None
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if min(strides) < 1 or min(min(p) for p in padding) < 0:
        return None
    return strides, padding


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    *,
    fallback: Callable[..., jax.Array] = xla_conv,
) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC",
    "HWIO", "NHWC"))` (explicit padding, no dilation, one group), each pass through oneDNN or
    XLA as `choose` decides for this shape.

    `fallback(x, kernel, strides, padding)` is the XLA convolution used for the passes (and
    the cases) oneDNN does not take: `xla_conv` by default, or e.g. the project's
    `cpu_kernels.conv_general_dilated` bound to NHWC. Decided when traced.
    """
    normalised = _normalise(strides, padding)
    if (
        normalised is None
        or x.ndim != 4
        or kernel.ndim != 4
        or x.dtype != jnp.float32
        or kernel.dtype != jnp.float32
        or kernel.shape[2] != x.shape[3]
        or 0 in x.shape
        or 0 in kernel.shape
        or not usable()
    ):
        return fallback(x, kernel, strides, padding)
    strides, padding = normalised
    out = _output_shape(x.shape, kernel.shape, strides, padding)
    if min(out) <= 0:
        return fallback(x, kernel, strides, padding)
    shape = Shape(*x.shape, kernel.shape[3], kernel.shape[0], kernel.shape[1], strides, padding)
    plan = _plan_for(shape)
    if plan == ALL_XLA:
        return fallback(x, kernel, strides, padding)
    return _conv(x, kernel, strides, padding, plan, fallback)


def plain_nhwc_conv(
    lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, kwargs
) -> bool:
    """Whether `lax.conv_general_dilated` with these arguments is a 2-D NHWC/HWIO convolution
    with explicit padding, no dilation, one group and no precision/type/sharding options: the
    case this module and `models.cpu_kernels` compute their own way."""
    return (
        getattr(lhs, "ndim", 0) == 4
        and getattr(rhs, "ndim", 0) == 4
        and not isinstance(padding, str)
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and feature_group_count == 1
        and dimension_numbers is not None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and all(v is None for v in kwargs.values())  # precision, preferred type, sharding
    )


def routed(
    conv_general_dilated: Callable[..., jax.Array], switch: Callable[[], bool] | None = None
) -> Callable[..., jax.Array]:
    """Returns a function with `lax.conv_general_dilated`'s signature that sends every 2-D
    NHWC/HWIO convolution with explicit padding, no dilation and one group to `conv` (each pass
    where `choose` decides, `conv_general_dilated` for the rest) while `switch()` is true (at
    trace time), and everything else to `conv_general_dilated` unchanged. Wiring the layers:
    `conv_general_dilated = onednn.routed(conv_general_dilated, enabled)`."""
    fallback = functools.partial(conv_general_dilated, dimension_numbers=_NHWC)

    def conv_general_dilated_routed(
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
        if (switch is None or switch()) and plain_nhwc_conv(
            lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, kwargs,
        ):  # fmt: skip
            return conv(lhs, rhs, window_strides, padding, fallback=fallback)
        return conv_general_dilated(
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

    return conv_general_dilated_routed


def implementation(shape: Shape, name: str, layout: int = BLOCKED) -> str | None:
    """Returns the implementation oneDNN picks for one pass of `shape` (e.g. "brg:avx512_core",
    then for each operand "R" if it is reordered, "-" if not), or None."""
    library = _ensure_loaded()
    if library is None:
        return None
    (top, bottom), (left, right) = shape.padding
    buffer = ctypes.create_string_buffer(256)
    args = [
        PASSES.index(name),
        shape.batch,
        shape.height,
        shape.width,
        shape.depth,
        shape.filters,
        shape.kernel_h,
        shape.kernel_w,
        *shape.strides,
        top,
        bottom,
        left,
        right,
        layout,
    ]
    status = library.convnets_onednn_impl(
        *[ctypes.c_int64(a) for a in args], buffer, ctypes.c_int64(len(buffer))
    )
    return buffer.value.decode() if status == 0 else None


# --------------------------------------------------------------------------------------------
# BatchNorm's training pass


NORM_SWITCH_ENV = "CONVNETS_ONEDNN_NORM"


def norm_usable() -> bool:
    """Whether BatchNorm's training pass goes through oneDNN when traced now: `usable()` and
    CONVNETS_ONEDNN_NORM not off."""
    return not switched_off(NORM_SWITCH_ENV) and usable()


def _norm_pass(name: str, x, operands, epsilon: float):
    """Calls the BatchNorm handler `name` (both return an array of x's shape and two of its
    channels')."""
    if _ensure_loaded() is None:  # registers the FFI targets on first use
        raise RuntimeError(f"oneDNN kernels are not available: {_reason}")
    stat = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
    results = (jax.ShapeDtypeStruct(x.shape, jnp.float32), stat, stat)
    call = jax.ffi.ffi_call(TARGETS[name], results, vmap_method="sequential")
    return tuple(call(*operands, epsilon=np.float32(epsilon)))


def batch_norm_forward(x, scale, shift, epsilon: float):
    """BatchNorm's training pass over the last axis of float32 NHWC `x` through oneDNN: (y,
    mean, var) with the batch's mean and biased variance (no fallback: the extension must be
    available)."""
    return _norm_pass("bn_fwd", x, (x, scale, shift), epsilon)


def batch_norm_backward(x, dy, scale, mean, var, epsilon: float):
    """The gradient of `batch_norm_forward`'s y: (dx, dscale, dshift) from dL/dy, the input
    and the batch statistics the forward pass returned (no fallback)."""
    return _norm_pass("bn_bwd", x, (x, dy, scale, mean, var), epsilon)


def _reset_for_tests() -> None:
    """Forgets the loaded state, so that the next call loads again (tests)."""
    global _library, _reason, _loaded
    with _lock:
        _library, _reason, _loaded = None, None, False
