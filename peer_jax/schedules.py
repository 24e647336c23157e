"""Learning-rate schedules whose run-specific numbers are inputs of the train step.

A run's peak LR, warmup and length enter the jitted step as three scalars
(`schedule_inputs`), not as constants of its program. Runs that differ only in them (the
budgets, learning rates and warmups of an isoFLOP sweep, an LR sweep) then lower to the
same HLO and share one compiled step per model size: one compile, reused in process and
through the persistent compilation cache (docs/sweeps.md). The formulas are optax's
(`linear_schedule` joined to `cosine_decay_schedule`), written with jnp so that they take
traced values; tests/test_schedules.py compares them with optax and a float64 reference.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

Schedule = Callable[[object], object]
SCHEDULE_INPUTS = ("learning_rate", "warmup_steps", "steps")
TABLE_LR_SCHEDULES = ("follow", "decay_to_base", "constant")


def schedule_inputs(tcfg) -> dict[str, np.ndarray]:
  """The numbers of `tcfg` (train config) that the schedules take as step inputs."""
  return {"learning_rate": np.asarray(tcfg.learning_rate, np.float32),
          "warmup_steps": np.asarray(tcfg.warmup_steps, np.int32),
          "steps": np.asarray(tcfg.steps, np.int32)}


def _inputs(tcfg, inputs):
  x = schedule_inputs(tcfg) if inputs is None else inputs
  return (jnp.asarray(x["learning_rate"], jnp.float32), jnp.asarray(x["warmup_steps"], jnp.int32),
          jnp.asarray(x["steps"], jnp.int32))


def learning_rate_schedule(tcfg, inputs=None) -> Schedule:
  """Linear warmup to the peak LR, then cosine decay to `train.min_lr_ratio` of it.

  `inputs` (from `schedule_inputs`, possibly traced) replaces tcfg's learning_rate,
  warmup_steps and steps; `train.min_lr_ratio` stays a constant of the program."""
  alpha = float(tcfg.min_lr_ratio)

  def schedule(step):
    peak, warmup, steps = _inputs(tcfg, inputs)
    step = jnp.asarray(step)
    # A short run (e.g. --config.train.steps=10 on a config made for 1000) warms up for all of it.
    warmup = jnp.minimum(warmup, steps)
    decay = jnp.maximum(steps - warmup, 1).astype(jnp.float32)
    count = jnp.minimum((step - warmup).astype(jnp.float32), decay)
    cosine = peak * ((1 - alpha) * (0.5 * (1 + jnp.cos(jnp.pi * count / decay))) + alpha)
    # Step s < warmup gets peak·(s+1)/warmup: the first step already moves, the last reaches
    # the peak (optax.linear_schedule from peak/warmup to peak over warmup - 1 steps).
    ramp = jnp.maximum(warmup - 1, 1).astype(jnp.float32)
    frac = 1 - jnp.clip(step, 0, jnp.maximum(warmup - 1, 1)).astype(jnp.float32) / ramp
    start = peak / jnp.maximum(warmup, 1).astype(jnp.float32)
    linear = (start - peak) * frac + peak
    return jnp.where(step < warmup, linear, cosine)

  return schedule


def table_learning_rate_schedule(tcfg, base: Schedule, inputs=None) -> Schedule:
  """The expert tables' learning rate: `train.table_lr_scale` × a schedule.

  * follow: the base schedule (warmup, cosine) times the scale.
  * decay_to_base: the multiplier falls linearly from the scale to 1 over training, on top
    of the base schedule (UltraMem's table LR: 4x the base, decaying to 1x).
  * constant: warmup to learning_rate × scale, then flat (memory layers at a fixed LR,
    as in Meta's memory-layer code and XLM's PKM values).
  """
  scale, kind = float(tcfg.table_lr_scale), tcfg.get("table_lr_schedule", "follow")
  if kind == "follow":
    return lambda step: base(step) * scale
  if kind == "decay_to_base":
    def decay_to_base(step):
      _, _, steps = _inputs(tcfg, inputs)
      total = jnp.maximum(steps, 1).astype(jnp.float32)
      return base(step) * (scale + (1.0 - scale) * jnp.minimum(step / total, 1.0))
    return decay_to_base
  if kind == "constant":
    def constant(step):
      peak, warmup, steps = _inputs(tcfg, inputs)
      warmup = jnp.maximum(jnp.minimum(warmup, steps), 1).astype(jnp.float32)
      return peak * scale * jnp.minimum((step + 1) / warmup, 1.0)
    return constant
  raise ValueError(f"train.table_lr_schedule: unknown {kind!r}; expected one of "
                   f"{TABLE_LR_SCHEDULES}")
