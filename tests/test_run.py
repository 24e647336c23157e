"""The one run loader (peer_jax.run): params only where no optimizer is needed, read-only,
the same parameters as a full restore; Trainer builds its state around the same Model."""

import json
import os

import jax
import numpy as np
import pytest

from peer_jax import run as run_lib
from peer_jax.checkpoint import Checkpointer, CheckpointError
from peer_jax.train import Trainer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A workdir with checkpoints 1 and 2 of a tiny PEER model (one real step between)."""
  workdir = tmp_path_factory.mktemp("run")
  cfg = tiny_config("peer")
  cfg.checkpoint.async_save = False
  trainer = Trainer.build(cfg)
  state = trainer.init_state()
  ckpt = Checkpointer(str(workdir), cfg.checkpoint)
  config = json.loads(cfg.to_json_best_effort())
  ckpt.save(1, state.replace(step=jax.numpy.asarray(1, jax.numpy.int32)), {}, config)
  state = state.replace(step=jax.numpy.asarray(2, jax.numpy.int32),
                        params=jax.tree.map(lambda x: x + 1, state.params))
  ckpt.save(2, state, {}, config)
  ckpt.close()
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  return workdir, cfg, trainer


def test_params_only_load_matches_a_full_restore(saved_run):
  workdir, cfg, trainer = saved_run
  loaded = run_lib.load_run(str(workdir))
  assert loaded.step == 2 and isinstance(loaded.state, run_lib.ModelState)
  assert isinstance(loaded.model, run_lib.Model) and not hasattr(loaded.model, "tx")
  full = run_lib.load_run(str(workdir), builder=Trainer.build)
  assert full.step == 2 and hasattr(full.state, "opt_state")
  for a, b in zip(jax.tree.leaves(loaded.state.params), jax.tree.leaves(full.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  older = run_lib.load_run(str(workdir), step=1)
  assert older.step == 1
  first = jax.tree.leaves(older.state.params)[0]
  np.testing.assert_array_equal(np.asarray(first) + 1, np.asarray(jax.tree.leaves(loaded.state.params)[0]))


def test_trainer_and_model_share_the_graph_and_shardings(saved_run):
  _, cfg, trainer = saved_run
  model = run_lib.Model.build(cfg)
  assert model.graphdef == trainer.graphdef
  assert jax.tree.structure(model.abstract_state.params) == \
      jax.tree.structure(trainer.abstract_state.params)
  assert jax.tree.leaves(model.state_shardings.params) == \
      jax.tree.leaves(trainer.state_shardings.params)


def test_a_damaged_latest_falls_back_and_nothing_moves(saved_run, tmp_path, capfd):
  import shutil
  workdir, _, _ = saved_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  for d, _, fs in os.walk(copy / "checkpoints" / "2" / "state"):  # every array file, so
    for name in fs:                                                  # the params too
      with open(os.path.join(d, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, name)) // 3)
  loaded = run_lib.load_run(str(copy))
  assert loaded.step == 1
  assert "falling back to checkpoint 1" in capfd.readouterr().err
  assert sorted(os.listdir(copy / "checkpoints")) == ["1", "2"]
  assert not (copy / "checkpoints_damaged").exists()


def test_a_workdir_without_a_run_is_one_error(tmp_path):
  with pytest.raises(CheckpointError, match="holds no run"):
    run_lib.load_run(str(tmp_path))


def test_the_run_loader_imports_no_trainer():
  import ast
  import inspect
  tree = ast.parse(inspect.getsource(run_lib))
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert "peer_jax.train" not in imported
  import peer_jax.checkpoint as ck
  tree = ast.parse(inspect.getsource(ck))
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert not imported & {"peer_jax.train", "peer_jax.run"}  # no checkpoint <-> train circle
