"""Checkpointing: exact resume after kill -9, SIGTERM, damaged checkpoints, mesh changes, init_from."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import REPO

TINY = [
    "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.num_layers=2",
    "--config.model.d_ff=64", "--config.model.peer.num_experts=256", "--config.model.peer.heads=2",
    "--config.model.peer.top_k=4", "--config.model.peer.query_dim=16",
    "--config.train.batch_size=4", "--config.train.seq_len=32", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.warmup_steps=2",
]


def _cmd(workdir, *overrides):
  return [sys.executable, os.path.join(REPO, "scripts", "train.py"),
          "--config=" + os.path.join(REPO, "configs", "default.py"), f"--workdir={workdir}",
          *TINY, *overrides]


def _train(workdir, *overrides, check=True):
  result = subprocess.run(_cmd(workdir, *overrides), capture_output=True, text=True, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
  return {r["step"]: r["train/loss"] for r in records}


def _records(workdir) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _run_until(workdir, records, sig, *overrides):
  """Start training and send `sig` once `records` steps are logged; returns the process."""
  proc = subprocess.Popen(_cmd(workdir, *overrides), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while _records(workdir) < records and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return proc, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 40-step run (checkpoints every 4 steps, async saves)."""
  workdir = tmp_path_factory.mktemp("reference")
  _train(workdir, "--config.train.steps=40", "--config.checkpoint.every=4")
  return workdir


@pytest.mark.slow  # ~4 min on 2 cores; SIGTERM and sync-save resumes check exactness by default
def test_resume_after_kill_9_is_bit_exact(tmp_path, reference):
  workdir = tmp_path / "run"
  proc, _, err = _run_until(workdir, 9, signal.SIGKILL, "--config.train.steps=40",
                            "--config.checkpoint.every=4")
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  result = _train(workdir, "--config.train.steps=40", "--config.checkpoint.every=4")
  assert "resumed from checkpoint" in result.stdout
  assert _losses(workdir) == _losses(reference)  # every step, bit for bit


@pytest.mark.slow
def test_sync_saves_give_the_same_run(tmp_path, reference):
  _train(tmp_path, "--config.train.steps=40", "--config.checkpoint.every=4",
         "--config.checkpoint.async_save=False")
  assert _losses(tmp_path) == _losses(reference)


@pytest.mark.slow  # the same path in-process, faster: test_loop's SIGTERM resume test
def test_sigterm_saves_at_the_step_boundary_and_resumes(tmp_path, reference):
  proc, out, err = _run_until(tmp_path, 6, signal.SIGTERM, "--config.train.steps=40",
                              "--config.checkpoint.every=1000")
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by SIGTERM after step" in out
  stopped = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
  assert stopped < 40
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [stopped]
  result = _train(tmp_path, "--config.train.steps=40", "--config.checkpoint.every=4")
  assert f"resumed from checkpoint {stopped}" in result.stdout
  assert _losses(tmp_path) == _losses(reference)


def _largest_file(root):
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return max(files, key=os.path.getsize)


# The default suite checks damage fallbacks in test_reliability and test_run.
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "missing_item"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, damage):
  _train(tmp_path, "--config.train.steps=12", "--config.checkpoint.every=4")
  before = _losses(tmp_path)
  latest = tmp_path / "checkpoints" / "12"
  if damage == "truncate":
    victim = _largest_file(latest / "state")
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 2)
  else:
    shutil.rmtree(latest / "data")
  result = _train(tmp_path, "--config.train.steps=16", "--config.checkpoint.every=4")
  assert "checkpoint 12" in result.stderr and "unreadable" in result.stderr
  assert "falling back to checkpoint 8" in result.stderr
  assert "resumed from checkpoint 8" in result.stdout
  assert (tmp_path / "checkpoints_damaged" / "12").is_dir()  # kept for inspection, not deleted
  after = _losses(tmp_path)
  assert sorted(after) == list(range(1, 17))
  assert all(after[s] == before[s] for s in range(1, 9))  # what came before is untouched


@pytest.mark.slow  # test_reliability's frozen / optimizer / data changes cover the refusals
def test_model_change_on_resume_refuses_and_other_changes_apply(tmp_path):
  _train(tmp_path, "--config.train.steps=4", "--config.checkpoint.every=2")
  bad = _train(tmp_path, "--config.train.steps=6", "--config.model.d_ff=128", check=False)
  assert bad.returncode == 2
  assert "model.d_ff: changed from 64 to 128" in bad.stderr and "Traceback" not in bad.stderr
  ok = _train(tmp_path, "--config.train.steps=6", "--config.train.learning_rate=0.001")
  assert "config change on resume: train.learning_rate" in ok.stdout
  assert "config change on resume: train.steps: 4 -> 6" in ok.stdout
  assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_init_from_another_run_starts_from_its_params(tmp_path, reference):
  result = _train(tmp_path / "finetune", "--config.train.steps=2",
                  f"--config.checkpoint.init_from={reference}")
  assert "initialised parameters from" in result.stdout
  fresh = _losses(reference)[1]
  assert _losses(tmp_path / "finetune")[1] < fresh - 1.0  # starts where the other run ended


def test_unwritable_workdir_fails_clearly(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = _train(blocker / "run", "--config.train.steps=2", check=False)
  assert result.returncode == 2
  assert "error: checkpoint: workdir" in result.stderr and "not writable" in result.stderr
  assert "Traceback" not in result.stderr


MESH_SCRIPT = textwrap.dedent("""
    import os, sys, json
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    import peer_jax
    from tests.conftest import tiny_config
    from peer_jax.train import Trainer
    from peer_jax.checkpoint import Checkpointer
    cfg = tiny_config("peer")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = {mesh}
    cfg.model.d_model, cfg.model.d_ff = 32, 64
    trainer = Trainer.build(cfg)
    ckpt = Checkpointer({workdir!r}, cfg.checkpoint)
    restored = ckpt.restore_latest(trainer.abstract_state, trainer.state_shardings)
    if restored is None:
      state = trainer.init_state()
      tokens = np.random.RandomState(0).randint(0, 32768, (4, 33)).astype(np.int32)
      batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                   positions=np.tile(np.arange(32, dtype=np.int32), (4, 1)),
                   segment_ids=np.ones((4, 32), np.int32), mask=np.ones((4, 32), np.float32))
      from peer_jax.data import global_batch
      state, _ = trainer.train_step(state, global_batch(batch, trainer.batch_sharding))
      ckpt.save(1, state, {{}}, {{}}, force=True)
    else:
      state = restored.state
      leaf = jax.tree.leaves(state.params)[0]
      assert len(leaf.sharding.device_set) == jax.device_count()
    ckpt.close()
    flat = {{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}}
    np.savez({out!r}, **flat)
""")


def _mesh_run(workdir, out, devices, mesh):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  script = MESH_SCRIPT.format(repo=REPO, mesh=mesh, workdir=str(workdir), out=str(out))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(out)


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
  """Written on 8 devices as (2, 2, 2); restored on 1 device and on 4 as (1, 2, 2)."""
  saved = _mesh_run(tmp_path / "w", tmp_path / "a.npz", 8, (2, 2, 2))
  on_one = _mesh_run(tmp_path / "w", tmp_path / "b.npz", 1, (1, 1, 1))
  on_four = _mesh_run(tmp_path / "w", tmp_path / "c.npz", 4, (1, 2, 2))
  assert sorted(saved.files) == sorted(on_one.files) == sorted(on_four.files)
  for key in saved.files:
    np.testing.assert_array_equal(saved[key], on_one[key])
    np.testing.assert_array_equal(saved[key], on_four[key])
