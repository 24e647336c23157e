#!/usr/bin/env python
"""Evaluate the latest (or a given) checkpoint of a workdir on any number of eval sets.

  python scripts/evaluate.py --workdir=DIR --data=PATH [--data=PATH ...] [--task=lm|lambada]
      [--step=N] [--expert_histogram=PNG]

PATH is a source as in `data.eval_paths` (docs/data.md): a `.txt` file (documents per line,
or per `--text_format`), a `.jsonl` file with a `text` field, a prepared dataset directory or
`tfds:NAME[SPLIT]`, optionally named `NAME=PATH`. Prints one JSON object per data set to
stdout (`data`, `tokens`, `loss`, `ppl`, `bits_per_byte`, `accuracy` for lambada, expert
usage/unevenness per PEER/PKM layer) and appends the same lines to DIR/eval_results.jsonl.
See docs/evaluation.md.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a run (holds config.json and "
                               "checkpoints/).")
_DATA = flags.DEFINE_multi_string("data", None, "Eval data: a file, dataset directory or "
                                  "tfds:NAME[SPLIT], optionally NAME=PATH; repeat for more.")
_TASK = flags.DEFINE_enum("task", "lm", ["lm", "lambada"], "lm: loss/ppl/bits per byte; "
                          "lambada: final-word accuracy and its perplexity.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_HISTOGRAM = flags.DEFINE_string("expert_histogram", None, "Write a PNG of the expert load "
                                 "distribution of every PEER/PKM layer to this path.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per batch (default: train.batch_size).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "Evaluate at most this many batches "
                                    "per set (default 0: all of it).")
_TEXT_FORMAT = flags.DEFINE_enum("text_format", None, ["lines", "paragraphs", "jsonl"],
                                 "Documents of .txt files (default: data.text_format of the run).")
flags.mark_flags_as_required(["workdir", "data"])


class UsageError(ValueError):
  pass


def _config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise UsageError(f"--workdir: {workdir} is not a directory")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except OSError as e:
    raise UsageError(f"--workdir: cannot read {path} ({e.strerror or e}); is {workdir} the "
                     f"workdir of a peer_jax run?") from None
  except json.JSONDecodeError as e:
    raise UsageError(f"--workdir: {path} is not valid JSON ({e.msg})") from None
  cfg = ml_collections.ConfigDict(cfg)
  cfg.sharding.rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in cfg.sharding.rules)
  return cfg


def _precheck(workdir: str, histogram: str | None, batch_size: int = 0,
              max_batches: int = 0, step: int | None = None) -> None:
  """Checks that need no JAX: a wrong flag, workdir or output path fails at once."""
  if batch_size < 0:
    raise UsageError(f"--batch_size: must be >= 1 (or 0 for train.batch_size), got {batch_size}")
  if max_batches < 0:
    raise UsageError(f"--max_batches: must be >= 1 (or 0 for all of each set), got {max_batches}")
  if step is not None and step < 0:
    raise UsageError(f"--step: must be a checkpoint step >= 0, got {step}")
  _config(workdir)
  if histogram:
    parent = os.path.dirname(os.path.abspath(histogram))
    if os.path.isdir(histogram):
      raise UsageError(f"--expert_histogram: {histogram} is a directory; give a file name "
                       "(e.g. experts.png)")
    probe = parent
    while probe and not os.path.exists(probe):
      probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
      raise UsageError(f"--expert_histogram: {probe} is a file, not a directory")
    if not os.path.isdir(parent):
      raise UsageError(f"--expert_histogram: directory {os.path.dirname(histogram)} does not "
                       "exist")
    if not os.access(parent, os.W_OK):
      raise UsageError(f"--expert_histogram: directory {parent} is not writable")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoints) or not os.listdir(checkpoints):
    raise _NoCheckpoint(f"no checkpoints in {os.path.abspath(checkpoints)}")


class _NoCheckpoint(Exception):
  pass


def evaluate(workdir: str, data: list[str], task: str, step: int | None, histogram: str | None,
             batch_size: int, max_batches: int, text_format: str | None) -> list[dict]:
  import jax
  from peer_jax import evaluate as ev
  from peer_jax import run
  from peer_jax.data import DataError, Tokenizer
  from peer_jax.data.sources import check_sources
  from peer_jax.sharding import data_parallel_size

  cfg = _config(workdir)
  if histogram and not ev.expert_layers(cfg.model):
    raise UsageError(f"--expert_histogram: model.ffw={cfg.model.ffw} has no expert-retrieving layer")
  if text_format:
    cfg.data.text_format = text_format
  for path in data:  # cheap existence checks first: a bad path fails before anything is built
    if len(check_sources(path, default_split="validation")) != 1:
      raise DataError(f"--data={path}: one source per --data, not a mixture")
  tokenizer = Tokenizer(cfg.data.tokenizer, add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos)

  # The model without an optimizer, on the run's mesh if it fits here, else data parallel.
  model = run.build(cfg)
  dp = data_parallel_size(tuple(model.mesh.devices.shape))
  rows = batch_size or cfg.train.batch_size
  rows = -(-rows // dp) * dp  # every data-parallel device gets rows (padding rows are free)
  # Data before the checkpoint: a bad path fails in seconds.
  sets = [ev.load_eval_set(cfg.data, tokenizer, path, task=task, batch_size=rows,
                           seq_len=cfg.train.seq_len, max_batches=max_batches or None)
          for path in data]
  names = [s.name for s in sets]
  for i, s in enumerate(sets):  # two files called valid.txt: valid, valid_2
    if names[:i].count(s.name):
      s.name = f"{s.name}_{names[:i].count(s.name) + 1}"

  # Parameters only, read-only: evaluation never moves, deletes or writes a checkpoint.
  restored_step, state = run.restore(workdir, model, step)

  evaluator = ev.Evaluator(model)
  results, routing = [], {}
  for s in sets:
    t0 = time.perf_counter()
    metrics, z = evaluator.evaluate(state, s.on_device(model.batch_sharding),
                                    return_routing=True)
    record = {"data": s.data, "name": s.name, "task": s.task, "step": restored_step,
              **{k: (int(v) if k in ("tokens", "examples") else v) for k, v in metrics.items()},
              "seconds": round(time.perf_counter() - t0, 3)}
    results.append(record)
    routing[s.name] = z
    if jax.process_index() == 0:
      print(json.dumps(_jsonable(record)), flush=True)
      with open(os.path.join(workdir, "eval_results.jsonl"), "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")
  if histogram and jax.process_index() == 0:
    ev.write_expert_histogram(histogram, routing)
    print(f"expert histogram written to {histogram}", file=sys.stderr)
  return results


def _jsonable(record: dict) -> dict:
  import math
  return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
          for k, v in record.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  workdir = _resolve(_WORKDIR.value)
  histogram = _resolve(_HISTOGRAM.value) if _HISTOGRAM.value else None
  data = [_resolve_source(d) for d in _DATA.value]
  try:
    _precheck(workdir, histogram, _BATCH.value, _MAX_BATCHES.value, _STEP.value)
  except UsageError as e:
    print(f"error: command line: {e}", file=sys.stderr)
    return 2
  except _NoCheckpoint as e:
    print(f"error: checkpoint: {e}", file=sys.stderr)
    return 2
  from peer_jax.cli import exit_now, run_or_explain
  from peer_jax.evaluate import EvalError
  code = run_or_explain(
      lambda: evaluate(workdir, data, _TASK.value, _STEP.value, histogram,
                       _BATCH.value, _MAX_BATCHES.value, _TEXT_FORMAT.value),
      usage_errors=(UsageError, EvalError))
  if code:
    exit_now(code)
  return code


def _resolve(path: str) -> str:
  """Relative paths and ~ as the user typed them (URLs such as gs:// unchanged)."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _resolve_source(spec: str) -> str:
  """`~` in a --data source (NAME=PATH or PATH; tfds: and URLs unchanged)."""
  name, sep, path = spec.rpartition("=") if "=" in spec and not spec.startswith("tfds:") \
      else ("", "", spec)
  if path.startswith("~"):
    path = os.path.expanduser(path)
  return f"{name}{sep}{path}"


if __name__ == "__main__":
  from peer_jax.cli import run_main
  run_main(main)
