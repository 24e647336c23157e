"""(c) One full train step (forward, backward, optimizer) per architecture, interleaved.

    python -m benchmarks.bench_train                       # configs/default, dense, moe, pkm
    python -m benchmarks.bench_train --configs default,peer_1m --repeats 5
    python -m benchmarks.bench_train --table-optimizers    # + the PEER config with each table optimizer
    python -m benchmarks.bench_train --loop [--loop-config default:train.eval_every=0]

Uses peer_jax.train.Trainer with synthetic token batches (no data pipeline, no logging),
so this is the model's share of a step. `--loop` adds, interleaved with the bare steps of
the same config, the training run's own host loop (peer_jax.loop.run_steps with the hooks
train.run_hooks builds, as train_and_evaluate runs it): batches from the real data
pipeline, metrics fetched one step late and checked, logged every log_every steps (JSONL,
TensorBoard, console), evaluation every train.eval_every and checkpoints every
checkpoint.every steps. Switch hooks off in the config (`train.eval_every=0`,
`checkpoint.every=0`). Each call of either case runs log_every steps; the difference is
the time spent outside the model.
"""

import argparse
import importlib
import io
import tempfile

import jax
import numpy as np

from benchmarks import common
from peer_jax import evaluate as evaluation
from peer_jax import train
from peer_jax.checkpoint import Checkpointer
from peer_jax.data import make_train_iterator
from peer_jax.metrics import MetricWriter, Progress


def load_config(name, overrides=()):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  for key, value in overrides:
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def parse_config(spec: str):
  """NAME[:KEY=VALUE+KEY=VALUE...] -> the config, values cast to the type of the default."""
  name, _, opts = spec.partition(":")
  overrides = [tuple(o.split("=", 1)) for o in opts.split("+") if o]
  overrides = [(k, _cast(load_config(name)[k.split(".")[0]][k.split(".", 1)[1]], v))
               for k, v in overrides]
  return load_config(name, overrides)


def _cast(default, text: str):
  if isinstance(default, bool):
    return text.lower() in ("1", "true", "yes")
  return type(default)(text)


def synthetic_batch(cfg, trainer, seed=0):
  rng = np.random.default_rng(seed)
  B, T = cfg.train.batch_size, cfg.train.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
  local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
           "segment_ids": np.ones((B, T), np.int32), "mask": np.ones((B, T), np.float32)}
  return {k: jax.device_put(v, trainer.batch_sharding(2)) for k, v in local.items()}


class Stepper:
  """Holds a train state and advances it one step per call (the state is donated)."""

  def __init__(self, cfg):
    self.trainer = train.Trainer.build(cfg)
    self.state = self.trainer.init_state()
    self.batch = synthetic_batch(cfg, self.trainer)
    compiled = self.trainer.train_step.lower(self.state, self.batch).compile()
    m = compiled.memory_analysis()
    self.memory = {"temp": m.temp_size_in_bytes / 2**20, "args": m.argument_size_in_bytes / 2**20}
    self.params = sum(x.size for x in jax.tree.leaves(self.state.params))
    self.tokens = cfg.train.batch_size * cfg.train.seq_len

  def __call__(self):
    with self.trainer.mesh:
      self.state, metrics = self.trainer.train_step(self.state, self.batch)
    return metrics


class Steps:
  """`steps` bare train steps per call (the model's time), for comparison with HostLoop."""

  def __init__(self, stepper, steps):
    self.stepper, self.steps, self.tokens = stepper, steps, stepper.tokens * steps

  def __call__(self):
    for _ in range(self.steps):
      metrics = self.stepper()
    return jax.device_get(metrics)


