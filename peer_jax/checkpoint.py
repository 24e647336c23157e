"""Orbax checkpoints of a run: train state, data-iterator state and the config, with recovery.

Layout: DIR/checkpoints/<step>/{state, data, config}. `state` is the TrainState pytree
(params, optimizer state, step, batch-norm statistics); `data` holds every process's
iterator position (`data_<process index>`); `config` the config that produced them.
Restores always pass the target shardings of the current mesh, so a checkpoint written on
8 devices restores onto 1, 2 or 4.

Damage and change are told apart (docs/checkpointing.md). A config change is never damage
(peer_jax.resume_checks: key groups, and the saved state's tree, read from Orbax's metadata
before any array, compared with the one the config builds). A checkpoint that cannot be
read is damage: the previous one is used and the damaged one moved to
DIR/checkpoints_damaged/<step>[.N]; if none is readable the run stops, nothing moved. Saves
are settled on every exit path: a failed write is one CheckpointWriteError naming the step
and path, its partial folder is removed, and retention deletes only once a newer
checkpoint is complete.
"""

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from peer_jax.orbax_logs import quiet_orbax_logs
from peer_jax.resume_checks import (  # noqa: F401  (re-exported: the resume checks)
    FROZEN_PREFIXES, OPTIMIZER_STRUCTURE_PREFIXES, config_changes, describe_changes,
    flatten_config, is_frozen, key_group, structure_message, tree_differences)

TMP_SUFFIX = ".orbax-checkpoint-tmp"
ITEMS = ("state", "data", "config")
PARAMS = ("params", "model_state")  # what a params-only restore reads of the state


class CheckpointError(RuntimeError):
  """The workdir cannot hold checkpoints, or a resume cannot honour the config (exit 2)."""
  exit_code = 2


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (disk full, permissions): exit 4."""
  exit_code = 4


def resolve_path(path: str) -> str:
  """A path as the user typed it (relative, `~`) made absolute; URLs (gs://) unchanged."""
  path = str(path)
  if "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- state trees


def _flat_target(abstract_state) -> dict[tuple, Any]:
  return ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))



def _abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def _first_line(e: BaseException) -> str:
  """`Type: first line` of the innermost cause of `e` (TensorStore's own message, say, not
  the generic wrapper around it)."""
  seen = []
  while e is not None and e not in seen and len(seen) < 10:
    seen.append(e)
    e = e.__cause__ or e.__context__
  root = seen[-1]
  text = str(root).strip().splitlines()
  return f"{type(root).__name__}: {text[0] if text else ''}"[:300]


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict | None
  config: dict


