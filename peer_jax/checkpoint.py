"""Orbax checkpoints of a run: train state, data-iterator state and the config, with recovery.

Layout: DIR/checkpoints/<step>/{state, data, config}. `state` is the TrainState pytree
(params, optimizer state, step, batch-norm statistics); `data` holds every process's
iterator position (`data_<process index>`); `config` the config that produced them.

Restores always pass the target shardings of the current mesh, so a checkpoint written on
8 devices restores onto 1, 2 or 4.

Damage and change are told apart (docs/checkpointing.md):

* A config change is never damage. Every key is in one of three groups (`key_group`):
  frozen (refused on resume, naming it), optimizer-structure keys (applied when the
  optimizer state keeps its structure, refused naming them when it does not) and applied.
  The structure test does not trust the list alone: the saved state's tree (from Orbax's
  metadata, before any array is read) is compared with the state the current config
  builds, and any difference is a refusal, never damage.
* A checkpoint that cannot be read (a truncated file, a missing item, a bad data-iterator
  state) is damage: the previous one is used and the damaged one is moved to
  DIR/checkpoints_damaged/<step>[.N] (a unique name; nothing is ever deleted). If none is
  readable, the run stops with an error and nothing is moved: it never starts over on top
  of a run.
* Saves are settled on every exit path: a write that fails (full disk, unwritable folder)
  is one CheckpointWriteError naming the step and the path, its partial folder is removed,
  and older checkpoints are only deleted (retention) once a newer one is complete.
"""

import dataclasses
import json
import logging as pylogging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

TMP_SUFFIX = ".orbax-checkpoint-tmp"
ITEMS = ("state", "data", "config")

# Keys whose change makes a checkpoint mean something else: refused on resume.
FROZEN_PREFIXES = ("model.", "seed", "data.train_path", "data.tokenizer", "data.text_format",
                   "train.batch_size", "train.seq_len", "data.add_bos", "data.add_eos")
# Keys that can change the optimizer-state pytree (a table branch, clipping, decay masks):
# applied when the state keeps its structure, refused (naming them) when it does not. Any
# new `train.table_*` key is in this group by its prefix.
OPTIMIZER_STRUCTURE_PREFIXES = ("train.table_", "train.grad_clip", "train.weight_decay",
                                "train.optimizer")


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


class _DropOrbaxRecords(pylogging.Filter):
  """Orbax logs every failed background write with its traceback (thousands of lines on a
  full disk); peer_jax reports the failure itself, as one line."""

  def filter(self, record):
    return "orbax" not in (record.pathname or "") or os.environ.get("PEER_JAX_ORBAX_LOGS")


def _is_closed_loop_noise(exc_type, exc) -> bool:
  """A TensorStore callback into an event loop Orbax has closed after a failed read/write:
  harmless, but printed as a traceback from a background thread."""
  return exc_type is RuntimeError and "Event loop is closed" in str(exc)


def _install_noise_hooks() -> None:
  import threading
  if getattr(sys.excepthook, "peer_jax", False):
    return
  previous_sys, previous_thread = sys.excepthook, threading.excepthook

  def sys_hook(exc_type, exc, tb):
    if not _is_closed_loop_noise(exc_type, exc):
      previous_sys(exc_type, exc, tb)

  def thread_hook(args):
    if not _is_closed_loop_noise(args.exc_type, args.exc_value):
      previous_thread(args)

  sys_hook.peer_jax = True
  sys.excepthook, threading.excepthook = sys_hook, thread_hook


def quiet_orbax_logs() -> None:
  if not os.environ.get("PEER_JAX_ORBAX_LOGS"):
    _install_noise_hooks()
  for name in ("absl", ""):
    logger = pylogging.getLogger(name)
    if not any(isinstance(f, _DropOrbaxRecords) for f in logger.filters):
      logger.addFilter(_DropOrbaxRecords())
    for handler in logger.handlers:
      if not any(isinstance(f, _DropOrbaxRecords) for f in handler.filters):
        handler.addFilter(_DropOrbaxRecords())


# ----------------------------------------------------------------------------- config groups


