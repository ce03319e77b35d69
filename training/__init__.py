"""The training library: everything train.py, eval, the benchmarks and the tests share.

- `setup`: the one set-up sequence (config checked -> devices -> data -> state -> compiled
  steps), for training (a workdir, resumed), evaluation (a chosen checkpoint) or a fresh state;
  its pieces (`with_workdir`, `open_checkpoints`, `initial_state`) also set up detection runs.
- `state`: the train state (created, abstract, merged back into a model, `predict`).
- `steps`: the jit-compiled train and eval steps.
- `loop`: `train_and_evaluate` and its bookkeeping (`LoopRecord`, `itstime`), for any run
  with the task members its docstring lists (classification's Setup, detection's Run).
- `workdir`: the workdir checked against its config and its static files.
- `checkpoint` (Orbax), `metrics` (metrics.jsonl, TensorBoard, progress), `optim` (optax),
  `runtime` (XLA flags, compilation cache, jax.distributed, the mesh, the environment).
"""
