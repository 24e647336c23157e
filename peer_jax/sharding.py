"""Device mesh from the config, logical-axis rules, and shardings for pytrees of state.

Parameters carry logical axis names (`embed`, `mlp`, `vocab`, ...). One rules table
(`config.sharding.rules`) maps each logical name to zero or more mesh axes; everything
here derives NamedShardings from those two facts, so parallelism is a config change.
"""

from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes a global batch is split over (data parallelism in the wide sense).
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]


class MeshError(ValueError):
  """A mesh configuration that cannot be built on the devices present."""


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes with one `-1` replaced by the remaining devices; checks the product."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  unknown = [a for a, s in zip(MESH_AXES, shape) if s == -1]
  if len(unknown) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in unknown)}")
  for a, s in zip(MESH_AXES, shape):
    if s == 0 or s < -1:
      raise MeshError(f"mesh.{a}: size must be a positive integer or -1, got {s}")
  known = int(np.prod([s for s in shape if s != -1]))
  if unknown:
    if num_devices % known:
      raise MeshError(
          f"mesh.{unknown[0]}: cannot fill the remaining devices: {num_devices} devices are not "
          f"divisible by the product {known} of the other mesh axes")
    shape[MESH_AXES.index(unknown[0])] = num_devices // known
  elif known != num_devices:
    raise MeshError(
        f"mesh: axis sizes {dict(zip(MESH_AXES, shape))} multiply to {known}, but {num_devices} "
        f"devices are present (set one axis to -1 to use the rest)")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_mesh_spec(names: Iterable[str | None] | None, rules: Rules) -> P:
  """PartitionSpec for one array: each logical name -> the mesh axes the rules give it.

  A mesh axis is used at most once per array (the first dimension that claims it
  wins), as jax requires.
  """
  if not names:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    free = tuple(a for a in axes if a not in used)
    used.update(free)
    spec.append(free[0] if len(free) == 1 else (free or None))
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for every leaf: Variables by their logical names, others replicated.

  Works on model state, optimizer state (optax keeps the Variable wrappers of the
  params it mirrors) and anything else built from them.
  """

  def one(x):
    if _is_variable(x):
      names = x.get_metadata().get("out_sharding")
      return x.replace(NamedSharding(mesh, logical_to_mesh_spec(names, rules)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a (batch, length, ...) array: batch over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh_shape: Sequence[int]) -> int:
  return int(np.prod([s for a, s in zip(MESH_AXES, mesh_shape) if a in BATCH_AXES]))
