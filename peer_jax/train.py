"""Train state, the jitted train step and the host loop (evaluation: peer_jax/evaluate.py).

The state is a pytree (`TrainState`) of arrays and nnx.State objects, so Orbax can save
it as is. One `jax.jit` with explicit in/out shardings and donated state does a whole
optimizer step, including gradient accumulation over microbatches (`lax.scan`). The host
loop dispatches step n before fetching step n-1's metrics, so logging never stalls the
device.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import evaluate as evaluation
from peer_jax import flops, sharding
from peer_jax.checkpoint import (Checkpointer, CheckpointError, check_writable, config_changes, key_group,
                                 resolve_path, restore_params)
from peer_jax.config_validation import ConfigError, validate_config
from peer_jax.data import Tokenizer, global_batch, make_train_iterator
from peer_jax.metrics import MetricWriter, Progress
from peer_jax.model import Transformer
from peer_jax.workdir_lock import WorkdirError, WorkdirLock
from peer_jax.optim import learning_rate_schedule, make_optimizer  # noqa: F401 (re-exported)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of Params
  opt_state: Any
  model_state: Any  # nnx.State of everything else (e.g. batch-norm running statistics)


class TrainingDiverged(RuntimeError):
  """The loss became NaN or Inf."""


# ----------------------------------------------------------------------------- state


@dataclasses.dataclass
class Trainer:
  """Everything built from a config: mesh, model definition, optimizer, shardings, steps."""
  cfg: Any
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  abstract_state: TrainState

  @classmethod
  def build(cls, cfg, devices=None) -> "Trainer":
    mesh = sharding.make_mesh(dict(cfg.mesh), devices)
    tx, schedule = make_optimizer(cfg.train, cfg.model)
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
        opt_state=jax.eval_shape(tx.init, abs_params), model_state=abs_rest)
    rules = tuple(cfg.sharding.rules)
    state_shardings = TrainState(
        step=NamedSharding(mesh, P()),
        params=sharding.tree_shardings(abs_params, mesh, rules),
        opt_state=sharding.tree_shardings(abstract_state.opt_state, mesh, rules),
        model_state=sharding.tree_shardings(abs_rest, mesh, rules))
    return cls(cfg, mesh, graphdef, tx, schedule, state_shardings, abstract_state)

  def init_state(self) -> TrainState:
    """Initialise parameters directly in their shardings (no host copy of the full model)."""
    cfg, tx = self.cfg, self.tx

    def init():
      model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
      _, params, rest = nnx.split(model, nnx.Param, ...)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params), model_state=rest)

    with self.mesh:
      return jax.jit(init, out_shardings=self.state_shardings)()

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return sharding.batch_sharding(self.mesh, ndim)

  @functools.cached_property
  def train_step(self) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    # Traced inside the rules context: activation constraints and the D-sharded expert bank
    # apply on a multi-device mesh (no-ops on one device).
    step_fn = sharding.with_rules(make_train_step(self.graphdef, self.tx, self.schedule, self.cfg),
                                  self.mesh, tuple(self.cfg.sharding.rules))
    batch_shardings = {k: self.batch_sharding(2) for k in BATCH_KEYS}
    return jax.jit(step_fn, in_shardings=(self.state_shardings, batch_shardings),
                   out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
                   donate_argnums=0)


BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask")


# ----------------------------------------------------------------------------- steps


def cross_entropy_sum(logits_BTV, targets_BT, mask_BT):
  """Sum of masked token losses in f32, and the number of tokens that counted."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum((logz_BT - target_logit_BT) * mask_BT), jnp.sum(mask_BT)


def _forward(graphdef, params, model_state, batch, train: bool):
  # copy=True: the merged module is updated in place (batch-norm statistics) inside jit.
  model = nnx.merge(graphdef, params, model_state, copy=True)
  logits, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"], train=train)
  loss_sum, count = cross_entropy_sum(logits, batch["targets"], batch["mask"])
  _, _, new_model_state = nnx.split(model, nnx.Param, ...)
  return loss_sum, count, aux, new_model_state


