"""Trains a model from a config and writes everything to a workdir.

    python train.py --config=configs/builtin.py:resnet20 --workdir=runs/resnet20

Rerunning the same command resumes from the workdir's latest checkpoint. The work is done by
`training.loop.train_and_evaluate`; this program only parses the flags.
"""

from training import runtime

runtime.configure_jax()  # before JAX is imported: XLA flags and the compilation cache

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import schema  # noqa: E402
from errors import UserError  # noqa: E402
from training import loop  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/builtin.py:resnet20.")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")


def main(argv):
    runtime.quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None or not flags.FLAGS.workdir:
        raise app.UsageError("both --config and --workdir are required")
    try:
        results = loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except loop.Preempted as e:  # SIGTERM or Ctrl-C: the checkpoint is saved
        logging.warning("%s", e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the loop, or twice
        print(
            "error: interrupted (Ctrl-C) before a checkpoint was saved; rerun the same command "
            "to resume from the last one",
            file=sys.stderr,
        )
        sys.exit(130)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: results[k] for k in ("model", "test_accuracy", "params", "images_per_s")}))


if __name__ == "__main__":
    app.run(main, flags_parser=schema.parse_flags)
