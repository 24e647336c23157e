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
from peer_jax.checkpoint import (Checkpointer, config_changes, is_frozen, restore_params)
from peer_jax.config_validation import ConfigError, validate_config
from peer_jax.data import Tokenizer, global_batch, make_train_iterator
from peer_jax.metrics import MetricWriter, Progress
from peer_jax.model import Transformer
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
  sizes = {"peer": model_cfg.peer.num_experts, "pkm": model_cfg.pkm.num_memories}
  out = {}
  for block, block_aux in aux.items():
    if "expert_indices" in block_aux and model_cfg.ffw in sizes:
      stats = expert_stats.expert_stats(block_aux, sizes[model_cfg.ffw])
      for name, value in stats.items():
        out[f"experts/{block}/{name}"] = value
  return out


def make_train_step(graphdef, tx, schedule, cfg):
  accum = cfg.train.grad_accum_steps
  model_cfg = cfg.model

  def loss_fn(params, model_state, batch, scale):
    loss_sum, count, aux, new_model_state = _forward(graphdef, params, model_state, batch, True)
    return loss_sum * scale(count), (loss_sum, count, new_model_state,
                                     expert_metrics(aux, model_cfg))

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
  loss = float(metrics["train/loss"])
  if not math.isfinite(loss):
    raise TrainingDiverged(
        f"train/loss is {loss} at step {step}: training diverged. Lower train.learning_rate, "
        f"raise train.warmup_steps, or keep train.grad_clip > 0.")


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

  The flag is only read at step boundaries; on several processes they agree on it, so all
  of them stop after the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
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


def _truncate_metrics(path: str, after_step: int) -> None:
  """Drop records past the restored step: the resumed run writes them again, identically."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= after_step]
  if len(keep) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)


def resume_or_init(cfg, trainer: Trainer, ckpt: Checkpointer, data, progress_message
                   ) -> TrainState:
  """The latest good checkpoint of this workdir, else checkpoint.init_from, else fresh init."""
  current = json.loads(cfg.to_json_best_effort())

  def refuse_frozen_changes(saved: dict, step: int) -> None:
    frozen = [c for c in config_changes(saved, current) if is_frozen(c[0])]
    if frozen:
      raise ConfigError("; ".join(f"{k}: changed from {a!r} to {b!r}" for k, a, b in frozen)
                        + f" since checkpoint {step} in {ckpt.directory}; these cannot "
                        "change on resume (use a new --workdir, or checkpoint.init_from to start "
                        "from its parameters)")

  restored = ckpt.restore_latest(trainer.abstract_state, trainer.state_shardings,
                                 check_config=refuse_frozen_changes)
  if restored is not None:
    for key, old, new in config_changes(restored.config, current):
      progress_message(f"config change on resume: {key}: {old!r} -> {new!r}")
    if restored.data_state is not None:
      data.set_state(restored.data_state)
    progress_message(f"resumed from checkpoint {restored.step} in {ckpt.directory}")
    return restored.state
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


def train_and_evaluate(cfg, workdir: str) -> dict[str, float]:
  """Train `cfg` in `workdir`, resuming from its latest checkpoint; returns the last metrics."""
  tokenizer = prepare(cfg)
  ckpt = Checkpointer(workdir, cfg.checkpoint)  # fails now if the workdir is not writable
  # Data next: a bad file or dataset fails here, before anything is compiled.
  data = make_train_iterator(cfg.data, tokenizer, batch_size=cfg.train.batch_size,
                             seq_len=cfg.train.seq_len, seed=cfg.seed)
  eval_sets = evaluation.load_eval_sets(cfg, tokenizer)  # read once, scored every eval
  trainer = Trainer.build(cfg)
  progress = Progress(cfg.train.steps)
  state = resume_or_init(cfg, trainer, ckpt, data, progress.message)
  start_step = int(state.step)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  # MFU counts model FLOPs only (3x forward), not remat's recomputation.
  train_flops_per_token = 3 * flops.flops_per_token(cfg.model, cfg.train.seq_len)["total"]
  peak_flops = flops.device_peak_flops()
  active_params = flops.param_counts(cfg.model)["active"]
  eval_sets = {name: s.on_device(trainer.batch_sharding) for name, s in eval_sets.items()}
  evaluator = evaluation.Evaluator(trainer)

  writer = MetricWriter(workdir)
  _truncate_metrics(writer.path, start_step)
  total = cfg.train.steps
  progress.restart_clock(start_step)
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

  def save(step, force=False) -> None:
    jax.block_until_ready(state.step)  # the step's own compute is not checkpoint time
    t0 = time.perf_counter()
    ckpt.save(step, state, data.get_state(), config_dict, force=force)
    interval["excluded"] += time.perf_counter() - t0

  step = start_step
  with trainer.mesh, Preemption() as preemption:
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
      if ckpt.should_save(step) or step == total:
        save(step, force=step == total)
      if preemption.agreed():
        finish(*pending)
        pending = None
        if not ckpt.should_save(step) and step != total:
          save(step, force=True)
        ckpt.close()
        progress.message(f"stopped by SIGTERM after step {step}; checkpoint saved in "
                         f"{ckpt.directory}. Run the same command again to resume.")
        writer.close()
        return last_logged
    if pending is not None:
      finish(*pending)
  ckpt.close()
  writer.close()
  progress.message(f"done: {total} steps; metrics in {writer.path}, TensorBoard logs in "
                   f"{os.path.join(workdir, 'tensorboard')}, checkpoints in {ckpt.directory}")
  return last_logged