class HostLoop:
  """`log_every` steps per call of a training run's own loop (train.run_steps: loop.run_steps
  with train.run_hooks), as train_and_evaluate sets it up, from a fresh init."""

  def __init__(self, cfg, workdir):
    self.cfg = cfg
    tokenizer = train.prepare(cfg)
    self.data = make_train_iterator(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                                    seq_len=cfg.train.seq_len, seed=cfg.seed)
    self.trainer = train.Trainer.build(cfg)
    self.state = self.trainer.init_state()
    eval_sets = {name: s.on_device(self.trainer.batch_sharding)
                 for name, s in evaluation.load_eval_sets(cfg, tokenizer).items()}
    self.ckpt = Checkpointer(workdir, cfg.checkpoint)
    self.writer = MetricWriter(workdir)
    self.hooks = train.run_hooks(cfg, self.trainer, self.ckpt, self.data, eval_sets)
    self.log = train.run_logging(cfg, self.writer, Progress(cfg.train.steps, stream=io.StringIO()))
    self.step = 0
    self.steps = cfg.train.log_every
    self.tokens = cfg.train.batch_size * cfg.train.seq_len * self.steps

  def __call__(self):
    result = train.run_steps(self.cfg, self.trainer, self.state, self.data, start_step=self.step,
                             until=self.step + self.steps, hooks=self.hooks, log=self.log)
    self.state, self.step = result.state, result.step
    return self.state.step  # timed to the end of the last step, as the bare case

  def describe(self) -> str:
    return ", ".join(h.name + f" every {h.every}" for h in self.hooks) or "no hooks"

  def close(self):
    self.ckpt.close()
    self.writer.close()


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="default,dense,moe,pkm")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--loop", action="store_true",
                  help="also time the training loop of --loop-config against its bare steps, "
                       "interleaved (the share of time spent outside the model)")
  ap.add_argument("--loop-config", default="default",
                  help="NAME[:KEY=VALUE+...] for --loop, e.g. default:train.eval_every=0 to "
                       "switch evaluation off (checkpoint.every=0: no periodic saves)")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  out = [f"Machine: {common.machine()}", f"Command: `{common.command()}`", ""]
  cases, extra, steppers = {}, {}, {}
  for name in a.configs.split(","):
    name, _, opts = name.partition(":")
    cfg = parse_config(name + ":" + opts)
    s = steppers[name + (":" + opts if opts else "")] = Stepper(cfg)
    label = name + (f" ({opts})" if opts else "")
    cases[label] = s
    extra[label] = {"params": f"{s.params / 1e6:.1f}M", "tokens": s.tokens,
                    "XLA temp MiB": f"{s.memory['temp']:.0f}",
                    "state MiB": f"{s.memory['args']:.0f}"}
  times = common.interleaved(cases, repeats=a.repeats, warmup=2)
  rows = common.timing_rows(times, extra=extra)
  for row in rows:
    med = common.summary(times[row["case"]])["median"]
    row["tokens/s"] = f"{cases[row['case']].tokens / med:.0f}"
  out.append(common.table(rows, ["case", "median ms", "min ms", "IQR ms", "n", "tokens/s",
                                 "params", "XLA temp MiB", "state MiB"]))

  if a.loop:
    # Interleaved with the bare steps of the same config: the host loop's extra time.
    cfg = parse_config(a.loop_config)
    label = a.loop_config
    with tempfile.TemporaryDirectory() as wd:
      loop = HostLoop(cfg, wd)
      bare = Steps(Stepper(parse_config(a.loop_config)), loop.steps)
      pair = {f"{label}: bare steps": bare, f"{label}: host loop": loop}
      loop_times = common.interleaved(pair, repeats=a.repeats, warmup=1)
      loop.close()
    rows = common.timing_rows(loop_times)
    out.append(f"\nHost loop vs bare steps, {label}, {loop.steps} steps per call (data "
               f"pipeline, metrics one step late, logging every {cfg.train.log_every}; hooks: "
               f"{loop.describe()}):\n")
    out.append(common.table(rows, ["case", "median ms", "min ms", "IQR ms", "n"]))
    med = {c: common.summary(t)["median"] for c, t in loop_times.items()}
    share = max(0.0, 1 - med[f"{label}: bare steps"] / med[f"{label}: host loop"])
    out.append(f"\nOutside the model: {share * 100:.1f}% of the host loop's time "
               f"(median over calls; target: at most 25%).")
  common.report(out, a.out)


if __name__ == "__main__":
  main()
