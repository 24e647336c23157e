"""Orbax checkpoints of a run: train state, data-iterator state and the config, with recovery.

Layout: DIR/checkpoints/<step>/{state, data, config}. `state` is the TrainState pytree
(params, optimizer state, step, batch-norm statistics); `data` holds every process's
iterator position (`data_<process index>`); `config` the config that produced them.

Restores always pass the target shardings of the current mesh, so a checkpoint written on
8 devices restores onto 1, 2 or 4. A checkpoint that cannot be read (a truncated file, a
missing item) is moved aside to DIR/checkpoints_damaged/ with a warning, and the previous
one is used: a run never silently starts from scratch while a good checkpoint exists.
"""

import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

# Keys whose change makes a checkpoint mean something else; anything else may change on resume.
FROZEN_PREFIXES = ("model.", "seed", "data.train_path", "data.tokenizer", "data.text_format",
                   "train.batch_size", "train.seq_len", "data.add_bos", "data.add_eos")


class CheckpointError(RuntimeError):
  """The workdir cannot hold checkpoints, or a resume cannot honour the config."""


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def flatten_config(node, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in node.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value))  # tuples -> lists, as saved
  return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every key that differs."""
  a, b = flatten_config(saved), flatten_config(current)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_frozen(key: str) -> bool:
  return any(key == p or key.startswith(p) for p in FROZEN_PREFIXES)


def _abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict | None
  config: dict


class Checkpointer:
  """Saves every `checkpoint.every` steps (async), keeps the last `checkpoint.keep`."""

  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_dir = os.path.abspath(os.path.join(workdir, "checkpoints_damaged"))
    self.every = int(ckpt_cfg.every)
    _check_writable(workdir)
    keep_period = int(ckpt_cfg.get("keep_period", 0)) or None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ckpt_cfg.keep), keep_period=keep_period,
        enable_async_checkpointing=bool(ckpt_cfg.get("async_save", True)), create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False):
    """Start saving (returns once the arrays are copied; the writing continues in background)."""
    # Every process's iterator position, so each host resumes its own share of the data.
    all_data = _gather_data_states(data_state)
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(all_data),
          config=ocp.args.JsonSave(config)), force=force)
    except OSError as e:
      raise CheckpointError(f"cannot write checkpoint {step} to {self.directory}: {e}") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def restore_latest(self, abstract_state, shardings, *, step: int | None = None,
                     check_config=None) -> Restored | None:
    """The newest readable checkpoint (or `step`), restored onto `shardings`; None if none.

    `check_config(saved_config, step)` runs on a checkpoint's config before its arrays are
    read: a config that cannot be honoured must stop the run, not be taken for damage.
    """
    target = _abstract_with_shardings(abstract_state, shardings)
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                              f"(available: {sorted(steps)})")
      steps = [step]
    for s in steps:
      try:
        config = dict(self.manager.restore(
            s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
      except Exception as e:  # noqa: BLE001  (an unreadable config is damage too)
        config, error = None, e
      if config is not None and check_config is not None:
        check_config(config, s)  # raises (and stops the run) on changes it cannot honour
      try:
        if config is None:
          raise error
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return Restored(s, out.state, _my_data_state(out.data), config)
      except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: fall back)
        if step is not None:
          raise CheckpointError(f"checkpoint {s} in {self.directory} is unreadable: "
                                f"{_first_line(e)}") from e
        older = [t for t in steps if t < s]
        _warn(f"checkpoint {s} in {self.directory} is unreadable ({_first_line(e)}); moved to "
              f"{self.damaged_dir}; "
              + (f"falling back to checkpoint {older[0]}" if older else "no older checkpoint"))
        self._move_aside(s)
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      os.makedirs(self.damaged_dir, exist_ok=True)
      dst = os.path.join(self.damaged_dir, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      if os.path.exists(src):
        shutil.move(src, dst)
    _sync("peer_jax_checkpoint_move_aside")
    self.manager.reload()


def restore_params(path: str, abstract_state, shardings):
  """Params and model state of the newest readable checkpoint under `path` (a workdir or
  its checkpoints/ folder), for starting a new run from them (checkpoint.init_from)."""
  directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else \
      os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint.init_from: no checkpoints folder at {directory}")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"checkpoint.init_from: no complete checkpoint in {directory}")
  target = _abstract_with_shardings(abstract_state, shardings)
  target = {"params": target.params, "model_state": target.model_state}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, partial_restore=True)))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint.init_from: cannot restore params from step {step} of "
                          f"{directory} ({_first_line(e)}); is it the same model?") from e
  manager.close()
  return step, restored.state["params"], restored.state["model_state"]


def _gather_data_states(data_state: dict) -> dict:
  if jax.process_count() == 1:
    return {"data_0": data_state}
  from jax.experimental import multihost_utils
  encoded = json.dumps(data_state).encode()
  sizes = multihost_utils.process_allgather(jax.numpy.asarray([len(encoded)]))
  width = int(sizes.max())
  import numpy as np
  buf = np.zeros(width, np.uint8)
  buf[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  everything = multihost_utils.process_allgather(buf)
  return {f"data_{i}": json.loads(bytes(everything[i][:int(sizes[i][0])]).decode())
          for i in range(jax.process_count())}


def _my_data_state(saved: dict | None) -> dict | None:
  # Joined over every process's state, so a resume on another process count continues.
  from peer_jax.data import merge_process_states
  return merge_process_states(saved, jax.process_index(), jax.process_count())


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _check_writable(workdir: str) -> None:
  """Fail at once, with the path, when the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def load_run(workdir: str, step: int | None = None):
  """(config, Trainer, TrainState) of a run's latest (or given) checkpoint, on this host's
  devices: what evaluation and sampling start from."""
  import ml_collections
  from peer_jax.train import Trainer
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{workdir} holds no run (no config.json); train one with "
                          "scripts/train.py --workdir=...")
  with open(config_path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1  # whatever devices are here
  trainer = Trainer.build(cfg)
  manager_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(manager_dir):
    raise CheckpointError(f"no checkpoints in {workdir}")
  manager = ocp.CheckpointManager(manager_dir, item_names=("state", "data", "config"))
  target = _abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no complete checkpoint in {manager_dir}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {manager_dir} (available: "
                          f"{sorted(steps)})")
  try:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step} in {manager_dir} is unreadable: "
                          f"{_first_line(e)}") from e
  finally:
    manager.close()
  return cfg, trainer, out.state