def _manager(directory: str, *, read_only: bool, async_save: bool = True):
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler()}
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0)
  else:
    # No max_to_keep: Orbax deletes old steps even when the new save failed; retention is
    # done here once a newer checkpoint is known to be complete (Checkpointer._retain).
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class Checkpointer:
  """Saves every `checkpoint.every` steps (async), keeps the last `checkpoint.keep`.

  `read_only=True` (evaluation, sampling): never writes, moves or deletes anything.
  """

  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False):
    quiet_orbax_logs()
    workdir = resolve_path(workdir)
    self.workdir = workdir
    self.read_only = read_only
    self.directory = os.path.join(workdir, "checkpoints")
    self.damaged_dir = os.path.join(workdir, "checkpoints_damaged")
    self.every = int(ckpt_cfg.get("every", 0))
    self.keep = int(ckpt_cfg.get("keep", 1))
    self.keep_period = int(ckpt_cfg.get("keep_period", 0) or 0)
    self._in_flight: int | None = None
    self.async_save = bool(ckpt_cfg.get("async_save", True))
    if read_only:
      if not os.path.isdir(self.directory):
        raise CheckpointError(f"no checkpoints in {workdir} (no folder {self.directory})")
    else:
      check_writable(workdir)
      self._remove_partial_saves()
    try:
      self.manager = _manager(self.directory, read_only=read_only, async_save=self.async_save)
    except OSError as e:
      raise CheckpointError(f"cannot open {self.directory}: {e.strerror or e}") from None

  # --------------------------------------------------------------------------- saving

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False):
    """Start saving (returns once the arrays are copied; the writing continues in background).

    Raises CheckpointWriteError (naming the step and path) if this save or the previous,
    still in flight, cannot be written.
    """
    self.wait()
    if step in self.manager.all_steps():
      return  # already saved (e.g. a SIGTERM right after a scheduled save)
    # Every process's iterator position, so each host resumes its own share of the data.
    all_data = _gather_data_states(data_state)
    self._in_flight = step
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(all_data),
          config=ocp.args.JsonSave(config)), force=True)
    except Exception as e:  # noqa: BLE001  (OSError, tensorstore's ValueError, ...)
      self._failed(step, e)
    if not self.async_save:
      self.wait()  # a synchronous save: settle (and check) it now

  def _failed(self, step: int, e: BaseException):
    self._in_flight = None
    self._remove_partial_saves()
    raise CheckpointWriteError(
        f"cannot write checkpoint {step} to {os.path.join(self.directory, str(step))}: "
        f"{_write_reason(e)}; the checkpoints before it are intact "
        f"(latest complete: {self._latest_complete()})") from None

  def _latest_complete(self) -> str:
    steps = [s for s in _step_dirs(self.directory)]
    return str(max(steps)) if steps else "none"

  def wait(self) -> None:
    """Block until the save in flight is complete; CheckpointWriteError if it failed."""
    step, self._in_flight = self._in_flight, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._failed(step, e)
    if "://" not in self.directory and jax.process_index() == 0 and \
        not os.path.isdir(os.path.join(self.directory, str(step))):
      self._failed(step, RuntimeError("the save did not complete"))
    self._retain()

  def _retain(self) -> None:
    """Delete checkpoints beyond `keep` (and not multiples of keep_period), oldest first."""
    try:
      steps = sorted(self.manager.all_steps(), reverse=True)
    except Exception:  # noqa: BLE001
      return
    for s in steps[self.keep:]:
      if self.keep_period and s % self.keep_period == 0:
        continue
      try:
        self.manager.delete(s)
      except Exception as e:  # noqa: BLE001  (a stale copy is better than a failed run)
        _warn(f"could not delete old checkpoint {s} in {self.directory}: {_first_line(e)}")

  def close(self) -> None:
    """Settle the save in flight (CheckpointWriteError if it failed), then close."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001
        pass

  def abort(self) -> str | None:
    """On an error or interrupt: settle what is in flight without raising; partial saves
    are removed. Returns the write failure, if there was one, as text."""
    problem = None
    try:
      self.wait()
    except CheckpointWriteError as e:
      problem = str(e)
    except BaseException as e:  # noqa: BLE001  (a second Ctrl-C: give up on this save)
      self._in_flight = None
      problem = f"the save in flight was abandoned ({type(e).__name__})"
    self._remove_partial_saves()
    try:
      self.manager.close()
    except BaseException:  # noqa: BLE001
      pass
    return problem

  def _remove_partial_saves(self) -> None:
    """Remove `<step>.orbax-checkpoint-tmp` folders: left by a save that died. Only the run
    holding the workdir lock calls this, so no live save is touched."""
    if self.read_only or jax.process_index() != 0 or "://" in self.directory or \
        not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if TMP_SUFFIX in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  # --------------------------------------------------------------------------- restoring

  def restore_latest(self, abstract_state, shardings, *, step: int | None = None,
                     check_config: Callable[[dict, int], None] | None = None,
                     apply_data: Callable[[dict | None], None] | None = None,
                     current_config: dict | None = None, params_only: bool = False,
                     on_difference: Callable[[int, list[str]], None] | None = None
                     ) -> Restored | None:
    """The newest readable checkpoint (or `step`), restored onto `shardings`.

    None when the workdir has no checkpoint. A checkpoint that cannot be read is skipped
    (and, unless read-only, moved aside once an older one restored); if none can be read,
    CheckpointError, with nothing moved. `check_config(saved_config, step)` runs before any
    array is read and raises on changes that cannot be honoured; a saved state whose tree
    differs from `abstract_state` is refused (ConfigError, naming the changed keys), never
    taken for damage. `apply_data(data_state)` repositions the data iterator: a failure
    there is damage too (a ConfigError from it is a refusal). `params_only`: only the
    state's `params` and `model_state` are compared and read (no data state), into
    `abstract_state.replace(...)`; `on_difference(step, differences)` raises instead of
    the ConfigError.
    """
    from peer_jax.config_validation import ConfigError
    target = _abstract_with_shardings(abstract_state, shardings)
    if params_only:
      target = {k: getattr(target, k) for k in PARAMS}
    flat_target = _flat_target({k: getattr(abstract_state, k) for k in PARAMS}
                               if params_only else abstract_state)
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                              f"(available: {sorted(steps)})")
      steps = [step]
    if not steps:
      return None
    damaged: list[tuple[int, str]] = []
    for s in steps:
      try:
        config = dict(self.manager.restore(
            s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
      except Exception as e:  # noqa: BLE001  (an unreadable config is damage too)
        damaged.append((s, f"config: {_first_line(e)}"))
        continue
      if check_config is not None:
        check_config(config, s)  # raises (and stops the run) on changes it cannot honour
      try:
        saved_tree = ocp.tree.to_flat_dict(self.manager.item_metadata(s)["state"])
      except Exception as e:  # noqa: BLE001
        damaged.append((s, f"state metadata: {_first_line(e)}"))
        continue
      differences = tree_differences(saved_tree, flat_target, only=PARAMS if params_only else None)
      if differences and on_difference is not None:
        on_difference(s, differences)
      if differences:
        raise ConfigError(structure_message(differences, config, current_config, s,
                                             self.directory))
      try:
        if params_only:
          state, data_state = abstract_state.replace(**_restore_subset(self.directory, s, target)), None
        else:
          out = self.manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
          state, data_state = out.state, _my_data_state(out.data)
      except Exception as e:  # noqa: BLE001  (unreadable arrays or data state: damage)
        damaged.append((s, _first_line(e)))
        continue
      if apply_data is not None:
        try:
          apply_data(data_state)
        except ConfigError:
          raise
        except Exception as e:  # noqa: BLE001
          damaged.append((s, f"data-iterator state: {_first_line(e)}"))
          continue
      for bad, why in damaged:
        where = self._move_aside(bad) if not self.read_only else None
        _warn(f"checkpoint {bad} in {self.directory} is unreadable ({why}); "
              + (f"moved to {where}; " if where else "")
              + f"falling back to checkpoint {s}")
      return Restored(s, state, data_state, config)
    if step is not None:
      raise CheckpointError(f"checkpoint {step} in {self.directory} is unreadable: "
                            f"{damaged[0][1]}")
    listing = "; ".join(f"{s}: {why}" for s, why in damaged)
    raise CheckpointError(
        f"none of the {len(damaged)} checkpoints in {self.directory} is readable ({listing}); "
        "nothing was moved or deleted, and the run does not start over on top of them: "
        "repair or move them away, or use a new --workdir")

  def _move_aside(self, step: int) -> str:
    """Move checkpoint `step` into checkpoints_damaged/ under a name no earlier copy has."""
    dst = os.path.join(self.damaged_dir, str(step))
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      os.makedirs(self.damaged_dir, exist_ok=True)
      n = 1
      while os.path.lexists(dst):
        n += 1
        dst = os.path.join(self.damaged_dir, f"{step}.{n}")
      if os.path.exists(src):
        shutil.move(src, dst)
    _sync("peer_jax_checkpoint_move_aside")
    self.manager.reload()
    return dst


def _restore_subset(directory: str, step: int, target: dict) -> dict:
  """The arrays of `target` (a subset of the saved state) only. Through the PyTree handler:
  the Standard one, which wrote them, cannot restore part of a tree."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  manager = ocp.CheckpointManager(directory, options=options,
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))).state
  finally:
    manager.close()


