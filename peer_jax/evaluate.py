"""Evaluation: token loss, perplexity, bits per byte, LAMBADA accuracy, expert usage.

The eval sets (`EvalSet`, tasks `lm` and `lambada`, how documents become batches and how
many UTF-8 bytes they score) are built by `peer_jax/data/eval_sets.py`; the expert-load
histogram is `peer_jax/eval_plot.py`. Their names stay importable from here. This module
is the metrics and the jitted `Evaluator`.

Metrics of one set (`Evaluator.evaluate`):
  tokens          scored target tokens (lambada: tokens of the final words)
  loss            mean nats per scored token;  ppl = exp(loss)
  bits_per_byte   total nats / (ln 2 · UTF-8 bytes of the text scored): tokenizer-independent.
                  lm: the bytes of every evaluated document (a document cut short by
                  max_batches counts in proportion to its targets evaluated); lambada: the
                  bytes of the final words with their leading whitespace.
  accuracy        lambada: share of passages whose final word is predicted exactly
  word_ppl        lambada: exp(mean over passages of the final word's total nats)
  experts/BLOCK/usage, experts/BLOCK/unevenness
                  per PEER/PKM layer, from the router weights accumulated over the whole set
                  (all real input tokens; peer_jax.expert_stats), as in the paper's Table 2.
"""

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import expert_stats, sharding
# Eval-set building and plotting live in their own modules; their names stay importable here.
from peer_jax.data.eval_sets import (  # noqa: F401
    TASKS, EvalError, EvalSet, LambadaExample, lambada_batches, lambada_example,
    load_eval_set, load_eval_sets, load_lambada_set, load_lm_set, split_last_word, task_of,
    window_bytes)
from peer_jax.eval_plot import write_expert_histogram  # noqa: F401

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- pure metrics


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))


def bits_per_byte(loss_sum_nats: float, num_bytes: float) -> float:
  """Total nats over the UTF-8 bytes of the text they score, in bits per byte."""
  return loss_sum_nats / (LN2 * num_bytes) if num_bytes > 0 else float("nan")


def lm_metrics(loss_sum: float, count: float, num_bytes: float) -> dict[str, float]:
  loss = loss_sum / max(count, 1.0)
  return {"tokens": count, "loss": loss, "ppl": perplexity(loss),
          "bits_per_byte": bits_per_byte(loss_sum, num_bytes)}


def expert_layers(model_cfg) -> dict[str, int]:
  """{block name: number of experts} of every block whose FFW retrieves experts (the
  kind's pool: PEER, PKM, Memory+)."""
  return expert_stats.expert_pools(model_cfg)


def accumulate_routing(aux: dict, valid_BT, layers: dict[str, int]) -> dict[str, jax.Array]:
  """z_N per layer: router weight each expert got from the valid tokens of one batch."""
  out = {}
  for block, n in layers.items():
    idx, w = aux[block]["expert_indices"], aux[block]["expert_weights"]
    valid = valid_BT.reshape(valid_BT.shape + (1,) * (w.ndim - valid_BT.ndim))
    out[block] = expert_stats.accumulate_expert_weights(idx, w * valid.astype(w.dtype), n)
  return out


def expert_metrics(z: dict[str, Any]) -> dict[str, float]:
  """{'experts/BLOCK/usage', 'experts/BLOCK/unevenness'} from accumulated weights."""
  out = {}
  for block, z_N in z.items():
    z_N = jnp.asarray(z_N)
    out[f"experts/{block}/usage"] = float(expert_stats.expert_usage(z_N))
    out[f"experts/{block}/unevenness"] = float(expert_stats.expert_unevenness(z_N))
  return out


# ----------------------------------------------------------------------------- eval sets


# ----------------------------------------------------------------------------- evaluation


def model_forward(graphdef, state, batch):
  """(logits_BTV, aux) of the model in evaluation mode (running batch-norm statistics)."""
  from flax import nnx
  model = nnx.merge(graphdef, state.params, state.model_state, copy=True)
  return model(batch["inputs"], batch["positions"], batch["segment_ids"], train=False)


def token_nll(logits_BTV, targets_BT):
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  return logz_BT - jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]


