"""The LR schedules take their run-specific numbers as step inputs (peer_jax/schedules.py):
same values as optax's schedules and a float64 reference, traced or not, and one compiled
train step for runs that differ only in LR, warmup or length."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import tiny_config
from peer_jax import schedules
from peer_jax.train import Trainer


def _tcfg(lr=0.3, warmup=10, steps=100, min_ratio=0.1, table_scale=4.0, table_kind="follow"):
  t = tiny_config().train
  t.learning_rate, t.warmup_steps, t.steps, t.min_lr_ratio = lr, warmup, steps, min_ratio
  t.table_lr_scale, t.table_lr_schedule = table_scale, table_kind
  return t


def _reference(step, lr, warmup, steps, alpha):
  """float64, from the definition: peak·(s+1)/warmup while warming up, then cosine."""
  warmup = min(warmup, steps)
  if step < warmup:
    return lr * (step + 1) / warmup if warmup > 1 else lr
  decay = max(steps - warmup, 1)
  c = min(step - warmup, decay)
  return lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * c / decay)) + alpha)


def _optax(lr, warmup, steps, alpha):
  warmup = min(warmup, steps)
  cosine = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=alpha)
  if warmup == 0:
    return cosine
  return optax.join_schedules(
      [optax.linear_schedule(lr / warmup, lr, max(warmup - 1, 1)), cosine], [warmup])


@pytest.mark.parametrize("lr,warmup,steps", [(0.3, 10, 100), (2.4e-2, 28, 560), (1e-3, 0, 50),
                                             (0.1, 1, 7), (0.1, 50, 20), (0.5, 3, 1)])
def test_schedule_matches_optax_and_the_definition(lr, warmup, steps):
  t = _tcfg(lr, warmup, steps, min_ratio=0.1)
  ours = schedules.learning_rate_schedule(t)
  traced = jax.jit(lambda s, x: schedules.learning_rate_schedule(t, x)(s))
  inputs = schedules.schedule_inputs(t)
  ref = _optax(lr, warmup, steps, 0.1)
  for step in sorted({0, 1, 2, warmup - 1, warmup, warmup + 1, steps // 2, steps - 1, steps,
                      steps + 5} - {-1}):
    want = _reference(step, lr, warmup, steps, 0.1)
    np.testing.assert_allclose(float(ours(step)), want, rtol=2e-6)
    np.testing.assert_allclose(float(traced(jnp.int32(step), inputs)), want, rtol=2e-6)
    np.testing.assert_allclose(float(ours(step)), float(ref(step)), rtol=2e-6)


@pytest.mark.parametrize("kind", schedules.TABLE_LR_SCHEDULES)
def test_table_schedules_take_the_inputs(kind):
  t = _tcfg(lr=0.2, warmup=5, steps=40, table_kind=kind)
  other = _tcfg(lr=0.05, warmup=2, steps=400, table_kind=kind)
  base = schedules.learning_rate_schedule(t)
  want = schedules.table_learning_rate_schedule(t, base)
  # `other`'s config with t's numbers as inputs is t's schedule: nothing is read from the
  # config that the inputs replace.
  x = schedules.schedule_inputs(t)
  got = jax.jit(lambda s, x: schedules.table_learning_rate_schedule(
      other, schedules.learning_rate_schedule(other, x), x)(s))
  for step in (0, 3, 5, 20, 39, 60):
    np.testing.assert_allclose(float(got(jnp.int32(step), x)), float(want(step)), rtol=2e-6)
  if kind == "decay_to_base":  # 4x the base at the start, 1x at the end
    assert float(want(5)) == pytest.approx(float(base(5)) * (4 - 3 * 5 / 40), rel=1e-5)
    assert float(want(40)) == pytest.approx(float(base(40)), rel=1e-5)


def _lowered_text(**train):
  cfg = tiny_config()
  for k, v in train.items():
    setattr(cfg.train, k, v)
  trainer = Trainer.build(cfg)
  state = trainer.abstract_state
  batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.int32)
           for k in ("inputs", "targets", "positions", "segment_ids")}
  batch["mask"] = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.float32)
  return trainer.train_step.lower(state, batch).as_text()


def test_runs_differing_in_lr_warmup_and_length_share_one_program():
  a = _lowered_text(learning_rate=1e-3, warmup_steps=2, steps=10)
  b = _lowered_text(learning_rate=3e-2, warmup_steps=7, steps=999)
  assert a == b
  # ... but not runs that differ in what the program computes: the comparison can fail.
  assert _lowered_text(learning_rate=1e-3, warmup_steps=2, steps=10, min_lr_ratio=0.5) != a
