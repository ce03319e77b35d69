"""The PyTorch ops that the layer kinds' torch translations use (`models.kinds`, for the
benchmark's reference network, benchmarks/torch_reference.py) where torch has no ready one.

Imports torch: only the kinds' torch methods import this module, so the library runs without
the optional `bench` extra. Tensors are NCHW.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import layers
from models.shapes import LayerSpec

ACTIVATIONS = {
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
        self.norm = nn.LayerNorm(channels, eps=layers.NORM_EPSILON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def batch_norm(channels: int, rank: int) -> nn.Module:
    """Returns torch's BatchNorm over `channels` for inputs of `rank` (per example: 3 for
    feature maps, 1 for vectors) with our epsilon and momentum."""
    module = nn.BatchNorm2d if rank == 3 else nn.BatchNorm1d
    # torch's momentum weighs the new batch: 1 - Flax's momentum.
    return module(channels, eps=layers.NORM_EPSILON, momentum=1 - layers.BATCH_NORM_MOMENTUM)


def l2_pool(x: torch.Tensor, window: int, stride: int, padding: int) -> torch.Tensor:
    mean_square = F.avg_pool2d(x.square(), window, stride, padding, count_include_pad=True)
    return mean_square.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def depth_pool(x: torch.Tensor, window: int, stride: int, padding: int) -> torch.Tensor:
    x = F.pad(x.permute(0, 2, 3, 1), (padding, padding), value=-torch.inf)
    return x.unfold(3, window, stride).amax(-1).permute(0, 3, 1, 2)


def pool(x: torch.Tensor, function: str, window: int, stride: int, padding: int) -> torch.Tensor:
    """The pooling `function` (max|avg|l2|depth), as `models.layers.pool` computes it."""
    if function == "max":
        return F.max_pool2d(x, window, stride, padding)
    if function == "avg":
        return F.avg_pool2d(x, window, stride, padding, count_include_pad=True)
    if function == "l2":
        return l2_pool(x, window, stride, padding)
    return depth_pool(x, window, stride, padding)


def copy_(target: torch.Tensor, array) -> None:
    """Copies `array` (NumPy or JAX, any layout, same shape as `target`) into `target`."""
    target.copy_(torch.from_numpy(np.array(array, order="C")))
