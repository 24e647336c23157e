"""FFWKind: what a kind of feed-forward layer declares to the rest of peer_jax.

Every field is a plain value or a pure function of the `model` config section `m`; none
builds anything but `build`. `n` is the number of blocks using the kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def no_terms(m, n: int, seq_len: int) -> dict[str, float]:
  return {}


def zero_params(m, n: int, seq_len: int | None) -> tuple[int, int, float]:
  return 0, 0, 0.0


def _none(m):
  return None


def _nothing(*_, **__):
  return None


@dataclasses.dataclass(frozen=True)
class FFWKind:
  """One FFW kind. Fields (m: the model section, n: blocks using the kind):

  name: the value of `model.ffw`.
  label: display name in sweep tables and plots; `label_for(variant)` may refine it.
  section: the config section under `model` holding the kind's keys (None: none).
  defaults: () -> dict of the section's default values, for a kind whose section is not
    in configs/base.py (None: the section is always there).
  build(m, *, rngs, dtype, out_scale, shared) -> nnx.Module, the layer of one block.
    `shared` is one dict per model: a kind that shares modules between blocks keeps them
    there (nnx then holds one parameter, wherever it is used).
  validate(cfg, checks): raise ConfigError for an impossible section value. `checks` is
    peer_jax.kinds.checks (positive_int, choice, square_root, ...).
  validate_kernel(cfg, *, sizes, rules, num_devices, platform): raise KernelError for a
    kernel setting that cannot run on this backend / mesh.
  flop_terms(m, n, seq_len) -> {name: forward FLOPs per token (or '*_topk_ops')}, summed
    over the n blocks; every FLOP term is an expert-layer term.
  dense_ffws(m) -> number of dense FFWs each of its blocks holds (dense 1, PEER placed in
    parallel 1, others 0), for the shared FLOP and parameter counts.
  parallel_dense(m) -> whether its blocks add a dense FFW beside it (PEER
    placement='parallel').
  param_counts(m, n, seq_len) -> (other params, expert-table params, table params a token
    reads), summed over the n blocks (a shared table counts once).
  gathered(m, n) -> {name: table elements a token gathers}.
  pool_size(m) -> experts a token chooses among, for usage statistics (None: no usage
    statistics, e.g. no expert_indices in aux).
  table_shape(m, n) -> (rows N, retrievals per token, per table) or None: the rows the
    table optimizer may touch (a table shared by n blocks is read n times per token).
  table_names: leaf names of its expert tables (the table optimizer's `is_table`).
  unsharded_names: logical axis names of its params that must map to no mesh axis.
  kernel_key: the config key choosing its kernel ('model.peer.kernel'), or None.
  causal(m) -> whether its output at t depends only on tokens <= t.
  variant(m) -> a short string distinguishing runs in sweep tables (MoE routing), or ''.
  label_for(variant) -> the display label of that variant.
  color: matplotlib colour of its curves.
  """
  name: str
  label: str
  build: Callable[..., Any]
  section: str | None = None
  defaults: Callable[[], dict] | None = None
  validate: Callable[..., None] = _nothing
  validate_kernel: Callable[..., None] = _nothing
  flop_terms: Callable[..., dict] = no_terms
  dense_ffws: Callable[[Any], int] = lambda m: 0
  parallel_dense: Callable[[Any], bool] = lambda m: False
  param_counts: Callable[..., tuple] = zero_params
  gathered: Callable[..., dict] = lambda m, n: {}
  pool_size: Callable[[Any], int | None] = _none
  table_shape: Callable[..., tuple[int, int] | None] = lambda m, n: None
  table_names: tuple[str, ...] = ()
  unsharded_names: tuple[str, ...] = ()
  kernel_key: str | None = None
  causal: Callable[[Any], bool] = lambda m: True
  variant: Callable[[Any], str] = lambda m: ""
  label_for: Callable[[str], str] | None = None
  color: str = "tab:purple"

  def display_label(self, variant: str = "") -> str:
    return self.label_for(variant) if self.label_for is not None else self.label
