"""Train state, the jitted train step, and a training run (the host loop: peer_jax/loop.py).

The state is a pytree (`TrainState`) of arrays and nnx.State objects, so Orbax can save
it as is. One `jax.jit` with explicit in/out shardings and donated state does a whole
optimizer step, including gradient accumulation over microbatches (`lax.scan`).
`train_and_evaluate` sets a run up (config checks, data, restore: peer_jax/resume.py) and
hands its steps to `loop.run_steps` with the hooks of `run_hooks` (evaluation:
peer_jax/evaluate.py; checkpoints: peer_jax/checkpoint.py), which the benchmark uses too.
"""

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import evaluate as evaluation
from peer_jax import flops, loop, schedules, sharding
from peer_jax.checkpoint import Checkpointer, check_writable, resolve_path
from peer_jax.config_validation import ConfigError, validate_config
from peer_jax.data import Tokenizer, global_batch, make_train_iterator
from peer_jax.loop import Preemption, TrainingDiverged, check_finite  # noqa: F401 (re-exported)
from peer_jax.metrics import MetricWriter, Progress
from peer_jax.resume import resume_or_init, truncate_metrics
from peer_jax.model import Transformer
from peer_jax.run import Model
from peer_jax.workdir_lock import WorkdirError, WorkdirLock
from peer_jax.optim import learning_rate_schedule, make_optimizer  # noqa: F401 (re-exported)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nnx.State of Params
  opt_state: Any
  model_state: Any  # nnx.State of everything else (e.g. batch-norm running statistics)


# ----------------------------------------------------------------------------- state


@dataclasses.dataclass
class Trainer:
  """Everything built from a config: mesh, model definition, optimizer, shardings, steps."""
  cfg: Any
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation  # for the state's init and structure; the step builds its own
  state_shardings: TrainState
  abstract_state: TrainState

  @classmethod
  def build(cls, cfg, devices=None) -> "Trainer":
    model = Model.build(cfg, devices)  # mesh, graphdef, parameter shardings (peer_jax/run.py)
    tx, _ = make_optimizer(cfg.train, cfg.model)
    abs_params, abs_rest = model.abstract_state.params, model.abstract_state.model_state
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
        opt_state=jax.eval_shape(tx.init, abs_params), model_state=abs_rest)
    state_shardings = TrainState(
        step=NamedSharding(model.mesh, P()), params=model.state_shardings.params,
        opt_state=sharding.tree_shardings(abstract_state.opt_state, model.mesh,
                                          tuple(cfg.sharding.rules)),
        model_state=model.state_shardings.model_state)
    return cls(cfg, model.mesh, model.graphdef, tx, state_shardings, abstract_state)

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
  def train_step(self) -> "BoundStep":
    # Traced inside the rules context: activation constraints and the D-sharded expert bank
    # apply on a multi-device mesh (no-ops on one device).
    step_fn = sharding.with_rules(make_train_step(self.graphdef, self.cfg),
                                  self.mesh, tuple(self.cfg.sharding.rules))
    batch_shardings = {k: self.batch_sharding(2) for k in BATCH_KEYS}
    replicated = NamedSharding(self.mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(self.state_shardings, batch_shardings, replicated),
                     out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    return BoundStep(jitted, schedules.schedule_inputs(self.cfg.train), replicated)


class BoundStep:
  """The jitted step with this run's schedule inputs bound: `step(state, batch)`.

  The schedule's numbers are arguments of the program, not constants in it, so runs that
  differ only in LR, warmup or length share one compiled step (peer_jax/schedules.py)."""

  def __init__(self, jitted, schedule_inputs: dict, sharding: NamedSharding):
    self.jitted, self.schedule_inputs, self._sharding = jitted, schedule_inputs, sharding
    self._on_device = None  # placed on first call: `lower` alone works on compile-only devices

  def __call__(self, state, batch):
    if self._on_device is None:
      self._on_device = {k: jax.device_put(v, self._sharding)
                         for k, v in self.schedule_inputs.items()}
    return self.jitted(state, batch, self._on_device)

  def lower(self, state, batch):
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._sharding)
                for k, v in self.schedule_inputs.items()}
    return self.jitted.lower(state, batch, abstract)


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


def expert_metrics(aux: dict, model_cfg, usage: bool = True) -> dict[str, jax.Array]:
  """Per-step MoE routing metrics, and (usage=True) the expert usage and unevenness of
  every layer that retrieves experts."""
  from peer_jax import expert_stats
  pools = expert_stats.expert_pools(model_cfg) if usage else {}
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


