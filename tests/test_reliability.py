"""Reliability (issue 16): damage is told from change, no run is started over on top of
another, one trainer per workdir, write failures and every exit settle saves, a NaN never
reaches a checkpoint, mismatches are refused, bad input is one line, paths as typed.

Most tests drive peer_jax.checkpoint / peer_jax.train in-process on a tiny model (a few
seconds each); the few that need a real process (signals, exit codes) run scripts/*.py.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from peer_jax import checkpoint as ck
from peer_jax.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError
from peer_jax.config_validation import ConfigError
from peer_jax import run as run_lib
from peer_jax.loop import TrainingDiverged
from peer_jax.resume import resume_or_init, truncate_metrics
from peer_jax.train import Trainer, train_and_evaluate
from peer_jax.workdir_lock import WorkdirError, WorkdirLock
from tests.conftest import REPO, tiny_config


class FakeData:
  """Stands in for the data iterator: a state with a fingerprint, like the real one."""

  def __init__(self, fingerprint="a", fail=False):
    self.fingerprint, self.fail, self.applied = fingerprint, fail, None

  def get_state(self):
    return {"format": "fake", "fingerprint": {"source": self.fingerprint}, "position": 0}

  def set_state(self, state):
    if self.fail or state.get("position") == "garbage":
      raise ValueError("cannot parse the iterator state")
    self.applied = state


def _cfg(**train):
  cfg = tiny_config("peer")
  cfg.checkpoint.async_save = False
  for k, v in train.items():
    setattr(cfg.train, k, v)
  return cfg


_BUILT = {}  # config json -> (trainer, initial state): building and compiling init is the slow part


def _built(cfg):
  key = cfg.to_json_best_effort()  # configs differing in checkpoint.* share one build
  key = json.dumps({k: v for k, v in json.loads(key).items() if k != "checkpoint"})
  if key not in _BUILT:
    trainer = Trainer.build(cfg)
    _BUILT[key] = (trainer, trainer.init_state())
  return _BUILT[key]


def _save(workdir, cfg, steps, data_state=None):
  trainer, state = _built(cfg)
  ckpt = Checkpointer(str(workdir), cfg.checkpoint)
  for s in steps:
    ckpt.save(s, state.replace(step=jax.numpy.asarray(s, jax.numpy.int32)),
              data_state or FakeData().get_state(), json.loads(cfg.to_json_best_effort()))
  ckpt.close()
  return trainer


def _truncate_arrays(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)


def _resume(workdir, cfg, data=None, messages=None):
  trainer = Trainer.build(cfg)  # eval_shape only: cheap
  ckpt = Checkpointer(str(workdir), cfg.checkpoint)
  try:
    return resume_or_init(cfg, trainer, ckpt, data or FakeData(),
                          (messages if messages is not None else []).append)
  finally:
    ckpt.close()


# ----------------------------------------------------------------------------- 1: damage vs change


def test_every_key_has_a_group():
  assert ck.key_group("model.d_ff") == "frozen"
  assert ck.key_group("model.peer.value_init") == "frozen"  # new model.* keys: frozen
  assert ck.key_group("seed") == "frozen"
  for key in ("train.table_optimizer", "train.table_lr_scale", "train.table_lr_schedule",
              "train.table_weight_decay", "train.grad_clip", "train.weight_decay"):
    assert ck.key_group(key) == "optimizer", key
  for key in ("train.steps", "train.learning_rate", "checkpoint.every", "mesh.data"):
    assert ck.key_group(key) == "applied", key


# table_lr_scale=1 with table_lr_schedule=follow is one shared AdamW again: the tables'
# own optimizer branch (the default, 4x decaying to 1x) disappears from the state.
@pytest.mark.parametrize("change", [{"grad_clip": 0.0}, {"table_optimizer": "lazy_adam"},
                                    {"table_lr_scale": 1.0, "table_lr_schedule": "follow"}])
def test_optimizer_structure_change_is_refused_not_damage(tmp_path, change):
  _save(tmp_path, _cfg(), [2, 4])
  with pytest.raises(ConfigError) as e:
    _resume(tmp_path, _cfg(steps=8, **change))
  key = "train." + next(iter(change))
  assert key in str(e.value) and "checkpoint 4" in str(e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing moved
  assert not (tmp_path / "checkpoints_damaged").exists()


def test_optimizer_key_change_that_keeps_the_structure_is_applied(tmp_path):
  _save(tmp_path, _cfg(), [2])
  messages = []
  state = _resume(tmp_path, _cfg(steps=8, grad_clip=0.5), messages=messages)
  assert int(state.step) == 2
  assert any("train.grad_clip: 1.0 -> 0.5" in m for m in messages)


def test_frozen_change_is_refused(tmp_path):
  _save(tmp_path, _cfg(), [2])
  cfg = _cfg()
  cfg.model.d_ff = 128
  with pytest.raises(ConfigError, match="model.d_ff: changed from 64 to 128"):
    _resume(tmp_path, cfg)
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_changed_data_pipeline_is_refused_not_damage(tmp_path):
  _save(tmp_path, _cfg(), [2])
  with pytest.raises(ConfigError, match="data pipeline changed"):
    _resume(tmp_path, _cfg(), data=FakeData(fingerprint="b"))
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


# ----------------------------------------------------------------------------- 2: never start over


def test_damaged_checkpoints_are_moved_under_unique_names(tmp_path):
  cfg = _cfg(steps=8)
  _save(tmp_path, _cfg(), [2, 4])
  _truncate_arrays(tmp_path / "checkpoints" / "4")
  assert int(_resume(tmp_path, cfg).step) == 2
  assert os.listdir(tmp_path / "checkpoints_damaged") == ["4"]
  # A second damaged checkpoint 4 never replaces the first copy.
  _save(tmp_path, _cfg(), [4])
  _truncate_arrays(tmp_path / "checkpoints" / "4")
  assert int(_resume(tmp_path, cfg).step) == 2
  assert sorted(os.listdir(tmp_path / "checkpoints_damaged")) == ["4", "4.2"]


def test_no_readable_checkpoint_stops_and_moves_nothing(tmp_path):
  cfg = _cfg(steps=8)
  _save(tmp_path, _cfg(), [2, 4])
  for s in ("2", "4"):
    _truncate_arrays(tmp_path / "checkpoints" / s)
  with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
    _resume(tmp_path, cfg)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert not (tmp_path / "checkpoints_damaged").exists()


def test_damaged_data_state_falls_back_like_other_damage(tmp_path):
  cfg = _cfg(steps=8)
  _save(tmp_path, _cfg(), [2])
  _save(tmp_path, _cfg(), [4], data_state={**FakeData().get_state(), "position": "garbage"})
  data = FakeData()
  assert int(_resume(tmp_path, cfg, data=data).step) == 2
  assert data.applied["position"] == 0
  assert os.listdir(tmp_path / "checkpoints_damaged") == ["4"]


def test_torn_last_metrics_line_is_cut_off(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  warnings = []
  truncate_metrics(str(path), 2, warn=warnings.append)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
  assert warnings and "metrics.jsonl" in warnings[0]


def test_resume_below_the_checkpoint_step_is_refused(tmp_path):
  _save(tmp_path, _cfg(), [4])
  with pytest.raises(ConfigError, match="train.steps: 2 is below the step of checkpoint 4"):
    _resume(tmp_path, _cfg(steps=2))


# ----------------------------------------------------------------------------- 3: one trainer


def test_second_trainer_on_a_workdir_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=f"in use by another trainer .host {socket.gethostname()}, pid {os.getpid()}"):
      WorkdirLock(str(tmp_path)).acquire()
  WorkdirLock(str(tmp_path)).acquire()  # released on exit: free again


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / "trainer.lock").write_text(json.dumps(
      {"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
  lock = WorkdirLock(str(tmp_path))
  lock.acquire()
  assert "taking over the lock" in capsys.readouterr().err
  assert json.loads((tmp_path / "trainer.lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / "trainer.lock").exists()


def test_lock_from_another_host_is_refused(tmp_path):
  (tmp_path / "trainer.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(WorkdirError, match="another host"):
    WorkdirLock(str(tmp_path)).acquire()


# ----------------------------------------------------------------------------- 4/5: writes


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   ValueError("RESOURCE_EXHAUSTED: Error writing ...")])
def test_write_failure_is_one_error_naming_step_and_path(tmp_path, monkeypatch, error):
  cfg = _cfg()
  cfg.checkpoint.async_save = True
  _save(tmp_path, _cfg(), [2])
  _, state = _built(_cfg())
  ckpt = Checkpointer(str(tmp_path), cfg.checkpoint)
  original = ck.ocp.CheckpointManager.wait_until_finished

  def failing_wait(self):
    original(self)
    os.makedirs(os.path.join(ckpt.directory, "4" + ck.TMP_SUFFIX), exist_ok=True)
    raise error
  monkeypatch.setattr(ck.ocp.CheckpointManager, "wait_until_finished", failing_wait)
  with pytest.raises(CheckpointWriteError) as e:
    ckpt.save(4, state, {}, {})  # the failure surfaces here or when the save is settled
    ckpt.wait()
  text = str(e.value)
  assert "checkpoint 4" in text and os.path.join(ckpt.directory, "4") in text
  assert "no space left" in text and "\n" not in text
  assert e.value.exit_code == 4
  monkeypatch.setattr(ck.ocp.CheckpointManager, "wait_until_finished", original)
  assert ckpt.abort() is None
  assert not [n for n in os.listdir(ckpt.directory) if ck.TMP_SUFFIX in n]  # no leftovers
  assert "2" in os.listdir(ckpt.directory)  # the earlier checkpoint is intact


def test_retention_deletes_only_after_a_newer_checkpoint_is_complete(tmp_path):
  cfg = _cfg()
  cfg.checkpoint.keep = 2
  _save(tmp_path, cfg, [1, 2, 3, 4])  # (the state is built once per config: _built)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]


# ----------------------------------------------------------------------------- 6: NaN


def test_a_nan_never_reaches_a_checkpoint(tmp_path):
  cfg = tiny_config()
  cfg.train.steps, cfg.train.learning_rate, cfg.train.grad_clip = 3, 1e30, 0.0
  cfg.train.warmup_steps = 0
  cfg.checkpoint.every = 1
  cfg.data.eval_paths = ""
  with pytest.raises(TrainingDiverged, match="diverged"):
    train_and_evaluate(cfg, str(tmp_path))
  steps = [n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()]
  restored = None
  if steps:  # whatever was saved must be finite
    trainer = Trainer.build(cfg)
    c = Checkpointer(str(tmp_path), cfg.checkpoint, read_only=True)
    restored = c.restore_latest(trainer.abstract_state, trainer.state_shardings)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.state.params))
  assert not (tmp_path / "trainer.lock").exists()


# ----------------------------------------------------------------------------- 7: mismatches


def test_init_from_another_shape_is_refused_naming_the_parameter(tmp_path):
  _save(tmp_path, _cfg(), [2])
  cfg = _cfg()
  cfg.model.d_ff = 128
  trainer = Trainer.build(cfg)
  with pytest.raises(CheckpointError) as e:
    run_lib.restore_params(str(tmp_path), trainer.abstract_state, trainer.state_shardings)
  assert "params." in str(e.value) and "(32, 64)" in str(e.value) and "(32, 128)" in str(e.value)


def test_read_only_restore_never_moves(tmp_path):
  cfg = _cfg()
  trainer = _save(tmp_path, cfg, [2, 4])
  _truncate_arrays(tmp_path / "checkpoints" / "4")
  c = Checkpointer(str(tmp_path), cfg.checkpoint, read_only=True)
  restored = c.restore_latest(trainer.abstract_state, trainer.state_shardings)
  c.close()
  assert restored.step == 2
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert not (tmp_path / "checkpoints_damaged").exists()


# ----------------------------------------------------------------------------- 8/10: input, paths


@pytest.mark.parametrize("body, expect", [
    ("def get_config(:\n  pass\n", "syntax error in {path}, line 1"),
    ("def get_config():\n  raise ValueError('boom')\n", "{path}, line 2: ValueError: boom"),
    ("import no_such_module_here\n", "{path}, line 1: ModuleNotFoundError"),
    ("x = 1\n", "defines no get_config()"),
])
def test_bad_config_files_are_named_with_their_line(tmp_path, body, expect):
  from peer_jax.cli import UsageProblem, load_config_file
  path = tmp_path / "bad.py"
  path.write_text(body)
  with pytest.raises(UsageProblem) as e:
    load_config_file("config", str(path))
  assert expect.format(path=path) in str(e.value)


def test_unknown_config_key_names_the_nearest():
  from peer_jax.cli import UsageProblem, check_overrides
  cfg = tiny_config()
  with pytest.raises(UsageProblem, match="unknown config key train.stepz .did you mean train.steps"):
    check_overrides(["x", "--config.train.stepz=3"], "config", cfg)
  check_overrides(["x", "--config.train.steps=3"], "config", cfg)


def test_malformed_sharding_rules_are_refused_on_one_device():
  from peer_jax.config_validation import validate_config
  cfg = tiny_config()
  cfg.sharding.rules = (("embed", "fsdp"), ("mlp",))
  with pytest.raises(ConfigError, match="sharding.rules"):
    validate_config(cfg, num_devices=1, check_files=False)
  cfg.sharding.rules = (("embed", "fsdpp"),)
  with pytest.raises(ConfigError, match="sharding.rules: 'embed' maps to unknown mesh axis"):
    validate_config(cfg, num_devices=1, check_files=False)


def test_relative_and_home_paths_resolve(tmp_path, monkeypatch):
  cfg = _cfg()
  _save(tmp_path / "runs" / "r", cfg, [2])
  (tmp_path / "runs" / "r" / "config.json").write_text(cfg.to_json_best_effort())
  monkeypatch.chdir(tmp_path)
  loaded = run_lib.load_run("runs/r")
  assert loaded.step == 2 and not hasattr(loaded.state, "opt_state")  # parameters only
  monkeypatch.setenv("HOME", str(tmp_path))
  assert ck.resolve_path("~/runs/r") == str(tmp_path / "runs" / "r")
  assert ck.resolve_path("gs://bucket/run") == "gs://bucket/run"


def _script(name, *args, cwd=REPO, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("args, flag", [
    (["--temperature=nan"], "--temperature"),
    pytest.param(["--top_p=0"], "--top_p", marks=pytest.mark.slow),
    pytest.param(["--max_new_tokens=0"], "--max_new_tokens", marks=pytest.mark.slow),
    pytest.param(["--step=-1"], "--step", marks=pytest.mark.slow),
])
def test_sample_flags_are_named(tmp_path, args, flag):
  r = _script("sample.py", f"--workdir={tmp_path}", "--prompt=x", *args)
  assert r.returncode == 2
  assert r.stderr.strip().startswith(f"error: command line: {flag}:"), r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, flag", [
    (["--batch_size=-4"], "--batch_size"),
    pytest.param(["--max_batches=-1"], "--max_batches", marks=pytest.mark.slow)])
def test_evaluate_flags_are_named(tmp_path, args, flag):
  r = _script("evaluate.py", f"--workdir={tmp_path}", "--data=x.txt", *args)
  assert r.returncode == 2 and r.stderr.startswith(f"error: command line: {flag}:"), r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_evaluate_histogram_under_a_file_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(tiny_config().to_json_best_effort())
  (tmp_path / "afile").write_text("x")
  r = _script("evaluate.py", f"--workdir={tmp_path}", "--data=x.txt",
              f"--expert_histogram={tmp_path}/afile/h.png")
  assert r.returncode == 2 and "--expert_histogram" in r.stderr and "is a file" in r.stderr


# ----------------------------------------------------------------------------- 5: signals


def _train_cmd(workdir, *overrides):
  from tests.test_checkpoint import TINY
  return [sys.executable, os.path.join(REPO, "scripts", "train.py"),
          "--config=" + os.path.join(REPO, "configs", "default.py"), f"--workdir={workdir}",
          *TINY, *overrides]


def test_sigterm_during_start_up_stops_cleanly(tmp_path):
  proc = subprocess.Popen(_train_cmd(tmp_path, "--config.train.steps=1000"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)  # imports / config checks: long before the first step
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped by SIGTERM" in out and "Traceback" not in err
  assert not (tmp_path / "trainer.lock").exists()


@pytest.mark.slow
def test_ctrl_c_mid_run_settles_the_save(tmp_path):
  proc = subprocess.Popen(_train_cmd(tmp_path, "--config.train.steps=1000",
                                     "--config.checkpoint.every=1"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      (tmp_path / "checkpoints").is_dir() and
      any(n.isdigit() for n in os.listdir(tmp_path / "checkpoints"))):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("interrupted: stopped by Ctrl-C")
  assert "Traceback" not in err
  names = os.listdir(tmp_path / "checkpoints")
  assert not [n for n in names if ck.TMP_SUFFIX in n], names
  assert not (tmp_path / "trainer.lock").exists()


@pytest.mark.slow
def test_full_disk_mid_run_is_one_line_and_exit_4(tmp_path):
  """A real full disk (a 24 MiB tmpfs: checkpoint 4 fits, 8 does not): needs root to mount."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(mnt)],
                     capture_output=True)
  if r.returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    result = subprocess.run(_train_cmd(mnt / "run", "--config.train.steps=12",
                                       "--config.checkpoint.every=4"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 4, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines[:5]
    assert lines[0].startswith("error: checkpoint: cannot write checkpoint 8 to ")
    assert "no space left" in lines[0]
    assert sorted(os.listdir(mnt / "run" / "checkpoints")) == ["4"]  # no partial folder
  finally:
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_two_trainers_on_one_workdir(tmp_path):
  first = subprocess.Popen(_train_cmd(tmp_path, "--config.train.steps=1000"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not (tmp_path / "trainer.lock").exists() and first.poll() is None and \
        time.time() < deadline:
      time.sleep(0.05)
    second = subprocess.run(_train_cmd(tmp_path, "--config.train.steps=1000"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert second.stderr.strip().startswith("error: workdir: ") and "in use by another trainer" \
        in second.stderr and f"pid {first.pid}" in second.stderr
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
  assert first.returncode == 0
