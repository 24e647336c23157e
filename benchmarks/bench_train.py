"""(c) One full train step (forward, backward, optimizer) per architecture, interleaved.

    python -m benchmarks.bench_train                       # configs/default, dense, moe, pkm
    python -m benchmarks.bench_train --configs default,peer_1m --repeats 5
    python -m benchmarks.bench_train --table-optimizers    # + the PEER config with each table optimizer

Uses peer_jax.train.Trainer with synthetic token batches (no data pipeline, no logging),
so this is the model's share of a step. `--loop` adds, interleaved with the bare step of
configs/default.py, the same step driven the way train_and_evaluate drives it: batches
from the real data pipeline, metrics fetched one step late and checked, logged every
log_every steps (JSONL, TensorBoard, console), checkpoints saved every checkpoint.every
steps. Each call of either case runs log_every steps; the difference is the time spent
outside the model.
"""

import argparse
import importlib
import tempfile

import io

import jax
import numpy as np

from benchmarks import common
from peer_jax import train
from peer_jax.checkpoint import Checkpointer
from peer_jax.data import global_batch, make_train_iterator
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
  """`log_every` steps per call, driven as train_and_evaluate drives them (minus eval)."""

  def __init__(self, cfg, workdir):
    self.cfg = cfg
    tokenizer = train.prepare(cfg)
    self.data = make_train_iterator(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                                    seq_len=cfg.train.seq_len, seed=cfg.seed)
    self.trainer = train.Trainer.build(cfg)
    self.state = self.trainer.init_state()
    self.ckpt = Checkpointer(workdir, cfg.checkpoint)
    self.writer = MetricWriter(workdir)
    self.progress = Progress(10**9, stream=io.StringIO())
    self.step, self.pending = 0, None
    self.steps = cfg.train.log_every
    self.tokens = cfg.train.batch_size * cfg.train.seq_len * self.steps

  def _finish(self, step, device_metrics):
    metrics = jax.device_get(device_metrics)
    train.check_finite(step, metrics)
    if step % self.cfg.train.log_every == 0:
      scalars = {k: float(v) for k, v in metrics.items()}
      self.writer.write(step, scalars)
      self.progress.print(step, scalars)

  def __call__(self):
    with self.trainer.mesh:
      for _ in range(self.steps):
        self.step += 1
        batch = global_batch(next(self.data), self.trainer.batch_sharding)
        self.state, metrics = self.trainer.train_step(self.state, batch)
        if self.pending is not None:
          self._finish(*self.pending)
        self.pending = (self.step, metrics)
        if self.ckpt.should_save(self.step):
          jax.block_until_ready(self.state.step)
          self.ckpt.save(self.step, self.state, self.data.get_state(), {})
    return self.state.step  # timed to the end of the last step, as the bare case

  def close(self):
    self.ckpt.close()
    self.writer.close()


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="default,dense,moe,pkm")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--loop", action="store_true",
                  help="also time configs/default.py's real host loop against its bare steps, "
                       "interleaved (the share of time spent outside the model)")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  out = [f"Machine: {common.machine()}", f"Command: `{common.command()}`", ""]
  cases, extra, steppers = {}, {}, {}
  for name in a.configs.split(","):
    name, _, opts = name.partition(":")
    overrides = [tuple(o.split("=", 1)) for o in opts.split("+") if o]
    overrides = [(k, type(load_config(name)[k.split(".")[0]][k.split(".", 1)[1]])(v))
                 for k, v in overrides]
    cfg = load_config(name, overrides)
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
    cfg = load_config("default")
    with tempfile.TemporaryDirectory() as wd:
      loop = HostLoop(cfg, wd)
      bare = Steps(Stepper(load_config("default")), loop.steps)
      pair = {"default: bare steps": bare, "default: host loop": loop}
      loop_times = common.interleaved(pair, repeats=a.repeats, warmup=1)
      loop.close()
    rows = common.timing_rows(loop_times)
    out.append(f"\nHost loop vs bare steps, configs/default.py, {loop.steps} steps per call "
               f"(data pipeline, metrics one step late, logging every {cfg.train.log_every}, "
               f"checkpoint every {cfg.checkpoint.every} steps; no eval):\n")
    out.append(common.table(rows, ["case", "median ms", "min ms", "IQR ms", "n"]))
    med = {c: common.summary(t)["median"] for c, t in loop_times.items()}
    share = max(0.0, 1 - med["default: bare steps"] / med["default: host loop"])
    out.append(f"\nOutside the model: {share * 100:.1f}% of the host loop's time "
               f"(median over calls; target: at most 25%).")
  common.report(out, a.out)


if __name__ == "__main__":
  main()
