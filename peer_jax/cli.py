"""Turning expected failures into one clear line and a non-zero exit code."""

import os
import sys

from absl import flags

from peer_jax.config_validation import ConfigError


EXIT_CODES = {
    0: "done (or stopped by SIGTERM, after saving: run the same command again to resume)",
    1: "an unexpected Python exception (a bug: please report it with the traceback)",
    2: "bad command line, config, data, checkpoint or workdir: the line names it",
    3: "training diverged (NaN or Inf); no non-finite state was checkpointed",
    4: "a write failed (checkpoint, metrics or config.json: disk full, permissions); "
       "everything written before is intact, rerun to resume",
    130: "interrupted with Ctrl-C (the checkpoint in flight is completed first)",
}


def run_or_explain(fn, usage_errors: tuple[type[Exception], ...] = ()) -> int:
  """Run fn; a bad config, a missing file, a write failure or divergence prints one line
  `error: <area>: ...` on stderr and returns its exit code (EXIT_CODES).

  `usage_errors`: a script's own exception types that mean a bad command line.
  """
  from peer_jax.checkpoint import CheckpointError
  from peer_jax.data import DataError
  from peer_jax.metrics import MetricsWriteError
  from peer_jax.loop import TrainingDiverged
  from peer_jax.workdir_lock import WorkdirError
  try:
    fn()
  except usage_errors as e:
    return explain("command line", e, 2)
  except ConfigError as e:
    return explain("config", e, 2)
  except DataError as e:
    return explain("data", e, 2)
  except CheckpointError as e:
    return explain("checkpoint", e, getattr(e, "exit_code", 2))
  except WorkdirError as e:
    return explain("workdir", e, getattr(e, "exit_code", 2))
  except MetricsWriteError as e:
    return explain("metrics", e, 4)
  except TrainingDiverged as e:
    return explain("training", e, 3)
  except KeyboardInterrupt as e:
    print(f"interrupted{': ' + one_line(e) if str(e) else ''}", file=sys.stderr, flush=True)
    return 130
  return 0


def one_line(e) -> str:
  return " ".join(str(e).split())


def explain(area: str, e, code: int) -> int:
  text = one_line(e)
  if text.startswith(f"{area}: "):
    text = text[len(area) + 2:]
  print(f"error: {area}: {text}", file=sys.stderr, flush=True)
  return code


def exit_now(code: int) -> None:
  """Exit with `code` at once, without waiting for library threads (a failed save's
  writers, prefetchers) that could hang the interpreter's shutdown. Call it only once
  everything that matters is settled (run_or_explain's fn has returned)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _config_file_args(argv) -> dict[str, str]:
  """{flag name: value} of the config-file flags on the command line (--config=PATH)."""
  out = {}
  for n, a in enumerate(argv[1:], 1):
    for name in CONFIG_FILE_FLAGS:
      if a.startswith(f"--{name}="):
        out[name] = a.split("=", 1)[1]
      elif a == f"--{name}" and n + 1 < len(argv):
        out[name] = argv[n + 1]
  return out


CONFIG_FILE_FLAGS = ("config",)


def _where(path: str, e: BaseException) -> str:
  """'FILE, line N' of the deepest frame of `e`'s traceback that is in the config file."""
  real = os.path.realpath(path)
  line = None
  if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == real:
    line = e.lineno
  tb = e.__traceback__
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == real:
      line = tb.tb_lineno
    tb = tb.tb_next
  return f"{path}, line {line}" if line else path


def load_config_file(name: str, spec: str):
  """Load --NAME=PATH[:ARGS] the way ml_collections does, but turn every failure (missing
  file, syntax error, failing import, no get_config, get_config raising) into one line
  naming the file and line. Returns the config."""
  import importlib.machinery
  import importlib.util
  path, _, args = spec.partition(":")
  flag = f"--{name}={spec}"
  if not os.path.isfile(path):
    raise UsageProblem(f"{flag}: cannot load config file {path} (no such file; config files "
                       "are in configs/, relative to the directory you run from)")
  try:
    # A fresh module object each time (load_module would reuse an earlier one's names).
    loader = importlib.machinery.SourceFileLoader(f"peer_jax_precheck_{name}", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
  except SyntaxError as e:
    raise UsageProblem(f"{flag}: syntax error in {_where(path, e)}: {e.msg}") from None
  except Exception as e:  # noqa: BLE001  (a failing import, any error at module level)
    raise UsageProblem(f"{flag}: {_where(path, e)}: {type(e).__name__}: "
                       f"{one_line(e)[:300]}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UsageProblem(f"{flag}: {path} defines no get_config() function")
  try:
    config = get_config(*([args] if args else []))
  except Exception as e:  # noqa: BLE001
    raise UsageProblem(f"{flag}: get_config() failed at {_where(path, e)}: "
                       f"{type(e).__name__}: {one_line(e)[:300]}") from None
  if not hasattr(config, "items"):
    raise UsageProblem(f"{flag}: get_config() in {path} returned {type(config).__name__}, "
                       "not a ConfigDict")
  return config


def _config_keys(node, prefix: str = "") -> list[str]:
  out = []
  for key, value in node.items():
    out.append(f"{prefix}{key}")
    if hasattr(value, "items") and not isinstance(value, (str, bytes)):
      out.extend(_config_keys(value, f"{prefix}{key}."))
  return out


def check_overrides(argv, name: str, config) -> None:
  """Every --NAME.KEY=VALUE names a key of the config; else one line with the nearest key."""
  import difflib
  keys = _config_keys(config)
  for a in argv[1:]:
    if not a.startswith(f"--{name}."):
      continue
    key = a[len(name) + 3:].split("=", 1)[0]
    if key in keys:
      continue
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    if parent and parent in keys and not hasattr(_lookup(config, parent), "items"):
      raise UsageProblem(f"--{name}.{key}: {parent} is a value, not a group of keys")
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise UsageProblem(f"--{name}.{key}: unknown config key {key}{hint}; the keys are in "
                       "docs/configuration.md (new keys cannot be added from the command line)")


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


class UsageProblem(ValueError):
  """A bad command line: one line, exit 2."""


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv):
  """absl flag parsing for our scripts: `--help` exits 0, and a bad flag or `--config.KEY`
  override is reported as one line with exit status 2 (absl would print a traceback or the
  whole usage text)."""
  if not any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
    try:
      for name, spec in _config_file_args(argv).items():
        check_overrides(argv, name, load_config_file(name, spec))
    except UsageProblem as e:
      print(f"error: command line: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
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


def run_main(main) -> None:
  """absl's app.run(main) with our flag parsing, and Ctrl-C at any point (imports, flag
  parsing, start-up) as one line and exit 130 instead of a traceback."""
  from absl import app
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    exit_now(130)
