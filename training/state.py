"""The train state: created, described without computing it, and turned back into a model.

The state is a dict pytree {step, params, batch_stats, other, opt_state, rng}, and with
training.ema_decay > 0 also ema = {params, batch_stats} (their moving average, which every
evaluation uses), replicated on every device of the mesh (data parallelism); `graphdef` is the
model's static structure.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
import models
from training import optim

# The initialisation program (a random draw per parameter) runs once, in milliseconds, but
# compiling it with LLVM's optimisations took 6.0 s for ResNet-56 on a 2-core CPU; without
# them 2.3 s (benchmarks/README.md). Initial values can differ from an optimised build's in the
# last bit; they are the same from run to run and on every host.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_program(config: ml_collections.ConfigDict, mesh, make_model):
    """Returns (init, structure): the jit-compiled program building the train state of the
    model `make_model(rngs)` returns (the config's optimizer, seed and random key) on `mesh`,
    replicated; tracing it records the model's graphdef (static structure) in
    structure['graphdef']. Classification and detection both build their state with it."""
    tx = optim.make_optimizer(config)
    structure = {}

    def init():
        model = make_model(nnx.Rngs(config.seed))
        graphdef, params, batch_stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        structure["graphdef"] = graphdef
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": batch_stats,
            "other": other,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(config.seed)),
        }
        if config.training.get("ema_decay", 0.0) > 0:
            state["ema"] = {"params": params, "batch_stats": batch_stats}
        return state

    return jax.jit(init, out_shardings=NamedSharding(mesh, P())), structure


def _init_program(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh):
    """init_program for the classifier `config.model` on images of `info`."""
    return init_program(
        config,
        mesh,
        lambda rngs: models.create_model(
            config.model, info.image_shape, info.num_classes, rngs=rngs
        ),
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    mesh,
    *,
    compiler_options: dict[str, Any] | None = None,
):
    """Returns (graphdef, state): the model's static structure and its replicated arrays.

    The state is built inside jit so that a multi-host run creates it on all hosts without
    transfers; the model is traced once. `compiler_options` for the init program default to
    INIT_COMPILER_OPTIONS (a benchmark passes {} to measure the optimised build).
    """
    init, structure = _init_program(config, info, mesh)
    options = INIT_COMPILER_OPTIONS if compiler_options is None else compiler_options
    state = init.lower().compile(compiler_options=options)()
    return structure["graphdef"], state


def abstract_train_state(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh):
    """Returns (graphdef, abstract state): create_train_state's structure, as ShapeDtypeStructs
    with its shardings, without compiling or computing anything (e.g. a restore target)."""
    init, structure = _init_program(config, info, mesh)
    abstract = jax.eval_shape(init)  # carries init's out_shardings: replicated over `mesh`
    return structure["graphdef"], abstract


def abstract_like(state):
    """Returns a pytree of jax.ShapeDtypeStruct (with shardings) describing `state`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )


def merge_model(graphdef, state) -> nnx.Module:
    """Returns the model whose arrays are those of `state` (params, batch_stats, other): the
    moving average's params and batch_stats when the state keeps one (training.ema_decay)."""
    weights = state.get("ema", state)
    return nnx.merge(graphdef, weights["params"], weights["batch_stats"], state["other"])


def update_ema(ema, params, batch_stats, step, decay: float):
    """Returns the moving average `ema` ({params, batch_stats}) moved towards this step's
    values: optax.incremental_update with the decay min(decay, (1 + step) / (10 + step))."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    new = {"params": params, "batch_stats": batch_stats}
    return optax.incremental_update(new, ema, step_size=1.0 - rate)


def predict(state, images: jax.Array, *, graphdef, config, mean, std) -> jax.Array:
    """Returns the float32 logits [B, classes] of uint8 images [B, H, W, C] in eval mode."""
    x = data.normalize(images, mean, std, jnp.dtype(config.model.dtype))
    return merge_model(graphdef, state)(x, train=False)