def flatten_config(node, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in node.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value))  # tuples -> lists, as saved
  return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every key that differs.

  A key the saved config does not have (added to configs/base.py since) counts as changed
  only if its value is not the default; a key the current config no longer has (removed
  from the code) is not a change: it no longer means anything.
  """
  a, b = flatten_config(saved), flatten_config(current)
  defaults = _base_defaults()
  out = []
  for k in sorted(set(a) | set(b)):
    if k not in b:
      continue
    if k not in a and k in defaults and defaults[k] == b[k]:
      continue
    if a.get(k) != b.get(k):
      out.append((k, a.get(k), b.get(k)))
  return out


def _base_defaults() -> dict[str, Any]:
  """Flat defaults of configs/base.py, when it can be imported (scripts and tests can)."""
  try:
    from configs import base
    return flatten_config(json.loads(base.get_config().to_json_best_effort()))
  except Exception:  # noqa: BLE001  (no configs package on the path: compare as is)
    return {}


def _matches(key: str, prefixes) -> bool:
  """`key` is one of `prefixes`, or below one: 'model.' and 'train.table_' match by prefix,
  'seed' matches 'seed' and 'seed.*' only."""
  return any(key.startswith(p) if p.endswith((".", "_")) else (key == p or key.startswith(p + "."))
             for p in prefixes)


def key_group(key: str) -> str:
  """'frozen', 'optimizer' (may change the optimizer-state structure) or 'applied'."""
  if _matches(key, FROZEN_PREFIXES):
    return "frozen"
  if _matches(key, OPTIMIZER_STRUCTURE_PREFIXES):
    return "optimizer"
  return "applied"


def is_frozen(key: str) -> bool:
  return key_group(key) == "frozen"


def _describe(changes) -> str:
  return "; ".join(f"{k}: changed from {a!r} to {b!r}" for k, a, b in changes)


# ----------------------------------------------------------------------------- state trees


def _flat_target(abstract_state) -> dict[tuple, Any]:
  return ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))


def _leaf_sig(leaf):
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  return (tuple(shape) if shape is not None else None,
          str(jax.numpy.dtype(dtype)) if dtype is not None else None)


def tree_differences(saved: dict[tuple, Any], current: dict[tuple, Any], *, only=None
                     ) -> list[str]:
  """Readable differences between two flat trees of arrays (missing, extra, shape, dtype)."""
  def keep(k):
    return only is None or (k and k[0] in only)
  name = lambda k: ".".join(str(p) for p in k)
  out = []
  for k in sorted(set(current) - set(saved), key=name):
    if keep(k) and _leaf_sig(current[k])[0] is not None:
      out.append(f"{name(k)}: in this model {_leaf_sig(current[k])[0]} but not in the checkpoint")
  for k in sorted(set(saved) - set(current), key=name):
    if keep(k) and _leaf_sig(saved[k])[0] is not None:
      out.append(f"{name(k)}: in the checkpoint {_leaf_sig(saved[k])[0]} but not in this model")
  for k in sorted(set(saved) & set(current), key=name):
    if not keep(k):
      continue
    (s_shape, s_dtype), (c_shape, c_dtype) = _leaf_sig(saved[k]), _leaf_sig(current[k])
    if s_shape is None or c_shape is None:
      continue
    if s_shape != c_shape:
      out.append(f"{name(k)}: shape {s_shape} in the checkpoint, {c_shape} in this model")
    elif s_dtype and c_dtype and s_dtype != c_dtype:
      out.append(f"{name(k)}: dtype {s_dtype} in the checkpoint, {c_dtype} in this model")
  return out


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
                     current_config: dict | None = None) -> Restored | None:
    """The newest readable checkpoint (or `step`), restored onto `shardings`.

    None when the workdir has no checkpoint. A checkpoint that cannot be read is skipped
    (and, unless read-only, moved aside once an older one restored); if none can be read,
    CheckpointError, with nothing moved. `check_config(saved_config, step)` runs before any
    array is read and raises on changes that cannot be honoured; a saved state whose tree
    differs from `abstract_state` is refused (ConfigError, naming the changed keys), never
    taken for damage. `apply_data(data_state)` repositions the data iterator: a failure
    there is damage too (a ConfigError from it is a refusal).
    """
    from peer_jax.config_validation import ConfigError
    target = _abstract_with_shardings(abstract_state, shardings)
    flat_target = _flat_target(abstract_state)
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
      differences = tree_differences(saved_tree, flat_target)
      if differences:
        raise ConfigError(_structure_message(differences, config, current_config, s,
                                             self.directory))
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        data_state = _my_data_state(out.data)
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
      return Restored(s, out.state, data_state, config)
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


def _structure_message(differences, saved_cfg, current_cfg, step, directory) -> str:
  changed = config_changes(saved_cfg, current_cfg) if current_cfg is not None else []
  suspects = [c for c in changed if key_group(c[0]) == "optimizer"] or \
      [c for c in changed if key_group(c[0]) != "applied"]
  what = "optimizer state" if all(d.startswith("opt_state") for d in differences) else "state"
  more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
  cause = (_describe(suspects) + "; with this change, " if suspects else
           "no config key that shapes it changed (was the code changed?), but ")
  return (f"{cause}the {what} saved in checkpoint {step} in {directory} does not match the "
          f"one this config builds ({differences[0]}{more}); change it back to resume, "
          "or start a new --workdir with checkpoint.init_from to keep the parameters")


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


def restore_params(path: str, abstract_state, shardings):
  """Params and model state of the newest readable checkpoint under `path` (a workdir or
  its checkpoints/ folder), for starting a new run from them (checkpoint.init_from).

  Refuses (CheckpointError naming the parameter and both shapes) a checkpoint of a model
  of another shape; reads only: nothing of the other run is moved or changed."""
  path = resolve_path(path)
  directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else \
      os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint.init_from: no checkpoints folder at {directory}")
  manager = _manager(directory, read_only=True)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"checkpoint.init_from: no complete checkpoint in {directory}")
  wanted = ("params", "model_state")
  flat_target = _flat_target({k: getattr(abstract_state, k) for k in wanted})
  target = _abstract_with_shardings(abstract_state, shardings)
  target = {"params": target.params, "model_state": target.model_state}
  problems = []
  try:
    for step in steps:
      try:
        saved = ocp.tree.to_flat_dict(manager.item_metadata(step)["state"])
      except Exception as e:  # noqa: BLE001
        problems.append(f"{step}: {_first_line(e)}")
        continue
      differences = tree_differences(saved, flat_target, only=wanted)
      if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise CheckpointError(
            f"checkpoint.init_from: checkpoint {step} in {directory} is of another model: "
            f"{differences[0]}{more}; init_from needs the same model shape")
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, partial_restore=True)))
      except Exception as e:  # noqa: BLE001
        problems.append(f"{step}: {_first_line(e)}")
        continue
      if problems:
        _warn(f"checkpoint.init_from: skipped unreadable checkpoints in {directory} "
              f"({'; '.join(problems)}); using checkpoint {step}")
      return step, restored.state["params"], restored.state["model_state"]
  finally:
    manager.close()
  raise CheckpointError(f"checkpoint.init_from: no readable checkpoint in {directory} "
                        f"({'; '.join(problems)})")


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


def load_run(workdir: str, step: int | None = None):
  """(config, Trainer, TrainState) of a run's latest readable (or given) checkpoint, on this
  host's devices: what evaluation and sampling start from. Reads only: a damaged
  checkpoint is skipped with a warning, never moved."""
  import ml_collections
  from peer_jax.train import Trainer
  workdir = resolve_path(workdir)
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{workdir} holds no run (no config.json); train one with "
                          "scripts/train.py --workdir=...")
  try:
    with open(config_path) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {config_path}: {_first_line(e)}") from None
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1  # whatever devices are here
  trainer = Trainer.build(cfg)
  ckpt = Checkpointer(workdir, cfg.checkpoint, read_only=True)
  try:
    restored = ckpt.restore_latest(trainer.abstract_state, trainer.state_shardings, step=step)
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"no complete checkpoint in {ckpt.directory}")
  return cfg, trainer, restored.state
