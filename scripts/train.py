#!/usr/bin/env python
"""Train a language model from a config file.

  python scripts/train.py --config=configs/default.py --workdir=runs/default \\
      [--config.train.steps=100 ...]

Writes DIR/metrics.jsonl, TensorBoard event files in DIR/tensorboard and DIR/config.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard logs and "
                               "checkpoints; training resumes from it if it holds a run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # keep the console to progress lines and errors
  from peer_jax.cli import run_or_explain
  from peer_jax.train import train_and_evaluate
  return run_or_explain(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