def make_train_step(graphdef, cfg):
  """train_step(state, batch, schedule_inputs) -> (state, metrics); the optimizer is built
  inside, from the traced schedule inputs (its state's structure does not depend on them)."""
  accum = cfg.train.grad_accum_steps
  model_cfg = cfg.model

  def loss_fn(params, model_state, batch, scale):
    loss_sum, count, aux, new_model_state = _forward(graphdef, params, model_state, batch, True)
    # Auxiliary losses (MoE load balancing) are per-token means: weighting them by the token
    # count keeps them per-token means after the division by the batch's count.
    aux_loss = sum((a["aux_loss"] for a in aux.values() if "aux_loss" in a),
                   jnp.zeros((), jnp.float32))
    objective = (loss_sum + aux_loss * jax.lax.stop_gradient(count)) * scale(count)
    return objective, (loss_sum, count, new_model_state, expert_metrics(aux, model_cfg, cfg.train.expert_stats))

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

  def train_step(state: TrainState, batch: dict, schedule_inputs: dict
                 ) -> tuple[TrainState, dict]:
    tx, schedule = make_optimizer(cfg.train, model_cfg, schedule_inputs)
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


def prepare(cfg) -> Tokenizer:
  """Validate the config and its files; fail before anything is compiled."""
  validate_config(cfg, num_devices=jax.device_count())
  tokenizer = Tokenizer(cfg.data.tokenizer, add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(
        f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} "
        f"pieces of data.tokenizer ({cfg.data.tokenizer})")
  return tokenizer


# ----------------------------------------------------------------------------- a run


class StoppedBeforeTraining(Exception):
  """SIGTERM during start-up: nothing new to save; the run resumes when started again."""


def run_hooks(cfg, trainer: Trainer, ckpt: Checkpointer | None, data, eval_sets
              ) -> list[loop.Hook]:
  """A run's hooks: evaluation of `eval_sets` (on device) every train.eval_every steps and
  at the last; a checkpoint every checkpoint.every steps, at the last and on a SIGTERM,
  after checking the step's metrics and state are finite (a NaN never reaches one)."""
  hooks = []
  if eval_sets:
    evaluator = evaluation.Evaluator(trainer)
    hooks.append(loop.Hook("eval", lambda step, state: evaluator.evaluate_sets(state, eval_sets),
                           every=cfg.train.eval_every))
  if ckpt is not None:
    config_dict = json.loads(cfg.to_json_best_effort())
    hooks.append(loop.Hook(
        "save", lambda step, state: ckpt.save(step, state, data.get_state(), config_dict),
        every=ckpt.every, on_stop=True, finish_first=True,
        finite_state=lambda state: (state.params, state.opt_state),
        not_done=lambda step: (f"checkpoint {step} was not written (latest: "
                               f"{ckpt._latest_complete()})")))
  return hooks


def run_logging(cfg, writer, progress) -> loop.Logging:
  """Where a run's finished steps go; MFU counts model FLOPs only (3x forward), not remat's
  recomputation."""
  return loop.Logging(every=cfg.train.log_every, writer=writer, progress=progress,
                      flops_per_token=3 * flops.flops_per_token(cfg.model, cfg.train.seq_len)["total"],
                      peak_flops=flops.device_peak_flops(), num_devices=jax.device_count())


def run_steps(cfg, trainer: Trainer, state: TrainState, data, *, start_step: int, hooks, log,
              stop_requested=None, until: int | None = None) -> loop.LoopResult:
  """loop.run_steps over `trainer`'s jitted step and global batches of `data`."""
  with trainer.mesh:
    return loop.run_steps(trainer.train_step, state,
                          lambda: global_batch(next(data), trainer.batch_sharding),
                          start_step=start_step, total_steps=cfg.train.steps, log=log,
                          hooks=hooks, stop_requested=stop_requested, until=until)


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
  active_params = flops.param_counts(cfg.model)["active"]
  eval_sets = {name: s.on_device(trainer.batch_sharding) for name, s in eval_sets.items()}
  writer = MetricWriter(workdir)
  truncate_metrics(writer.path, start_step, warn=lambda m: print(m, file=sys.stderr, flush=True))
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
  result = run_steps(cfg, trainer, state, data, start_step=start_step,
                     hooks=run_hooks(cfg, trainer, ckpt, data, eval_sets),
                     log=run_logging(cfg, writer, progress), stop_requested=preemption.agreed)
  ckpt.close()
  writer.close()
  if result.stopped:
    progress.message(f"stopped by SIGTERM after step {result.step}; checkpoint saved in "
                     f"{ckpt.directory}. Run the same command again to resume.")
  else:
    progress.message(f"done: {total} steps; metrics in {writer.path}, TensorBoard logs in "
                     f"{os.path.join(workdir, 'tensorboard')}, checkpoints in {ckpt.directory}")
  return result.last_logged