class Evaluator:
  """Jitted evaluation of a `Trainer`'s model on `EvalSet`s (batches already on device).

  `forward(graphdef, state, batch) -> (logits, aux)` defaults to the model; tests pass stubs.
  """

  def __init__(self, trainer, forward: Callable | None = None):
    self.trainer = trainer
    self.layers = expert_layers(trainer.cfg.model)
    self._forward = forward or model_forward
    self._fns: dict[Any, Callable] = {}

  def _fn(self, per_token: bool, keys: tuple[str, ...]):
    if (per_token, keys) in self._fns:
      return self._fns[(per_token, keys)]
    trainer, layers, forward = self.trainer, self.layers, self._forward

    def step(state, batch, z):
      logits_BTV, aux = forward(trainer.graphdef, state, batch)
      mask_BT = batch["mask"]
      nll_BT = token_nll(logits_BTV, batch["targets"]) * mask_BT
      batch_z = accumulate_routing(aux, batch["segment_ids"] > 0, layers)
      out = {"loss_sum": jnp.sum(nll_BT), "count": jnp.sum(mask_BT)}
      if per_token:
        out["nll_BT"] = nll_BT
        out["correct_BT"] = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
      return out, {k: z[k] + batch_z[k] for k in z}

    with_rules = getattr(sharding, "with_rules", None)  # activates the sharded layers' rules
    if with_rules is not None:
      step = with_rules(step, trainer.mesh, tuple(trainer.cfg.sharding.rules))
    replicated = NamedSharding(trainer.mesh, P())
    fn = jax.jit(step, in_shardings=(trainer.state_shardings,
                                     {k: trainer.batch_sharding(2) for k in keys}, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=2)
    self._fns[(per_token, keys)] = fn
    return fn

  def _zeros(self) -> dict[str, jax.Array]:
    """Replicated zero accumulators (made by jit, so multi-host runs agree on them)."""
    if "zeros" not in self._fns:
      layers = self.layers
      self._fns["zeros"] = jax.jit(
          lambda: {b: jnp.zeros((n,), jnp.float32) for b, n in layers.items()},
          out_shardings=NamedSharding(self.trainer.mesh, P()))
    return self._fns["zeros"]()

  def evaluate(self, state, eval_set: EvalSet, *, return_routing: bool = False):
    """Metrics of one set (module doc); with return_routing also {block: z_N numpy}."""
    per_token = eval_set.task == "lambada"
    z = self._zeros()
    loss_sum, count, per_batch = 0.0, 0.0, []
    for batch in eval_set.batches:
      out, z = self._fn(per_token, tuple(sorted(batch)))(state, batch, z)
      out = jax.device_get(out)
      loss_sum += float(out["loss_sum"])
      count += float(out["count"])
      if per_token:
        per_batch.append((np.asarray(out["nll_BT"]), np.asarray(out["correct_BT"])))
    metrics = lm_metrics(loss_sum, count, eval_set.num_bytes)
    if per_token:
      metrics.update(lambada_metrics(eval_set.examples, per_batch))
    z = jax.device_get(z)
    metrics.update(expert_metrics(z))
    return (metrics, z) if return_routing else metrics

  def evaluate_sets(self, state, eval_sets: dict[str, EvalSet], prefix: str = "eval/"
                    ) -> dict[str, float]:
    """{'eval/NAME/loss', '.../ppl', '.../bpb', '.../tokens', lambada sets also
    '.../accuracy' and '.../word_ppl', PEER/PKM models '.../experts/BLOCK/usage' and
    '.../experts/BLOCK/unevenness'} over every set."""
    out = {}
    for name, eval_set in eval_sets.items():
      for key, value in self.evaluate(state, eval_set).items():
        if key == "examples":  # constant over a run
          continue
        key = "bpb" if key == "bits_per_byte" else key
        out[f"{prefix}{name}/{key}"] = value
    return out


def lambada_metrics(examples: Sequence[LambadaExample],
                    per_batch: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
  """accuracy and word_ppl from the global per-token nll / argmax-correct arrays."""
  hits, word_nll = [], []
  for ex in examples:
    b, row, col = ex.where
    nll, correct = per_batch[b]
    sl = slice(col, col + ex.num_target)
    hits.append(bool(np.all(correct[row, sl])))
    word_nll.append(float(np.sum(nll[row, sl])))
  n = max(len(examples), 1)
  return {"examples": float(len(examples)), "accuracy": sum(hits) / n,
          "word_ppl": perplexity(sum(word_nll) / n)}
