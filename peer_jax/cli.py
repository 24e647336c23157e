"""Turning expected failures into one clear line and a non-zero exit code."""

import sys

from absl import flags

from peer_jax.config_validation import ConfigError


def run_or_explain(fn, usage_errors: tuple[type[Exception], ...] = ()) -> int:
  """Run fn; a bad config, a missing file or divergence prints one line and exits non-zero.

  `usage_errors`: a script's own exception types that mean a bad command line.
  """
  from peer_jax.checkpoint import CheckpointError
  from peer_jax.data import DataError
  from peer_jax.train import TrainingDiverged
  try:
    fn()
  except usage_errors as e:
    print(f"error: command line: {e}", file=sys.stderr)
    return 2
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


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv):
  """absl flag parsing for our scripts: `--help` exits 0, and a bad flag or `--config.KEY`
  override is reported as one line with exit status 2 (absl would print a traceback or the
  whole usage text)."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)  # the help text was printed; asking for help is not an error
    raise e
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    cause = e.__cause__ if isinstance(e, flags.Error) and e.__cause__ else e
    text = str(cause).replace("\\n", " ").replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1]
    print(f"error: command line: {' '.join(text.split())}", file=sys.stderr)
    sys.exit(2)
