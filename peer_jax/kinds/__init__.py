"""The registry of FFW kinds: one module per kind declares everything that depends on it.

    from peer_jax import kinds
    kind = kinds.get(model_cfg.ffw)      # an FFWKind; ValueError for an unknown name
    kinds.names()                        # ('dense', 'moe', 'pkm', 'peer', 'memory_plus')

Everything outside this package asks the kind (how it is built, validated, counted,
optimised, sharded, labelled) instead of comparing `model.ffw` against names. A new kind
is one module here and one line in `_REGISTRY` (docs/architecture.md).

Functions of a kind take the `model` config section `m` (configs/base.py) and, where it
matters, `n`, the number of blocks that use the kind (`model.ffw_layers`).
"""

from __future__ import annotations

from peer_jax.kinds.base import FFWKind, no_terms, zero_params  # noqa: F401 (re-exported)
from peer_jax.kinds import dense, memory_plus, moe, peer, pkm

DENSE = dense.KIND.name  # the kind of every block outside model.ffw_layers

# Registry order is the order of sweep tables and plots.
_REGISTRY: dict[str, FFWKind] = {k.name: k for k in (
    dense.KIND,
    moe.KIND,
    pkm.KIND,
    peer.KIND,
    memory_plus.KIND,
)}


def names() -> tuple[str, ...]:
  """Registered kind names, in registry order."""
  return tuple(_REGISTRY)


def get(name: str) -> FFWKind:
  """The FFWKind called `name` (the value of `model.ffw`)."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"model.ffw: unknown kind {name!r}; expected one of "
                     f"{', '.join(_REGISTRY)}") from None


def all_kinds() -> tuple[FFWKind, ...]:
  return tuple(_REGISTRY.values())


def table_param_names() -> tuple[str, ...]:
  """Leaf names of every kind's expert tables (for the table optimizer), deduplicated."""
  out: list[str] = []
  for k in _REGISTRY.values():
    out.extend(n for n in k.table_names if n not in out)
  return tuple(out)


def section(m, kind: FFWKind | str):
  """The kind's config section of model config `m`; for a kind with `defaults`, those
  fill the keys the config lacks (a kind added after configs/base.py needs no edit there)."""
  kind = get(kind) if isinstance(kind, str) else kind
  if kind.section is None:
    return None
  if kind.defaults is None:
    return m[kind.section]
  import ml_collections
  merged = ml_collections.ConfigDict(kind.defaults())
  if kind.section in m:
    merged.update(dict(m[kind.section]))
  return merged