def expert_metrics(aux: dict, model_cfg) -> dict[str, jax.Array]:
  """Per-step expert usage and unevenness of every layer that retrieves experts."""
  from peer_jax import expert_stats
  pools = expert_stats.expert_pools(model_cfg)
  out = {}
  for block, block_aux in aux.items():
    for name in ("dropped_fraction", "load_balance_loss"):  # MoE routing
      if name in block_aux:
        out[f"moe/{block}/{name}"] = block_aux[name].astype(jnp.float32)
    if "expert_indices" in block_aux and block in pools:
      stats = expert_stats.expert_stats(block_aux, pools[block])
      for name, value in stats.items():
        out[f"experts/{block}/{name}"] = value
  return out


def make_train_step(graphdef, tx, schedule, cfg):
  accum = cfg.train.grad_accum_steps
  model_cfg = cfg.model

  def loss_fn(params, model_state, batch, scale):
    loss_sum, count, aux, new_model_state = _forward(graphdef, params, model_state, batch, True)
    # Auxiliary losses (MoE load balancing) are per-token means: weighting them by the token
    # count keeps them per-token means after the division by the batch's count.
    aux_loss = sum((a["aux_loss"] for a in aux.values() if "aux_loss" in a),
                   jnp.zeros((), jnp.float32))
    objective = (loss_sum + aux_loss * jax.lax.stop_gradient(count)) * scale(count)
    return objective, (loss_sum, count, new_model_state, expert_metrics(aux, model_cfg))

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def token_mean_grads(state, batch):
    """Gradient of the mean token loss over the whole batch, in one pass or A microbatches."""
    if accum == 1:
      # Dividing inside the loss scales the backward's seed: no extra pass over the gradients
      # (which matters when they include 2·N·D expert-table entries).
      per_token = lambda count: 1.0 / jax.lax.stop_gradient(jnp.maximum(count, 1.0))
      grads, (loss_sum, count, model_state, stats) = grad_fn(
          state.params, state.model_state, batch, per_token)
      return grads, loss_sum, count, model_state, stats
    # Microbatch a takes rows a, a+A, a+2A, ...: every microbatch stays spread over all
    # data-parallel devices instead of living on a 1/A slice of them.
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def one_microbatch(carry, mb):
      grads_acc, loss_acc, count_acc, model_state = carry
      grads, (loss_sum, count, model_state, stats) = grad_fn(
          state.params, model_state, mb, lambda count: 1.0)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, loss_acc + loss_sum, count_acc + count, model_state), stats

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), state.model_state)
    (grads, loss_sum, count, model_state), stats = jax.lax.scan(one_microbatch, init, micro)
    # Sum-then-divide makes A microbatches of B/A exactly the gradient of one batch of B.
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    stats = {k: jnp.mean(v) for k, v in stats.items()}
    return grads, loss_sum, count, model_state, stats

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    grads, loss_sum, count, model_state, stats = token_mean_grads(state, batch)
    denom = jnp.maximum(count, 1.0)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss_sum / denom,
        "train/grad_norm": grad_norm,
        "train/learning_rate": schedule(state.step),
        "train/tokens": count,
        **stats,
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           model_state=model_state)
    return new_state, metrics

  return train_step


