"""Optimizers for the PEER expert tables (u, v and, with GLU, g: each (N, D)).

The tables hold almost all parameters of a PEER model (2·N·D per layer; 2^29 at N = 1024²,
D = 256) yet one step touches at most tokens·heads·top_k of their N rows. Dense AdamW reads
and writes every row and both moments every step; at N = 1024² that dominates the step
(docs/performance.md). This module builds an optax transformation that treats the tables
separately from the rest of the model:

    tx = table_aware_optimizer(rest_tx, table_kind="lazy_adam", table_learning_rate=sched,
                               max_rows=tokens_per_step * heads * top_k, ...)

* `table_kind="adamw"`: the same AdamW, with its own learning rate / schedule.
* `table_kind="lazy_adam"`: row-sparse ("lazy") Adam. Rows whose gradient is all zero (not
  retrieved by any token this step) keep their parameters *and* moments untouched; the
  touched rows (found from the gradient, at most `max_rows` of them) get an AdamW update
  with the global step's bias correction, as TF's LazyAdam and torch's SparseAdam do.
  Only O(max_rows·D) of the moments are read and written. Decoupled weight decay, if any,
  applies to touched rows only.
* `table_kind="sgd"`: plain SGD (optionally with weight decay), no optimizer state at all.
* `table_kind="adafactor"`: optax.adafactor with factored second moments (O(N + D) state).

Everything that is not a table (`is_table` decides; by default the leaves named u_ND,
v_ND, g_ND) goes through `rest_tx` unchanged.

Lazy Adam caveat: `max_rows` must bound the number of distinct rows that receive a
nonzero gradient in one optimizer step (per table); rows beyond it are skipped that step
(never silently corrupted: they simply are not updated). tokens_per_step·heads·top_k
(capped at N) is always enough.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peer_jax.schedules import (  # noqa: F401 (re-exported)
    TABLE_LR_SCHEDULES, learning_rate_schedule, table_learning_rate_schedule)

TABLE_KINDS = ("adamw", "lazy_adam", "sgd", "adafactor")
def _table_names() -> tuple[str, ...]:
  from peer_jax import kinds  # the kinds declare their tables (PEER u/v/g, PKM values, ...)
  return kinds.table_param_names()


TABLE_NAMES = _table_names()  # ("u_ND", "v_ND", "g_ND", "values_NV")


def _path_names(path) -> list[str]:
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return names


def is_table(path, leaf) -> bool:
  """Default table predicate: a 2-D leaf named as a kind's expert table (TABLE_NAMES: u_ND,
  v_ND, g_ND of PEER, values_NV of PKM and Memory+)."""
  return getattr(leaf, "ndim", 0) == 2 and any(n in TABLE_NAMES for n in _path_names(path))


def table_labels(params, predicate: Callable = is_table):
  """'table' / 'rest' label for every leaf of `params` (for optax.multi_transform)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: "table" if predicate(path, leaf) else "rest", params)


# ----------------------------------------------------------------------------- lazy Adam


class LazyAdamState(NamedTuple):
  count: jax.Array  # int32 step count (bias correction)
  mu: Any
  nu: Any


def touched_rows(grad_ND, max_rows: int):
  """Indices (max_rows,) of the rows of grad with any nonzero entry; padded with N."""
  n = grad_ND.shape[0]
  nonzero_N = jnp.any(grad_ND != 0, axis=tuple(range(1, grad_ND.ndim)))
  return jnp.nonzero(nonzero_N, size=min(max_rows, n), fill_value=n)[0].astype(jnp.int32)


