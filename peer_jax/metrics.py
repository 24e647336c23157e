"""Where metrics go: DIR/metrics.jsonl, TensorBoard event files, and a console progress line."""

import json
import math
import os
import sys
import time

import jax


class MetricsWriteError(RuntimeError):
  """metrics.jsonl cannot be written (disk full, permissions): exit 4."""


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 writes, so a multi-host run produces one set of files.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      try:
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
      except OSError as e:
        raise MetricsWriteError(f"cannot write {os.path.join(workdir, 'tensorboard')}: "
                                f"{e.strerror or e}") from None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _json_number(v) for k, v in scalars.items()}}
    try:
      # One write of the whole line: a kill or a full disk can tear only the last line,
      # which the next resume cuts off (resume.truncate_metrics).
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))
    except OSError as e:
      raise MetricsWriteError(f"cannot write step {step} to {self.path}: "
                              f"{e.strerror or e}") from None

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.close()
      except OSError:
        pass
      self._tb = None


def _json_number(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)  # JSON has no NaN/Inf


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """One console line per logged step with throughput and an ETA from the recent step rate."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stdout):
    self.total, self.stream = total_steps, stream
    self._t0, self._step0 = time.perf_counter(), start_step
    self.enabled = jax.process_index() == 0

  def restart_clock(self, step: int) -> None:
    """Call after the first (compiling) step so the ETA reflects steady-state speed."""
    self._t0, self._step0 = time.perf_counter(), step

  def eta_seconds(self, step: int) -> float | None:
    done = step - self._step0
    if done <= 0:
      return None
    return (time.perf_counter() - self._t0) / done * (self.total - step)

  def print(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    eta = self.eta_seconds(step)
    parts = [f"step {step}/{self.total}"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("train/learning_rate", "lr {:.2e}"),
                     ("train/grad_norm", "gnorm {:.3f}"), ("train/tokens_per_sec", "{:,.0f} tok/s"),
                     ("train/mfu", "mfu {:.1%}")):
      if key in scalars:
        parts.append(fmt.format(scalars[key]))
    for key, value in scalars.items():
      if key.startswith("eval/") and key.endswith("/loss"):
        parts.append(f"{key} {value:.4f}")
    parts.append(f"eta {format_duration(eta)}" if eta is not None else "eta --")
    print(" | ".join(parts), file=self.stream, flush=True)

  def message(self, text: str) -> None:
    if self.enabled:
      print(text, file=self.stream, flush=True)
