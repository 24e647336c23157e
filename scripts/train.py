#!/usr/bin/env python
"""Train a language model from a config file.

  python scripts/train.py --config=configs/default.py --workdir=runs/default \\
      [--config.train.steps=100 ...]

Writes DIR/metrics.jsonl, TensorBoard event files in DIR/tensorboard and DIR/config.json.
"""

import os
import signal
import sys


def _early_sigterm(signum, frame):
  """A SIGTERM before training has installed its own handler (imports, config checks): the
  run stops cleanly at the first safe point instead of dying mid-start."""
  _early_sigterm.peer_jax_requested = True


_early_sigterm.peer_jax_requested = False
signal.signal(signal.SIGTERM, _early_sigterm)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard logs and "
                               "checkpoints; training resumes from it if it holds a run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator "
    "(with --num_processes and --process_id). Omit on TPU pods and under SLURM: detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # keep the console to progress lines and errors
  if _early_sigterm.peer_jax_requested:
    print("stopped by SIGTERM during start-up, before training; nothing new to save. Run the "
          "same command again to resume.", flush=True)
    return 0
  if not (_WORKDIR.value or "").strip():
    print("error: command line: --workdir: must name a directory (it is empty)",
          file=sys.stderr)
    return 2
  from peer_jax import distributed  # before anything touches a device
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f"error: command line: {e}", file=sys.stderr)
    return 2
  from peer_jax.cli import run_or_explain
  from peer_jax.train import train_and_evaluate
  try:
    config = _CONFIG.value
    config.get("model")  # forces the lazy load, which raises a stored load error
  except OSError as e:  # ml_collections loads the file lazily and keeps the error for later
    missing = flags.FLAGS["config"].config_filename
    print(f"error: command line: --config: cannot load config file {missing} "
          f"({str(e).splitlines()[-1].strip()})", file=sys.stderr)
    return 2
  from peer_jax.cli import exit_now
  code = run_or_explain(lambda: train_and_evaluate(config, _WORKDIR.value))
  if code:
    exit_now(code)  # everything is settled; do not wait on library threads at shutdown
  return code


def run():
  from peer_jax.cli import run_main
  run_main(main)


if __name__ == "__main__":
  run()