def lazy_adam(learning_rate, *, max_rows: int, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0,
              mu_dtype=None) -> optax.GradientTransformation:
  """Row-sparse AdamW for (N, ...) tables: only rows with a nonzero gradient change.

  `learning_rate` is a float or an optax schedule of the step count. Returns dense updates
  (zero on untouched rows), so it composes with optax.apply_updates; the moments are only
  gathered / scattered on the touched rows.
  """
  if max_rows < 1:
    raise ValueError(f"lazy_adam needs max_rows >= 1, got {max_rows}")

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype)
    return LazyAdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                         jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    if params is None and weight_decay:
      raise ValueError("lazy_adam with weight_decay needs params")
    count = state.count + 1
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)

    def one(g, m, v, p):
      rows = touched_rows(g, max_rows)
      get = lambda a: a.at[rows].get(mode="fill", fill_value=0)
      g_r = get(g).astype(jnp.float32)
      m_r = b1 * get(m).astype(jnp.float32) + (1 - b1) * g_r
      v_r = b2 * get(v).astype(jnp.float32) + (1 - b2) * g_r * g_r
      step_r = (m_r / c1) / (jnp.sqrt(v_r / c2) + eps)
      if weight_decay:
        step_r = step_r + weight_decay * get(p).astype(jnp.float32)
      u_r = (-lr * step_r).astype(g.dtype)
      put = lambda a, r: a.at[rows].set(r.astype(a.dtype), mode="drop")
      return jnp.zeros_like(g).at[rows].set(u_r, mode="drop"), put(m, m_r), put(v, v_r)

    leaves_g, treedef = jax.tree.flatten(grads)
    leaves_m = treedef.flatten_up_to(state.mu)
    leaves_v = treedef.flatten_up_to(state.nu)
    leaves_p = treedef.flatten_up_to(params) if params is not None else leaves_g
    out = [one(g, m, v, p) for g, m, v, p in zip(leaves_g, leaves_m, leaves_v, leaves_p)]
    updates = treedef.unflatten([o[0] for o in out])
    mu = treedef.unflatten([o[1] for o in out])
    nu = treedef.unflatten([o[2] for o in out])
    return updates, LazyAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def lazy_adam_apply(param, mu, nu, grad, count, lr, *, max_rows: int, b1=0.9, b2=0.999,
                    eps=1e-8, weight_decay=0.0):
  """The lazy-Adam step applied in place: returns (param, mu, nu) after one step.

  Same arithmetic as `lazy_adam` + optax.apply_updates, but the parameter rows are
  scattered directly (no dense (N, D) `updates` buffer, no dense `param + updates` pass),
  so with donated buffers only the touched rows and one scan of the gradient cost
  memory traffic. `count` is the step count *before* this step. For a train step that
  applies table updates itself (see docs/performance.md).
  """
  rows = touched_rows(grad, max_rows)
  get = lambda a: a.at[rows].get(mode="fill", fill_value=0).astype(jnp.float32)
  t = (count + 1).astype(jnp.float32)
  g_r = get(grad)
  m_r = b1 * get(mu) + (1 - b1) * g_r
  v_r = b2 * get(nu) + (1 - b2) * g_r * g_r
  p_r = get(param)
  step_r = (m_r / (1 - b1 ** t)) / (jnp.sqrt(v_r / (1 - b2 ** t)) + eps) + weight_decay * p_r
  put = lambda a, r: a.at[rows].set(r.astype(a.dtype), mode="drop")
  return put(param, p_r - lr * step_r), put(mu, m_r), put(nu, v_r)


# ----------------------------------------------------------------------------- builder


def table_transform(kind: str, learning_rate, *, b1=0.9, b2=0.999, eps=1e-8,
                    weight_decay=0.0, max_rows: int = 0) -> optax.GradientTransformation:
  """The optimizer applied to the expert tables alone."""
  if kind == "adamw":
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if kind == "lazy_adam":
    return lazy_adam(learning_rate, max_rows=max_rows, b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay)
  if kind == "sgd":
    if weight_decay:
      return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))
    return optax.sgd(learning_rate)
  if kind == "adafactor":
    return optax.adafactor(learning_rate, weight_decay_rate=weight_decay or None)
  raise ValueError(f"unknown table optimizer {kind!r}; expected one of {TABLE_KINDS}")


def table_aware_optimizer(rest_tx: optax.GradientTransformation, *, table_kind: str,
                          table_learning_rate, predicate: Callable = is_table,
                          **table_kwargs) -> optax.GradientTransformation:
  """`rest_tx` for ordinary parameters, `table_transform(table_kind, ...)` for tables."""
  table_tx = table_transform(table_kind, table_learning_rate, **table_kwargs)
  return optax.multi_transform({"table": table_tx, "rest": rest_tx},
                               lambda params: table_labels(params, predicate))


# ----------------------------------------------------------------------------- optimizer


def tables_have_own_optimizer(tcfg, model_cfg) -> bool:
  """Whether the table settings differ from the shared AdamW (so tables get a branch)."""
  if model_cfg is None or not expert_table_shape(model_cfg):
    return False
  return (tcfg.table_optimizer != "adamw" or tcfg.table_lr_scale != 1.0
          or tcfg.get("table_lr_schedule", "follow") != "follow"
          or tcfg.table_weight_decay >= 0)


def expert_table_shape(model_cfg) -> tuple[int, int] | None:
  """(rows N, retrievals per token) of the model's expert tables; None for dense / MoE."""
  from peer_jax import kinds
  from peer_jax.model import expert_layer_indices
  n = len(expert_layer_indices(model_cfg.ffw_layers, model_cfg.num_layers))
  return kinds.get(model_cfg.ffw).table_shape(model_cfg, n)


def make_optimizer(tcfg, model_cfg=None, schedule_inputs=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (clipped) for everything; the expert tables of PEER (u, v, g) and PKM (values)
  optionally get their own optimizer, LR multiplier and schedule, and weight decay
  (`train.table_*`; docs/peer_layer.md says which defaults the ablations chose).

  `schedule_inputs` (peer_jax/schedules.py; traced inside the train step) replaces tcfg's
  learning_rate, warmup_steps and steps; the state's structure does not depend on them."""
  schedule = learning_rate_schedule(tcfg, schedule_inputs)
  # Norm scales and other vectors are not decayed: shrinking them only fights the norm.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                   weight_decay=tcfg.weight_decay, mask=decay_mask)
  if tables_have_own_optimizer(tcfg, model_cfg):
    wd = tcfg.weight_decay if tcfg.table_weight_decay < 0 else tcfg.table_weight_decay
    rows, per_token = expert_table_shape(model_cfg)
    tx = table_aware_optimizer(
        tx, table_kind=tcfg.table_optimizer,
        table_learning_rate=table_learning_rate_schedule(tcfg, schedule, schedule_inputs),
        b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=wd,
        max_rows=int(min(rows, tcfg.batch_size * tcfg.seq_len * per_token)))
  if tcfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), tx)
  return tx, schedule
