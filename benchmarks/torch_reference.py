"""The PyTorch reference of the benchmark: the same architectures, built from the same LayerSpecs.

Each LayerSpec kind maps to the torch op that computes it (the torch methods of its class in
`models.kinds`), so a reference network and ours agree by construction (same layers, same
shapes, same parameter count; `copy_weights` and the benchmark's check compare their outputs
for the same weights). Tensors are NCHW in logical
order and channels-last in memory (`torch.channels_last`), PyTorch's fastest ordinary CPU layout
for these networks (9-33% faster than NCHW for training, measured on the 2-core CPU of
benchmarks/README.md).

Needs the optional `bench` extra (`pip install -e '.[bench]'`, torch==2.13.0 CPU build).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.kinds import KINDS
from models.shapes import INPUT, LayerSpec


class Network(nn.Module):
    """The torch network of `specs`: NCHW images [B, C, H, W] -> logits [B, classes]. Each
    layer is its kind's torch translation (`models.kinds`: `torch_module`, `torch_apply`)."""

    def __init__(self, specs: Sequence[LayerSpec]):
        super().__init__()
        self.specs = tuple(specs)
        self.layers = nn.ModuleDict(
            {
                s.name: module
                for s in self.specs
                if (module := KINDS[s.kind].torch_module(s)) is not None
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = {INPUT: x}
        y = x
        modules = dict(self.layers.items())
        for spec in self.specs:
            inputs = [outputs[name] for name in spec.inputs] if spec.inputs else [y]
            y = KINDS[spec.kind].torch_apply(spec, modules.get(spec.name), inputs)
            outputs[spec.name] = y
        return y


def count_params(model: nn.Module) -> int:
    """Returns the number of trained parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def copy_weights(model: Network, params: Mapping, batch_stats: Mapping) -> None:
    """Copies our NNX parameters into `model` (NHWC/HWIO -> NCHW/OIHW).

    `params` and `batch_stats`: nested dicts {layer name: {variable name: array}} as from
    `nnx.split(model, nnx.Param, nnx.BatchStat, ...)` turned to pure dicts.
    """
    stats = batch_stats.get("layers", {})
    with torch.no_grad():
        for spec in model.specs:
            if spec.name in model.layers:
                layer = model.layers[spec.name]
                p, s = params["layers"].get(spec.name, {}), stats.get(spec.name, {})
                KINDS[spec.kind].copy_to_torch(spec, layer, p, s)


def to_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    """Returns float images [B, H, W, C] as a torch tensor [B, C, H, W] in channels-last memory."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)


def make_train_step(model: Network, learning_rate: float, momentum: float, weight_decay: float):
    """Returns step(images, labels, learning_rate=None) -> loss: one SGD step (Nesterov
    momentum, L2 weight decay on kernels only, like training.optim) with cross-entropy,
    BatchNorm in training mode; `learning_rate` replaces the rate from that step on."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay}],
        lr=learning_rate,
        momentum=momentum,
        nesterov=True,
    )
    model.train()

    def step(
        images: torch.Tensor, labels: torch.Tensor, learning_rate: float | None = None
    ) -> torch.Tensor:
        if learning_rate is not None:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
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