def _write_reason(e: BaseException) -> str:
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text or "No space left" in text or \
      getattr(e, "errno", None) == 28:
    return "no space left on the device"
  if isinstance(e, OSError) and e.strerror:
    return e.strerror + (f" ({e.filename})" if e.filename else "")
  if "Permission denied" in text or "Read-only file system" in text:
    return "permission denied" if "Permission" in text else "read-only file system"
  return _first_line(e)


def _step_dirs(directory: str) -> list[int]:
  try:
    return [int(n) for n in os.listdir(directory) if n.isdigit()]
  except OSError:
    return []


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


def check_writable(workdir: str) -> None:
  """Fail at once, with the path, when the workdir cannot be written."""
  if "://" in workdir:
    return
  for folder in (workdir, os.path.join(workdir, "checkpoints")):
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise CheckpointError(f"workdir {workdir}: {folder} is a file, not a directory")
    if folder != workdir and not os.path.isdir(folder):
      continue
    try:
      os.makedirs(folder, exist_ok=True)
      probe = os.path.join(folder, f".write_test_{jax.process_index()}_{os.getpid()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      err = CheckpointError(f"workdir {workdir} is not writable ({folder}: "
                            f"{e.strerror or e})")
      if e.errno == 28:  # ENOSPC: a write failure, not a bad path
        err.exit_code = 4
      raise err from None


_check_writable = check_writable  # older name
