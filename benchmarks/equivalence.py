"""Checks that the PyTorch reference computes what our model computes.

    python -m benchmarks.equivalence --models=resnet20,plain   # prints one JSON line

For each model: the parameter counts (our summary, our real module, the torch network), and
the logits of both for the same weights and images (every parameter and running statistic
moved away from its initial value, so that all of them matter), at inference and in training mode
(batch statistics; only for models without dropout, whose draws differ between frameworks).
"""

from __future__ import annotations

import json
import sys

from training import runtime

runtime.configure_jax()  # before JAX starts its backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from benchmarks import torch_reference  # noqa: E402
from models import summary  # noqa: E402

# float32 sums of a few hundred to a few thousand terms per layer, in different orders: ~1e-6
# relative per layer; 20-56 layers stay well inside this.
RTOL = ATOL = 1e-4
IMAGE_SHAPE, NUM_CLASSES = (32, 32, 3), 10


def _perturb(model: nnx.Module, seed: int) -> None:
    """Moves every parameter and BatchNorm running average away from its initial value, so
    that the check exercises all of them (the class-score layer starts at zero, BatchNorm at
    scale 1, offset 0, mean 0, variance 1)."""
    rng = np.random.default_rng(seed)
    noise = lambda a, scale: rng.normal(0.0, scale, a.shape).astype(np.float32)
    _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    params = jax.tree.map(lambda a: a + noise(a, 0.05), params)
    # means anywhere, variances only upwards (they must stay positive)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: a + (noise(a, 0.1) if "mean" in str(path[-1]) else abs(noise(a, 0.3))),
        stats,
    )
    nnx.update(model, params, stats)


def check(preset: str, batch: int = 8, seed: int = 0) -> dict:
    """Returns the parameter counts and the largest logit differences (eval and train mode)
    between our model of `preset` and the torch reference with the same weights."""
    cfg = models.preset(preset)
    specs = models.architecture(cfg, IMAGE_SHAPE, NUM_CLASSES)
    ours = models.create_model(cfg, IMAGE_SHAPE, NUM_CLASSES, rngs=nnx.Rngs(seed))
    _perturb(ours, seed)
    theirs = torch_reference.Network(specs).to(memory_format=torch.channels_last)
    _, params, stats, _ = nnx.split(ours, nnx.Param, nnx.BatchStat, ...)
    torch_reference.copy_weights(theirs, nnx.to_pure_dict(params), nnx.to_pure_dict(stats))
    x = np.random.default_rng(seed).normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)
    x_torch = torch_reference.to_nchw(x).contiguous(memory_format=torch.channels_last)
    result = {
        "model": preset,
        "params_summary": summary.to_json(specs)["total_params"],
        "params_ours": summary.count_params(ours),
        "params_torch": torch_reference.count_params(theirs),
    }
    # Dropout draws differ between the frameworks: compare training mode without it.
    modes = [("eval", False)]
    if not any(spec.kind == "dropout" for spec in specs):
        modes.append(("train", True))
    for mode, train in modes:
        want = np.asarray(ours(x, train=train))
        theirs.train(train)
        with torch.no_grad():
            got = theirs(x_torch).numpy()
        result[f"{mode}_max_abs_diff"] = float(np.max(np.abs(want - got)))
        result[f"{mode}_max_abs_logit"] = float(np.max(np.abs(want)))
        result[f"{mode}_allclose"] = bool(np.allclose(got, want, rtol=RTOL, atol=ATOL))
    result["params_equal"] = (
        result["params_summary"] == result["params_ours"] == result["params_torch"]
    )
    return result


def main() -> None:
    # Defined here, not on import: the benchmark and the tests import `check`.
    names = flags.DEFINE_list("models", ["resnet20", "plain"], "Model presets to check.")
    flags.FLAGS(sys.argv)
    print(json.dumps([check(name) for name in names.value]))


if __name__ == "__main__":
    main()
