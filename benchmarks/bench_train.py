"""(c) One full train step (forward, backward, optimizer) per architecture, interleaved.

    python -m benchmarks.bench_train                       # configs/default, dense, moe, pkm
    python -m benchmarks.bench_train --configs default,peer_1m --repeats 5
    python -m benchmarks.bench_train --table-optimizers    # + the PEER config with each table optimizer

Uses peer_jax.train.Trainer with synthetic token batches (no data pipeline, no logging),
so this is the model's share of a step; `--loop` also times the real host loop
(train_and_evaluate) of configs/default.py to get the share spent outside the model.
"""

import argparse
import importlib
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from peer_jax import train


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


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="default,dense,moe,pkm")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--loop", action="store_true",
                  help="also time train_and_evaluate on configs/default.py (share outside the model)")
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
    cfg = load_config("default")
    steps = 40
    cfg.train.steps, cfg.train.eval_every, cfg.train.log_every = steps, 0, 10
    cfg.checkpoint.every = 0
    pure = common.summary(times["default"])["median"] if "default" in times else None
    with tempfile.TemporaryDirectory() as wd:
      t0 = time.perf_counter()
      last = train.train_and_evaluate(cfg, wd)
      wall = time.perf_counter() - t0
    tps = last.get("train/tokens_per_sec")
    tokens = cfg.train.batch_size * cfg.train.seq_len
    if pure and tps:
      loop_step = tokens / tps
      share = max(0.0, 1 - pure / loop_step)
      out.append(f"\nHost loop (train_and_evaluate, configs/default.py, {steps} steps, no eval/"
                 f"checkpoint): {tps:.0f} tokens/s in the last logged interval = "
                 f"{loop_step * 1e3:.1f} ms/step vs {pure * 1e3:.1f} ms for the bare step: "
                 f"{share * 100:.0f}% outside the model (wall incl. compile {wall:.0f} s).")
  common.report(out, a.out)


if __name__ == "__main__":
  main()
