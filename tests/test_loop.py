"""The one host loop (peer_jax.loop.run_steps): hooks fire at their steps, metrics are
finished one step late and logged, a preemption saves and stops, a NaN stops before any
save; train_and_evaluate and benchmarks/bench_train.py both run it."""

import inspect
import json
import os
import signal
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from peer_jax import loop, train
from peer_jax.loop import Hook, Logging, TrainingDiverged, run_steps
from tests.conftest import tiny_config


class Recorder:
  """Stands in for MetricWriter and Progress."""

  def __init__(self):
    self.written, self.events = [], []

  def write(self, step, scalars):
    self.written.append((step, dict(scalars)))

  def print(self, step, scalars):
    pass

  def restart_clock(self, step):
    self.events.append(("clock", step))


def fake_step(nan_loss_at=None, nan_state_at=None):
  """A train step on a tiny pytree state: {"step", "w"}; metrics like the real ones."""
  def step_fn(state, batch):
    step = state["step"] + 1
    w = state["w"] + batch["x"]
    if nan_state_at is not None:
      w = jnp.where(step == nan_state_at, jnp.nan, w)
    loss = jnp.where(step == (nan_loss_at or -1), jnp.nan, 1.0 / step)
    return ({"step": step, "w": w},
            {"train/loss": loss, "train/grad_norm": jnp.ones(()), "train/tokens": jnp.full((), 8.0)})
  return step_fn


def state0():
  return {"step": jnp.zeros((), jnp.int32), "w": jnp.zeros((2,), jnp.float32)}


def batches():
  return lambda: {"x": jnp.ones((2,), jnp.float32)}


def recording_hook(name, calls, **kw):
  def fn(step, state):
    calls.append((name, step, int(state["step"])))
    return {f"{name}/value": float(step)} if name == "eval" else None
  return Hook(name, fn, **kw)


def run(total, hooks=(), log_every=2, stop_after=None, step_fn=None, start=0, until=None,
        rec=None):
  rec = rec or Recorder()
  asked = []

  def stop_requested():
    asked.append(True)
    return stop_after is not None and len(asked) >= stop_after

  result = run_steps(step_fn or fake_step(), state0() if start == 0 else start[1], batches(),
                     start_step=0 if start == 0 else start[0], total_steps=total,
                     log=Logging(every=log_every, writer=rec, progress=rec), hooks=hooks,
                     stop_requested=stop_requested, until=until)
  return result, rec


def test_hooks_fire_at_their_steps_and_eval_values_are_logged():
  calls = []
  hooks = [recording_hook("eval", calls, every=2),
           recording_hook("save", calls, every=3, on_stop=True, finish_first=True)]
  result, rec = run(7, hooks, log_every=3)
  assert calls == [("eval", 2, 2), ("save", 3, 3), ("eval", 4, 4), ("eval", 6, 6),
                   ("save", 6, 6), ("eval", 7, 7), ("save", 7, 7)]
  # Logged: every 3rd step, the last, and every step a hook returned values at.
  assert [s for s, _ in rec.written] == [2, 3, 4, 6, 7]
  by_step = dict(rec.written)
  assert by_step[4]["eval/value"] == 4.0 and "eval/value" not in by_step[3]
  assert by_step[3]["train/loss"] == pytest.approx(1 / 3)
  for key in ("train/tokens_per_sec", "train/mfu", "train/data_wait_sec", "train/grad_norm"):
    assert key in by_step[3]
  assert "train/tokens" not in by_step[3]
  assert rec.events == [("clock", 1)]  # the compiling first step is left out of the ETA
  assert not result.stopped and result.step == 7 and result.last_logged["step"] == 7
  assert int(result.state["step"]) == 7


def test_at_last_false_and_every_zero():
  calls = []
  hooks = [recording_hook("periodic", calls, every=2, at_last=False),
           recording_hook("final", calls, every=0)]
  run(5, hooks)
  assert calls == [("periodic", 2, 2), ("periodic", 4, 4), ("final", 5, 5)]


def test_a_window_of_steps_fires_as_the_whole_run():
  """`until` runs part of a run (the benchmark's calls): the same hooks at the same steps."""
  calls_whole, calls_parts = [], []
  hooks = lambda calls: [recording_hook("eval", calls, every=3),
                         recording_hook("save", calls, every=4, on_stop=True)]
  run(8, hooks(calls_whole))
  first, _ = run(8, hooks(calls_parts), until=5)
  assert first.step == 5 and not first.stopped
  second, _ = run(8, hooks(calls_parts), start=(5, first.state))
  assert calls_parts == calls_whole
  assert int(second.state["step"]) == 8


