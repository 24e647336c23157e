"""The host loop: one function drives a run's steps, for training and the benchmark alike.

`run_steps` dispatches step n, then finishes step n-1 (fetches its metrics, checks them,
logs them), so the host's work overlaps the device's. After each step it runs the hooks due
at it (evaluation and checkpoints are hooks; the caller decides which exist), reads the
preemption flag, and stops after the last step, on a preemption request (after the hooks
that run on a stop, e.g. the save) or with TrainingDiverged on a NaN or Inf.

Throughput is measured per logged interval: time spent in hooks and the first (compiling)
step are left out of tokens/s, MFU and the ETA.
"""

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from peer_jax import flops


class TrainingDiverged(RuntimeError):
  """The loss became NaN or Inf."""


_ADVICE = "Lower train.learning_rate, raise train.warmup_steps, or keep train.grad_clip > 0."


def check_finite(step: int, metrics: dict) -> None:
  """TrainingDiverged if the step's loss or gradient norm is NaN or Inf."""
  for key in ("train/loss", "train/grad_norm"):
    if key not in metrics:
      continue
    value = float(metrics[key])
    if not math.isfinite(value):
      raise TrainingDiverged(f"{key} is {value} at step {step}: training diverged. {_ADVICE}")


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_state_finite(step: int, tree, consequence: str) -> None:
  """TrainingDiverged (saying `consequence`) if any float array of `tree` is NaN or Inf."""
  if not bool(_all_finite(tree)):
    raise TrainingDiverged(
        f"the parameters or optimizer state are NaN or Inf after step {step}: training "
        f"diverged; {consequence}. {_ADVICE}")


class Preemption:
  """SIGTERM (what TPU VMs and SLURM send before preempting) asks for a save-and-exit.

  Installed before anything slow starts (config checks, restore, compilation), so a SIGTERM
  at any phase is a clean stop. The flag is only read at step boundaries (and between the
  start-up phases); on several processes they agree on it, so all of them stop after the
  same step. A SIGTERM that arrived before this handler was installed (scripts/train.py
  catches them from its first line, in a handler with `peer_jax_requested`) counts too.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      if getattr(self._previous, "peer_jax_requested", False):
        self.requested = True
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    self.requested = True

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([self.requested], np.int32))
    return bool(np.any(flags))


@dataclasses.dataclass
class Hook:
  """`fn(step, state) -> dict | None`, run after the steps it is due at; a dict it returns
  is logged with that step (which is then always logged).

  Due at multiples of `every` (0: never periodically), after the run's last step
  (`at_last`) and after the step a preemption stops at (`on_stop`). `finish_first` fetches
  and checks the step's own metrics before it (so a save never holds a NaN step);
  `finite_state` also checks the state's floats (TrainingDiverged before `fn` if not).
  """
  name: str
  fn: Callable[[int, Any], dict | None]
  every: int = 0
  at_last: bool = True
  on_stop: bool = False
  finish_first: bool = False
  finite_state: Callable[[Any], Any] | None = None  # the part of the state to check
  not_done: Callable[[int], str] = lambda step: f"step {step} was not processed"

  def due(self, step: int, last: bool) -> bool:
    return (self.every > 0 and step % self.every == 0) or (last and self.at_last)


@dataclasses.dataclass
class Logging:
  """Where finished steps go: every `every` steps, the last step and every step a hook
  returned values at. `writer.write(step, scalars)` and `progress.print(step, scalars)`
  (peer_jax.metrics); MFU from model FLOPs per token and the devices' peak (None: unknown)."""
  every: int
  writer: Any
  progress: Any
  flops_per_token: float = 0.0
  peak_flops: float | None = None
  num_devices: int = 1


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int  # the last step taken
  stopped: bool  # by a preemption request, before the run's last step
  last_logged: dict[str, float]  # {"step": ..., scalars} of the last logged step ({} if none)


class _Interval:
  """Tokens, wall time, data wait and hook time since the last logged step."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.tokens, self.t0, self.data_wait, self.excluded = 0.0, time.perf_counter(), 0.0, 0.0

  def seconds(self) -> float:
    return time.perf_counter() - self.t0 - self.excluded


def run_steps(step_fn: Callable[[Any, dict], tuple[Any, dict]], state, next_batch: Callable[[], dict],
              *, start_step: int, total_steps: int, log: Logging, hooks: Iterable[Hook] = (),
              stop_requested: Callable[[], bool] | None = None, until: int | None = None
              ) -> LoopResult:
  """Steps start_step+1 .. `until` (default: total_steps, the run's last step) of a run.

  `step_fn(state, batch) -> (state, device metrics)` (the state is donated);
  `next_batch()` the next global batch on the mesh. `stop_requested()` is read after every
  step but the last (on several processes it must agree: Preemption.agreed). Returns with
  every dispatched step finished (its metrics fetched and checked).
  """
  hooks = list(hooks)
  until = total_steps if until is None else until
  interval = _Interval()
  pending = None  # (step, metrics still on device) of the step dispatched before
  hook_values: dict[int, dict[str, float]] = {}
  last_logged: dict[str, float] = {}

  def finish(step: int, device_metrics: dict) -> None:
    nonlocal last_logged
    metrics = jax.device_get(device_metrics)
    check_finite(step, metrics)
    interval.tokens += float(metrics["train/tokens"])
    if step % log.every == 0 or step == total_steps or step in hook_values:
      scalars = {k: float(v) for k, v in metrics.items() if k != "train/tokens"}
      scalars["train/tokens_per_sec"] = interval.tokens / max(interval.seconds(), 1e-9)
      scalars["train/mfu"] = flops.mfu(scalars["train/tokens_per_sec"], log.flops_per_token,
                                       log.peak_flops, log.num_devices)
      scalars["train/data_wait_sec"] = interval.data_wait
      scalars.update(hook_values.pop(step, {}))
      log.writer.write(step, scalars)
      log.progress.print(step, scalars)
      last_logged = {"step": step, **scalars}
      interval.reset()
    if step == start_step + 1:
      # The first step compiled: keep it out of throughput and ETA.
      log.progress.restart_clock(step)
      interval.reset()

  def finish_pending() -> None:
    nonlocal pending
    if pending is not None:
      finish(*pending)
      pending = None

  def run_hook(hook: Hook, step: int) -> None:
    if hook.finish_first:
      finish_pending()
    jax.block_until_ready(state)  # the step's own compute is not hook time
    t0 = time.perf_counter()
    if hook.finite_state is not None:
      check_state_finite(step, hook.finite_state(state), hook.not_done(step))
    values = hook.fn(step, state)
    if values:
      hook_values.setdefault(step, {}).update(values)
    interval.excluded += time.perf_counter() - t0

  step, stopped = start_step, False
  for step in range(start_step + 1, until + 1):
    t0 = time.perf_counter()
    batch = next_batch()
    interval.data_wait += time.perf_counter() - t0
    state, metrics = step_fn(state, batch)
    if pending is not None:
      finish(*pending)
    pending = (step, metrics)
    last = step == total_steps
    ran = [h for h in hooks if h.due(step, last)]
    for hook in ran:
      run_hook(hook, step)
    if not last and stop_requested is not None and stop_requested():
      for hook in hooks:
        if hook.on_stop and all(hook is not h for h in ran):
          run_hook(hook, step)
      stopped = True
      break
  finish_pending()
  return LoopResult(state, step, stopped, last_logged)
