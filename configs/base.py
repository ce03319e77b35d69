"""Shared defaults of every experiment. Other config files change only what differs.

Every field is documented here once; `configs/schema.py` checks them before anything is built.
"""

import ml_collections

import models


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the base config; `arg` names a model preset (see `models.PRESETS`).

    Long on purpose: one field per line, each with its comment, is the config's documentation.
    """
    c = ml_collections.ConfigDict()
    # Free fields, checked only when used: dataset.data_dir (when the data is read), the
    # booleans (any value is valid), model fields a family does not use (see models/).
    c.seed = 0  # >= 0: initialisation, shuffling, augmentation and dropout all derive from it

    # --- data (data/) ---------------------------------------------------------------------
    c.dataset = ml_collections.ConfigDict()
    # builtin | cifar10 | cifar100 | fashion_mnist | mnist | svhn_cropped
    c.dataset.name = "builtin"
    # Where the data comes from: 'builtin' (generated), 'tfds' (prepared TFDS array_record),
    # 'files' (the official distribution files in `data_dir`), or 'auto' (builtin for the
    # builtin dataset, otherwise files when `data_dir` holds them, else TFDS).
    c.dataset.source = "auto"
    c.dataset.data_dir = ""  # TFDS data dir, or the folder of the offline files
    c.dataset.validation_size = 0  # images held out of the training split for model selection
    c.dataset.eval_split = "test"  # 'validation' | 'test': what the periodic evaluation uses
    c.dataset.builtin_train_size = 20_000
    c.dataset.builtin_test_size = 2_000
    c.dataset.builtin_image_size = 32  # side of the built-in images, in pixels (>= 8)
    # background clutter of the built-in images in [0, 1]: round(5 x clutter) distractor
    # rectangles and pixel noise of std 0.06 x clutter; the same objects at any value
    c.dataset.builtin_clutter = 1.0
    c.dataset.augment_crop_padding = 4  # random crop after zero padding; 0 turns it off
    c.dataset.augment_flip = True  # random horizontal flip
    # Hold the dataset on the devices, shuffle and cut each batch there (no per-step transfer;
    # the same batches as the host pipeline): auto (on for a GPU/TPU whose memory holds the
    # splits, off on the CPU) | on | off
    c.dataset.on_device = "auto"

    # --- model (models/) ------------------------------------------------------------------
    c.model = models.preset(arg or "pooled_max")

    # --- optimizer (optax) ------------------------------------------------------------------
    c.optimizer = ml_collections.ConfigDict()
    # The fast default is AdamW: it trains every family, with or without BatchNorm, from the
    # same settings. SGD at lr 0.05 (measured on the built-in data) kills the ReLUs of the
    # pooled ConvNet without BatchNorm in its first 50 steps. The papers' recipes
    # (configs/cifar10.py) use SGD with momentum, as the papers did.
    c.optimizer.name = "adamw"  # sgd | adam | adamw
    c.optimizer.learning_rate = 1e-3  # peak learning rate
    c.optimizer.momentum = 0.9  # sgd only; 0 for plain SGD
    c.optimizer.nesterov = True  # sgd only
    c.optimizer.b1 = 0.9  # adam/adamw
    c.optimizer.b2 = 0.999  # adam/adamw
    # L2 weight decay. sgd/adam: added to the gradient (the papers' "weight decay", i.e. L2
    # regularisation); adamw: decoupled. Applied to conv/dense kernels only unless
    # `decay_all_params`.
    c.optimizer.weight_decay = 1e-2
    c.optimizer.decay_all_params = False
    c.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 turns it off

    # --- learning-rate schedule ---------------------------------------------------------------
    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"  # constant | cosine | step
    c.schedule.warmup_steps = 0  # linear warm-up from 0 to the peak
    # step: multiply by `decay_factor` at each of these points, given as fractions of
    # training.num_steps in (0, 1) (0.5: half-way), so they move with the length of training
    c.schedule.decay_fractions = (0.5, 0.75)
    c.schedule.decay_factor = 0.1

    # --- training (train.py) ------------------------------------------------------------------
    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 128  # global batch: per-device batch x number of devices
    # a schedule.warmup_steps not shorter than this is capped at half of it (one warning line)
    c.training.num_steps = 1_500
    c.training.label_smoothing = 0.0
    # weight averaging: 0 off; else an exponential moving average of the parameters and the
    # BatchNorm statistics (decay per step, e.g. 0.999; while the step count t is small the
    # decay is min(ema_decay, (1 + t) / (10 + t)), as TensorFlow's ExponentialMovingAverage
    # with num_updates) is kept in the state, and every evaluation uses it (eval.py too)
    c.training.ema_decay = 0.0
    c.training.eval_every_steps = 500
    c.training.eval_batch_size = 500
    c.training.log_every_steps = 100
    c.training.checkpoint_every_steps = 500
    c.training.keep_checkpoints = 2  # latest K; the best by validation accuracy is kept apart
    c.training.on_nonfinite_loss = "stop"  # stop | skip (skip the update, count it)
    c.training.progress = "auto"  # auto (bar on a terminal) | bar | none

    # --- multi-host (jax.distributed) ---------------------------------------------------------
    c.distributed = ml_collections.ConfigDict()
    # auto: initialize when the environment names a cluster (SLURM, TPU pod, or the
    # JAX_COORDINATOR_ADDRESS variable); on: always; off: never.
    c.distributed.initialize = "auto"
    c.distributed.coordinator_address = ""  # host:port of process 0; '' from the cluster
    c.distributed.num_processes = 0  # 0: from the cluster
    c.distributed.process_id = -1  # -1: from the cluster
    # seconds to wait for every process to join; then the run ends with one line saying so
    c.distributed.initialization_timeout = 300
    return c