def check_finite(step: int, metrics: dict) -> None:
  """TrainingDiverged if the step's loss or gradient norm is NaN or Inf."""
  for key in ("train/loss", "train/grad_norm"):
    if key not in metrics:
      continue
    value = float(metrics[key])
    if not math.isfinite(value):
      raise TrainingDiverged(
          f"{key} is {value} at step {step}: training diverged. Lower train.learning_rate, "
          f"raise train.warmup_steps, or keep train.grad_clip > 0.")


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def prepare(cfg) -> Tokenizer:
  """Validate the config and its files; fail before anything is compiled."""
  validate_config(cfg, num_devices=jax.device_count())
  tokenizer = Tokenizer(cfg.data.tokenizer, add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(
        f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
        f"pieces of data.tokenizer ({cfg.data.tokenizer})")
  return tokenizer


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


class StoppedBeforeTraining(Exception):
  """SIGTERM during start-up: nothing new to save; the run resumes when started again."""


def _truncate_metrics(path: str, after_step: int, warn=None) -> None:
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


def resume_or_init(cfg, trainer: Trainer, ckpt: Checkpointer, data, progress_message
                   ) -> TrainState:
  """The latest good checkpoint of this workdir, else checkpoint.init_from, else fresh init.

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


def describe_changes(changes) -> str:
  return "; ".join(f"{k}: changed from {a!r} to {b!r}" for k, a, b in changes)


def _write_text(path: str, text: str) -> None:
  """Write a small file atomically; WorkdirError (exit 4) if it cannot be written."""
  try:
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  except OSError as e:
    err = WorkdirError(f"cannot write {path}: {e.strerror or e}")
    err.exit_code = 4
    raise err from None


def train_and_evaluate(cfg, workdir: str) -> dict[str, float]:
  """Train `cfg` in `workdir`, resuming from its latest checkpoint; returns the last metrics.

  Every exit settles the checkpoint in flight: a return (done, SIGTERM), divergence, a
  write failure, Ctrl-C or any other error (docs/checkpointing.md).
  """
  workdir = resolve_path(workdir)
  with Preemption() as preemption:
    tokenizer = prepare(cfg)
    check_writable(workdir)
    lock = WorkdirLock(workdir, enabled=jax.process_index() == 0)
    with lock:
      try:
        return _train(cfg, workdir, tokenizer, preemption)
      except StoppedBeforeTraining as e:
        Progress(cfg.train.steps).message(str(e))
        return {}


def _train(cfg, workdir, tokenizer, preemption) -> dict[str, float]:
  def stop_if_requested(phase: str, step: int | None = None) -> None:
    if preemption.agreed():
      raise StoppedBeforeTraining(
          f"stopped by SIGTERM during {phase}, before training; nothing new to save"
          + (f" (latest checkpoint: {step})" if step else "")
          + ". Run the same command again to resume.")

  ckpt = Checkpointer(workdir, cfg.checkpoint)  # fails now if the workdir is not writable
  try:
    # Data next: a bad file or dataset fails here, before anything is compiled.
    data = make_train_iterator(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                               seq_len=cfg.train.seq_len, seed=cfg.seed)
    eval_sets = evaluation.load_eval_sets(cfg, tokenizer)  # read once, scored every eval
    stop_if_requested("start-up")
    trainer = Trainer.build(cfg)
    progress = Progress(cfg.train.steps)
    state = resume_or_init(cfg, trainer, ckpt, data, progress.message)
    start_step = int(state.step)
    stop_if_requested("the restore", start_step)
  except BaseException:
    ckpt.abort()
    raise
  try:
    return _loop(cfg, workdir, trainer, ckpt, data, eval_sets, progress, state, start_step,
                 preemption)
  except KeyboardInterrupt:
    problem = ckpt.abort()
    latest = ckpt._latest_complete()
    raise KeyboardInterrupt(
        f"stopped by Ctrl-C; the latest checkpoint is {latest} in {ckpt.directory}"
        + (f" ({problem})" if problem else "")
        + ". Run the same command again to resume.") from None
  except BaseException:
    ckpt.abort()  # the exception in hand is the one to report
    raise


def _loop(cfg, workdir, trainer, ckpt, data, eval_sets, progress, state, start_step,
          preemption):
  if jax.process_index() == 0:
    _write_text(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  # MFU counts model FLOPs only (3x forward), not remat's recomputation.
  train_flops_per_token = 3 * flops.flops_per_token(cfg.model, cfg.train.seq_len)["total"]
  peak_flops = flops.device_peak_flops()
  active_params = flops.param_counts(cfg.model)["active"]
  eval_sets = {name: s.on_device(trainer.batch_sharding) for name, s in eval_sets.items()}
  evaluator = evaluation.Evaluator(trainer)

  writer = MetricWriter(workdir)
  _truncate_metrics(writer.path, start_step,
                    warn=lambda m: print(m, file=sys.stderr, flush=True))
  total = cfg.train.steps
  progress.restart_clock(start_step)
  if start_step >= total:
    ckpt.close()
    writer.close()
    progress.message(f"done: checkpoint {start_step} in {ckpt.directory} already reached "
                     f"train.steps={total}; nothing to train")
    return {}
  progress.message(
      f"peer_jax: {num_params / 1e6:.2f}M parameters ({active_params / 1e6:.2f}M active per "
      f"token), model.ffw={cfg.model.ffw}, mesh {dict(trainer.mesh.shape)}, steps "
      f"{start_step + 1}..{total} of {cfg.train.batch_size}x{cfg.train.seq_len} tokens; "
      f"writing to {workdir}")
  config_dict = json.loads(cfg.to_json_best_effort())

  pending = None  # (step, metrics still on device) of the step dispatched before
  eval_results: dict[int, dict[str, float]] = {}
  last_logged: dict[str, float] = {}
  interval = {"tokens": 0.0, "t0": time.perf_counter(), "data_wait": 0.0, "excluded": 0.0}

  def finish(step, device_metrics) -> None:
    nonlocal last_logged
    metrics = jax.device_get(device_metrics)
    check_finite(step, metrics)
    interval["tokens"] += float(metrics["train/tokens"])
    if step % cfg.train.log_every == 0 or step == total or step in eval_results:
      elapsed = time.perf_counter() - interval["t0"] - interval["excluded"]
      scalars = {k: float(v) for k, v in metrics.items() if k != "train/tokens"}
      scalars["train/tokens_per_sec"] = interval["tokens"] / max(elapsed, 1e-9)
      scalars["train/mfu"] = flops.mfu(scalars["train/tokens_per_sec"], train_flops_per_token,
                                       peak_flops, jax.device_count())
      scalars["train/data_wait_sec"] = interval["data_wait"]
      scalars.update(eval_results.pop(step, {}))
      writer.write(step, scalars)
      progress.print(step, scalars)
      last_logged = {"step": step, **scalars}
      interval.update(tokens=0.0, t0=time.perf_counter(), data_wait=0.0, excluded=0.0)
    if step == start_step + 1:
      # The first step compiled: keep it out of throughput and ETA.
      progress.restart_clock(step)
      interval.update(tokens=0.0, t0=time.perf_counter(), data_wait=0.0, excluded=0.0)

  def run_eval(step) -> None:
    jax.block_until_ready(state.step)  # the step's own compute is not eval time
    t0 = time.perf_counter()
    eval_results[step] = evaluator.evaluate_sets(state, eval_sets)
    interval["excluded"] += time.perf_counter() - t0

  def save(step) -> None:
    """Checkpoint `step`, after checking that it is finite: a NaN never reaches a checkpoint."""
    nonlocal pending
    if pending is not None:
      finish(*pending)  # this step's loss and gradient norm (TrainingDiverged if not finite)
      pending = None
    t0 = time.perf_counter()
    if not bool(_all_finite((state.params, state.opt_state))):
      raise TrainingDiverged(
          f"the parameters or optimizer state are NaN or Inf after step {step}: training "
          f"diverged; checkpoint {step} was not written (latest: {ckpt._latest_complete()}). "
          "Lower train.learning_rate, raise train.warmup_steps, or keep train.grad_clip > 0.")
    ckpt.save(step, state, data.get_state(), config_dict)
    interval["excluded"] += time.perf_counter() - t0

  step = start_step
  with trainer.mesh:
    for step in range(start_step + 1, total + 1):
      t0 = time.perf_counter()
      batch = global_batch(next(data), trainer.batch_sharding)
      interval["data_wait"] += time.perf_counter() - t0
      state, metrics = trainer.train_step(state, batch)
      if pending is not None:
        finish(*pending)
      pending = (step, metrics)
      if eval_sets and (step % cfg.train.eval_every == 0 or step == total):
        run_eval(step)
      stopping = step != total and preemption.agreed()
      if ckpt.should_save(step) or step == total or stopping:
        save(step)
      if stopping:
        ckpt.close()
        writer.close()
        progress.message(f"stopped by SIGTERM after step {step}; checkpoint saved in "
                         f"{ckpt.directory}. Run the same command again to resume.")
        return last_logged
    if pending is not None:
      finish(*pending)
  ckpt.close()
  writer.close()
  progress.message(f"done: {total} steps; metrics in {writer.path}, TensorBoard logs in "
                   f"{os.path.join(workdir, 'tensorboard')}, checkpoints in {ckpt.directory}")
  return last_logged
