"""Optimizers and learning-rate schedules from the config, all built from optax pieces."""

import jax
import ml_collections
import optax


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Returns the learning-rate schedule: linear warm-up, then constant, cosine or step decay.

    The step schedule's decay points are `schedule.decay_fractions` of `training.num_steps`.
    """
    s, peak, total = config.schedule, config.optimizer.learning_rate, config.training.num_steps
    warmup = s.warmup_steps
    if s.name == "constant":
        main = optax.constant_schedule(peak)
    elif s.name == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(total - warmup, 1))
    elif s.name == "step":
        bounds = [round(f * total) for f in s.decay_fractions]
        # Boundaries count from the start of training, like the papers' iteration numbers.
        main = optax.piecewise_constant_schedule(
            peak, {max(b - warmup, 1): s.decay_factor for b in bounds}
        )
    else:
        raise ValueError(f"unknown schedule {s.name!r}")  # configs.schema rejects it first
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _decay_mask(params, decay_all: bool):
    """True for the leaves weight decay applies to: kernels (ndim > 1), not biases or BN."""
    return jax.tree.map(lambda p: decay_all or p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Returns the optax optimizer the config names, with clipping and weight decay.

    Weight decay follows the papers: for sgd and adam it is L2 regularisation added to the
    gradient before momentum (lambda * w); for adamw it is decoupled (Loshchilov & Hutter).
    """
    o = config.optimizer
    lr = make_schedule(config)
    mask = lambda params: _decay_mask(params, o.decay_all_params)
    chain = []
    if o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.name == "adamw":
        chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask))
        return optax.chain(*chain)
    if o.weight_decay > 0:
        chain.append(optax.add_decayed_weights(o.weight_decay, mask=mask))
    if o.name == "sgd":
        chain.append(optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov))
    elif o.name == "adam":
        chain.append(optax.adam(lr, b1=o.b1, b2=o.b2))
    else:
        raise ValueError(f"unknown optimizer {o.name!r}")  # configs.schema rejects it first
    return optax.chain(*chain)


def minimize_lbfgs(loss, params, *, tolerance, iterations: int):
    """Minimises the smooth `loss(params)` from `params` with optax's L-BFGS (its zoom line
    search) until the gradient's norm is below `tolerance` or after `iterations` steps; returns
    (params, steps run). Jit-able (a while_loop): the linear probes and R-CNN's SVMs fit
    through it."""
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    def going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        gradient = optax.tree.norm(optax.tree.get(state, "grad"))
        return (count == 0) | ((count < iterations) & (gradient >= tolerance))

    params, state = jax.lax.while_loop(going, step, (params, solver.init(params)))
    return params, optax.tree.get(state, "count")
