"""The PyTorch reference of the benchmark: the same architectures, built from the same LayerSpecs.

Each LayerSpec kind maps to the torch op that computes it, so a reference network and ours agree
by construction (same layers, same shapes, same parameter count; `copy_weights` and the
benchmark's check compare their outputs for the same weights). Tensors are NCHW in logical
order and channels-last in memory (`torch.channels_last`), PyTorch's fastest ordinary CPU layout
for these networks (../shared/STACK.md: 9-33% faster than NCHW for training).

Needs the optional `bench` extra (`pip install -e '.[bench]'`, torch==2.13.0 CPU build).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import layers as jax_layers
from models.shapes import INPUT, LayerSpec

_ACTIVATIONS = {
    "relu": F.relu,
    "elu": F.elu,
    # jax.nn.gelu defaults to the tanh approximation
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    # jax.nn.leaky_relu's default slope is 0.01, torch's too
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class LocallyConnected(nn.Module):
    """A conv without weight sharing on NCHW input: [B, D1, H, W] -> [B, K, H2, W2].

    weight: [H2*W2, D1*F*F, K] (torch's unfold order: channel, row, column); bias: [H2*W2, K].
    """

    def __init__(self, spec: LayerSpec):
        super().__init__()
        h2, w2, k = spec.out_shape
        fan_in = spec.in_shape[2] * spec.kernel_size**2
        self.out_hw = (h2, w2)
        self.kernel_size, self.stride, self.padding = spec.kernel_size, spec.stride, spec.padding
        self.weight = nn.Parameter(torch.randn(h2 * w2, fan_in, k) * (2.0 / fan_in) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(h2 * w2, k)) if spec.use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        y = torch.einsum("bil,lik->blk", patches, self.weight)  # [B, L, K]
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2).reshape(x.shape[0], -1, *self.out_hw)


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channels only, like nnx.LayerNorm on NHWC's last axis."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=jax_layers.NORM_EPSILON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _module(spec: LayerSpec) -> nn.Module:
    """Returns the torch module that holds `spec`'s parameters or state."""
    if spec.kind == "conv":
        return nn.Conv2d(
            spec.in_shape[2],
            spec.out_shape[2],
            spec.kernel_size,
            spec.stride,
            spec.padding,
            bias=spec.use_bias,
        )
    if spec.kind == "local":
        return LocallyConnected(spec)
    if spec.kind == "dense":
        return nn.Linear(spec.in_shape[0], spec.out_shape[0], bias=spec.use_bias)
    if spec.kind == "norm" and spec.function == "batch":
        batch_norm = nn.BatchNorm2d if len(spec.out_shape) == 3 else nn.BatchNorm1d
        # torch's momentum weighs the new batch: 1 - Flax's momentum.
        return batch_norm(
            spec.out_shape[-1],
            eps=jax_layers.NORM_EPSILON,
            momentum=1 - jax_layers.BATCH_NORM_MOMENTUM,
        )
    if spec.kind == "norm":
        return ChannelLayerNorm(spec.out_shape[-1])
    if spec.kind == "dropout":
        return nn.Dropout(spec.rate)
    raise ValueError(f"layer {spec.name!r}: kind {spec.kind!r} has no module")


def _l2_pool(x: torch.Tensor, window: int, stride: int, padding: int) -> torch.Tensor:
    mean_square = F.avg_pool2d(x.square(), window, stride, padding, count_include_pad=True)
    return mean_square.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def _depth_pool(x: torch.Tensor, window: int, stride: int, padding: int) -> torch.Tensor:
    x = F.pad(x.permute(0, 2, 3, 1), (padding, padding), value=-torch.inf)
    return x.unfold(3, window, stride).amax(-1).permute(0, 3, 1, 2)


def _pool(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    f, s, p = spec.kernel_size, spec.stride, spec.padding
    if spec.function == "max":
        return F.max_pool2d(x, f, s, p)
    if spec.function == "avg":
        return F.avg_pool2d(x, f, s, p, count_include_pad=True)
    if spec.function == "l2":
        return _l2_pool(x, f, s, p)
    return _depth_pool(x, f, s, p)


class Network(nn.Module):
    """The torch network of `specs`: NCHW images [B, C, H, W] -> logits [B, classes]."""

    def __init__(self, specs: Sequence[LayerSpec]):
        super().__init__()
        self.specs = tuple(specs)
        self.layers = nn.ModuleDict(
            {s.name: _module(s) for s in self.specs if s.kind in _MODULE_KINDS}
        )

    def _run_layer(self, spec: LayerSpec, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[0]
        match spec.kind:
            case "conv" | "local" | "dense" | "norm" | "dropout":
                return self.layers[spec.name](x)
            case "act":
                return _ACTIVATIONS[spec.function](x)
            case "pool":
                return _pool(x, spec)
            case "global_pool":
                return x.mean((2, 3))
            case "flatten":
                # Ours flattens NHWC (row, column, channel): the same order here keeps the
                # dense weights interchangeable.
                return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            case "shortcut":
                x = x[:, :, :: spec.stride, :: spec.stride]
                return F.pad(x, (0, 0, 0, 0, 0, spec.out_shape[2] - x.shape[1]))
            case "add":
                return inputs[0] + inputs[1]
        raise ValueError(f"layer {spec.name!r}: unknown kind {spec.kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = {INPUT: x}
        y = x
        for spec in self.specs:
            inputs = [outputs[name] for name in spec.inputs] if spec.inputs else [y]
            y = self._run_layer(spec, inputs)
            outputs[spec.name] = y
        return y


_MODULE_KINDS = ("conv", "local", "dense", "norm", "dropout")


def count_params(model: nn.Module) -> int:
    """Returns the number of trained parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def copy_weights(model: Network, params: Mapping, batch_stats: Mapping) -> None:
    """Copies our NNX parameters into `model` (NHWC/HWIO -> NCHW/OIHW).

    `params` and `batch_stats`: nested dicts {layer name: {variable name: array}} as from
    `nnx.split(model, nnx.Param, nnx.BatchStat, ...)` turned to pure dicts.
    """
    with torch.no_grad():
        for spec in model.specs:
            if spec.kind not in _MODULE_KINDS or spec.kind == "dropout":
                continue
            layer = model.layers[spec.name]
            p = {k: np.array(v) for k, v in params["layers"][spec.name].items()}  # writable
            if spec.kind == "conv":
                layer.weight.copy_(torch.from_numpy(p["kernel"].transpose(3, 2, 0, 1).copy()))
            elif spec.kind == "dense":
                layer.weight.copy_(torch.from_numpy(p["kernel"].T.copy()))
            elif spec.kind == "local":
                h2, w2, fan_in, k = p["kernel"].shape
                f, d1 = spec.kernel_size, spec.in_shape[2]
                # ours unfolds (row, column, channel), torch (channel, row, column)
                kernel = p["kernel"].reshape(h2 * w2, f, f, d1, k).transpose(0, 3, 1, 2, 4)
                layer.weight.copy_(torch.from_numpy(kernel.reshape(h2 * w2, fan_in, k).copy()))
            elif spec.kind == "norm":
                target = layer.norm if spec.function == "layer" else layer
                target.weight.copy_(torch.from_numpy(p["scale"]))
                target.bias.copy_(torch.from_numpy(p["bias"]))
                if spec.function == "batch":
                    stats = batch_stats["layers"][spec.name]
                    layer.running_mean.copy_(torch.from_numpy(np.array(stats["mean"])))
                    layer.running_var.copy_(torch.from_numpy(np.array(stats["var"])))
                continue
            if spec.use_bias:
                bias = p["bias"].reshape(layer.bias.shape)  # local: [H2, W2, K] -> [H2*W2, K]
                layer.bias.copy_(torch.from_numpy(np.array(bias)))


def to_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    """Returns float images [B, H, W, C] as a torch tensor [B, C, H, W] in channels-last memory."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)


def make_train_step(model: Network, learning_rate: float, momentum: float, weight_decay: float):
    """Returns step(images, labels) -> loss: one SGD step (Nesterov momentum, L2 weight decay on
    kernels only, like training.optim) with cross-entropy, BatchNorm in training mode."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay}],
        lr=learning_rate,
        momentum=momentum,
        nesterov=True,
    )
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def make_eval_step(model: Network):
    """Returns step(images) -> logits, in inference mode (running BatchNorm statistics)."""

    def step(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.inference_mode():
            return model(images)

    return step
