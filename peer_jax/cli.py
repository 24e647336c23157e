"""Turning expected failures into one clear line and a non-zero exit code."""

import sys

from peer_jax.config_validation import ConfigError


def run_or_explain(fn) -> int:
  """Run fn; a bad config, a missing file or divergence prints one line and exits non-zero."""
  from peer_jax.checkpoint import CheckpointError
  from peer_jax.data import DataError
  from peer_jax.train import TrainingDiverged
  try:
    fn()
  except ConfigError as e:
    print(f"error: config: {e}", file=sys.stderr)
    return 2
  except DataError as e:
    print(f"error: data: {e}", file=sys.stderr)
    return 2
  except CheckpointError as e:
    print(f"error: checkpoint: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0
