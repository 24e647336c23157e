"""Start or continue a run in its workdir: resume checks, the restore, init_from.

`resume_or_init` takes the workdir's latest good checkpoint (refusing config changes that
cannot be honoured: peer_jax.resume_checks), else checkpoint.init_from's parameters, else a
fresh init. `truncate_metrics` cuts metrics.jsonl back to the restored step.
"""

import json
import os

import jax

from peer_jax.checkpoint import Checkpointer, CheckpointError
from peer_jax.config_validation import ConfigError
from peer_jax.resume_checks import config_changes, describe_changes, key_group
from peer_jax.run import restore_params


def truncate_metrics(path: str, after_step: int, warn=None) -> None:
  """Drop records past the restored step (the resumed run writes them again, identically),
  and a torn line (a kill or a full disk mid-write), so a resume never fails on them."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path, "rb") as f:
    raw = f.read()
  keep, torn = [], []
  lines = raw.split(b"\n")
  for n, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line.decode("utf-8"))
      if not isinstance(record, dict):
        raise ValueError("not an object")
    except ValueError:
      torn.append(n + 1)
      continue
    if record.get("step", 0) <= after_step:
      keep.append(line + b"\n")
  if torn and warn is not None:
    warn(f"warning: metrics: dropped {len(torn)} unreadable line(s) of {path} (line "
         f"{', '.join(map(str, torn[:5]))}: cut off mid-write)")
  new = b"".join(keep)
  if new != raw:
    with open(path + ".tmp", "wb") as f:
      f.write(new)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def resume_or_init(cfg, trainer, ckpt: Checkpointer, data, progress_message):
  """The TrainState of the latest good checkpoint of this workdir, else checkpoint.init_from,
  else a fresh init (`trainer`: a train.Trainer).

  A workdir whose checkpoints are all unreadable stops with CheckpointError (never a fresh
  start on top of a run); config changes that cannot be honoured stop with ConfigError.
  """
  current = json.loads(cfg.to_json_best_effort())

  def refuse_frozen_changes(saved: dict, step: int) -> None:
    frozen = [c for c in config_changes(saved, current) if key_group(c[0]) == "frozen"]
    if frozen:
      raise ConfigError(describe_changes(frozen)
                        + f" since checkpoint {step} in {ckpt.directory}; these cannot "
                        "change on resume (use a new --workdir, or checkpoint.init_from to start "
                        "from its parameters)")

  def apply_data(data_state) -> None:
    if data_state is None:
      return
    now = data.get_state()
    if isinstance(data_state, dict) and isinstance(now, dict) and \
        data_state.get("format") == now.get("format") and \
        "fingerprint" in data_state and data_state["fingerprint"] != now.get("fingerprint"):
      saved_fp, now_fp = data_state["fingerprint"], now.get("fingerprint")
      if isinstance(saved_fp, dict) and isinstance(now_fp, dict):
        diff = ", ".join(f"{k}: {saved_fp.get(k)!r} -> {now_fp.get(k)!r}"
                         for k in sorted(set(saved_fp) | set(now_fp))
                         if saved_fp.get(k) != now_fp.get(k))
      else:
        diff = f"{saved_fp!r} -> {now_fp!r}"
      raise ConfigError(f"data: the training data pipeline changed since the checkpoint "
                        f"({diff}); the data stream cannot resume (change data.* back, or "
                        "use a new --workdir)")
    data.set_state(data_state)

  restored = ckpt.restore_latest(trainer.abstract_state, trainer.state_shardings,
                                 check_config=refuse_frozen_changes, apply_data=apply_data,
                                 current_config=current)
  if restored is not None:
    if restored.step > cfg.train.steps:
      raise ConfigError(f"train.steps: {cfg.train.steps} is below the step of checkpoint "
                        f"{restored.step} in {ckpt.directory}: this run is already past it "
                        f"(raise train.steps to continue it, or use a new --workdir)")
    for key, old, new in config_changes(restored.config, current):
      progress_message(f"config change on resume: {key}: {old!r} -> {new!r}")
    progress_message(f"resumed from checkpoint {restored.step} in {ckpt.directory}")
    return restored.state
  damaged = os.listdir(ckpt.damaged_dir) if os.path.isdir(ckpt.damaged_dir) else []
  if damaged:
    raise CheckpointError(
        f"{ckpt.directory} holds no checkpoint, but {ckpt.damaged_dir} holds {len(damaged)} "
        "damaged one(s): this workdir has a run, which is not started over from step 1; "
        "move a repaired checkpoint back, or use a new --workdir")
  state = trainer.init_state()
  if cfg.checkpoint.init_from:
    step, params, model_state = restore_params(cfg.checkpoint.init_from, trainer.abstract_state,
                                               trainer.state_shardings)
    # A fresh optimizer and step counter around the other run's weights.
    state = state.replace(params=params, model_state=model_state,
                          opt_state=jax.jit(trainer.tx.init,
                                            out_shardings=trainer.state_shardings.opt_state)(params))
    progress_message(f"initialised parameters from {cfg.checkpoint.init_from} (step {step})")
  return state