def test_preemption_runs_the_on_stop_hooks_and_stops():
  calls = []
  hooks = [recording_hook("eval", calls, every=2),
           recording_hook("save", calls, every=10, on_stop=True, finish_first=True)]
  result, rec = run(10, hooks, log_every=1, stop_after=3)
  assert result.stopped and result.step == 3
  assert calls == [("eval", 2, 2), ("save", 3, 3)]  # saved at the step it stopped at
  assert [s for s, _ in rec.written] == [1, 2, 3]  # the last step's metrics were finished


def test_a_preemption_at_a_save_step_saves_once():
  calls = []
  result, _ = run(10, [recording_hook("save", calls, every=2, on_stop=True)], stop_after=2)
  assert result.stopped and calls == [("save", 2, 2)]


def test_nan_loss_stops_before_the_save_of_that_step():
  calls = []
  hooks = [recording_hook("save", calls, every=1, on_stop=True, finish_first=True)]
  with pytest.raises(TrainingDiverged, match="train/loss is nan at step 3: training diverged"):
    run(6, hooks, step_fn=fake_step(nan_loss_at=3))
  assert calls == [("save", 1, 1), ("save", 2, 2)]


def test_nan_state_is_checked_before_the_hook():
  calls = []
  hooks = [recording_hook("save", calls, every=1, finish_first=True,
                          finite_state=lambda s: s["w"],
                          not_done=lambda step: f"checkpoint {step} was not written")]
  with pytest.raises(TrainingDiverged, match="after step 2: training diverged; checkpoint 2 "
                                             "was not written"):
    run(6, hooks, step_fn=fake_step(nan_state_at=2))
  assert calls == [("save", 1, 1)]


def test_check_finite_names_the_metric():
  loop.check_finite(1, {"train/loss": 1.0, "train/grad_norm": 2.0})
  with pytest.raises(TrainingDiverged, match="train/grad_norm is inf at step 4"):
    loop.check_finite(4, {"train/loss": 1.0, "train/grad_norm": float("inf")})


# ----------------------------------------------------------------------------- the real run


def _cfg(steps=4):
  cfg = tiny_config()
  cfg.train.steps, cfg.train.eval_every = steps, 2
  cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.async_save = 2, 5, False
  cfg.data.eval_paths = "valid=" + cfg.data.eval_paths.split(",")[0].split("=")[-1]
  return cfg


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_train_and_evaluate_runs_the_loop_with_its_hooks(tmp_path, monkeypatch):
  seen = []
  real = loop.run_steps

  def spy(*args, **kwargs):
    seen.append([(h.name, h.every, h.on_stop) for h in kwargs["hooks"]])
    return real(*args, **kwargs)

  monkeypatch.setattr(loop, "run_steps", spy)
  train.train_and_evaluate(_cfg(), str(tmp_path))
  assert seen == [[("eval", 2, False), ("save", 2, True)]]
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert [r["step"] for r in records if "eval/valid/loss" in r] == [2, 4]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_sigterm_saves_and_the_resume_is_exact(tmp_path, monkeypatch):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("the SIGTERM handler is installed from the main thread only")
  full = tmp_path / "full"
  train.train_and_evaluate(_cfg(steps=6), str(full))
  real_hooks = train.run_hooks

  def with_sigterm(*args):  # SIGTERM during step 3's hooks: stop (and save) after step 3
    term = Hook("sigterm", lambda step, state: os.kill(os.getpid(), signal.SIGTERM), every=3,
                at_last=False)
    return real_hooks(*args) + [term]

  cut = tmp_path / "cut"
  monkeypatch.setattr(train, "run_hooks", with_sigterm)
  train.train_and_evaluate(_cfg(steps=6), str(cut))
  assert sorted(os.listdir(cut / "checkpoints")) == ["2", "3"]
  monkeypatch.setattr(train, "run_hooks", real_hooks)
  train.train_and_evaluate(_cfg(steps=6), str(cut))
  drop = ("train/tokens_per_sec", "train/mfu", "train/data_wait_sec")
  clean = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
  assert clean(_records(cut)) == clean(_records(full))


def test_bench_train_times_the_same_loop(tmp_path, monkeypatch):
  from benchmarks import bench_train
  source = inspect.getsource(bench_train.HostLoop)
  assert "train.run_steps" in source and "train.run_hooks" in source
  assert "train_step(" not in source and "range(" not in source  # no second loop
  assert "loop.run_steps(trainer.train_step" in inspect.getsource(train.run_steps)
  calls = []
  real = loop.run_steps
  monkeypatch.setattr(loop, "run_steps", lambda *a, **k: calls.append(k["until"]) or real(*a, **k))
  cfg = _cfg(steps=100)
  cfg.train.log_every, cfg.train.eval_every = 2, 4
  host = bench_train.HostLoop(cfg, str(tmp_path))
  assert [h.name for h in host.hooks] == ["eval", "save"]
  for _ in range(2):
    host()
  host.close()
  assert calls == [2, 4] and host.step == 4
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [2, 4] and "eval/valid/loss" in records[-1]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert np.isfinite(records[-1]["train/loss"])
