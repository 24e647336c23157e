"""Device mesh from the config, logical-axis rules, and shardings for pytrees of state.

Parameters carry logical axis names (`embed`, `mlp`, `vocab`, ...). One rules table
(`config.sharding.rules`) maps each logical name to zero or more mesh axes; everything
here derives NamedShardings from those two facts, so parallelism is a config change.

Activations are constrained by the same table: code that runs inside
`use_rules(mesh, rules)` (the train/eval step is traced inside it) calls
`constrain(x, ("batch", "length", "embed"))`; outside such a context `constrain` is the
identity, so single-device code and unit tests of layers are untouched. Layers that need
the mesh itself (the PEER expert bank, which uses `shard_map`) read it with
`current_rules()`.

Mesh axes: `data`, `fsdp`, `tensor`, sizes `mesh.data/fsdp/tensor` (-1 = the remaining
devices). For pods of several slices, `mesh.dcn_data/dcn_fsdp/dcn_tensor` give how many
slices each axis spans (data-centre network); the ICI sizes are then per slice and the
mesh axis `data` has size dcn_data * data, etc.
"""

import contextlib
import dataclasses
import threading
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DCN_KEYS = tuple(f"dcn_{a}" for a in MESH_AXES)
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


def dcn_shape(sizes: dict[str, int]) -> tuple[int, ...]:
  """Slices each mesh axis spans (`mesh.dcn_*`, default 1 each)."""
  shape = []
  for a, key in zip(MESH_AXES, DCN_KEYS):
    s = sizes.get(key, 1)
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
      raise MeshError(f"mesh.{key}: must be a positive integer, got {s!r}")
    shape.append(int(s))
  return tuple(shape)


def resolve_full_mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Global axis sizes (ICI size x DCN size per axis), checked against the device count."""
  dcn = dcn_shape(sizes)
  slices = int(np.prod(dcn))
  if num_devices % slices:
    raise MeshError(f"mesh: dcn sizes {dict(zip(DCN_KEYS, dcn))} ask for {slices} slices, "
                    f"but {num_devices} devices do not split into {slices} equal slices")
  ici = resolve_mesh_shape(sizes, num_devices // slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  On TPU the devices are laid out by `mesh_utils` so that each axis follows the physical
  torus (tensor innermost); with `mesh.dcn_*` > 1 a hybrid mesh puts the DCN part of each
  axis across slices. Elsewhere devices are taken in order (process-major), so each
  process holds a contiguous block of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = dcn_shape(sizes)
  if int(np.prod(dcn)) > 1:
    from jax.experimental import mesh_utils
    slices = int(np.prod(dcn))
    if len(devices) % slices:
      raise MeshError(f"mesh: {len(devices)} devices do not split into {slices} slices "
                      f"(mesh.dcn_* = {dcn})")
    ici = resolve_mesh_shape(sizes, len(devices) // slices)
    try:
      arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    except (AttributeError, ValueError, AssertionError) as e:
      raise MeshError(f"mesh: cannot build a {slices}-slice hybrid mesh (ici {ici}, dcn {dcn}) "
                      f"on these devices: {e}") from None
    return Mesh(arr, MESH_AXES)
  shape = resolve_mesh_shape(sizes, len(devices))
  if devices and devices[0].platform == "tpu" and len(devices) > 1:
    from jax.experimental import mesh_utils
    try:
      arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return Mesh(arr, MESH_AXES)
    except (NotImplementedError, ValueError, AssertionError):
      pass  # an unusual device set: fall back to plain order
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_axis_sizes(mesh: Mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def rule_axes(rules: Rules, name: str) -> tuple[str, ...]:
  """Mesh axes the rules give one logical name (() when unmapped or None)."""
  axes = dict(rules).get(name)
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


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
      if not jax.tree.leaves(x.get_value()):
        # A Variable holding no arrays (optax's MaskedNode in a multi_transform branch that
        # does not own this parameter): it gets no sharding, or the trees would not match.
        return x
      names = x.get_metadata().get("out_sharding")
      value = x.get_value()
      if names is not None and getattr(value, "ndim", len(names)) != len(names):
        # Optimizer statistics of another rank than their parameter (Adafactor's factored
        # row/column moments, (N,) and (D,) of an (N, D) table): small, so replicated.
        return x.replace(NamedSharding(mesh, P()))
      return x.replace(NamedSharding(mesh, logical_to_mesh_spec(names, rules)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def spec_axes(spec: P, dim: int) -> tuple[str, ...]:
  """Mesh axes one dimension of a PartitionSpec is split over."""
  if dim >= len(spec) or spec[dim] is None:
    return ()
  entry = spec[dim]
  return (entry,) if isinstance(entry, str) else tuple(entry)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a (batch, length, ...) array: batch over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh_shape: Sequence[int]) -> int:
  return int(np.prod([s for a, s in zip(MESH_AXES, mesh_shape) if a in BATCH_AXES]))


# ----------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class RulesContext:
  mesh: Mesh
  rules: tuple

  def spec(self, names: Sequence[str | None]) -> P:
    return logical_to_mesh_spec(names, self.rules)

  def axes(self, name: str) -> tuple[str, ...]:
    """Mesh axes of one logical name, restricted to axes of size > 1."""
    sizes = mesh_axis_sizes(self.mesh)
    return tuple(a for a in rule_axes(self.rules, name) if sizes.get(a, 1) > 1)


_local = threading.local()


def current_rules() -> RulesContext | None:
  """The innermost active `use_rules` context of this thread, or None."""
  stack = getattr(_local, "stack", None)
  return stack[-1] if stack else None


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
  """Activate (mesh, logical rules) for `constrain` and the sharded layers while tracing.

  Wrap the function that jit traces, not the jitted call: jit caches traces without
  looking at this context.
  """
  stack = getattr(_local, "stack", None)
  if stack is None:
    stack = _local.stack = []
  stack.append(RulesContext(mesh, tuple((k, tuple(v) if isinstance(v, list) else v)
                                        for k, v in rules)))
  try:
    yield stack[-1]
  finally:
    stack.pop()


def with_rules(fn, mesh: Mesh, rules: Rules):
  """`fn` wrapped so that its body (i.e. its trace under jit) runs inside use_rules."""
  import functools

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with use_rules(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical names when a `use_rules` context is active."""
  ctx = current_rules()
  if ctx is None or ctx.mesh.size == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"{len(names)} logical names {tuple(names)} for a {x.ndim}-d array")
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, ctx.spec(names)))


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class DivisibilityProblem:
  path: str
  dim: int
  name: str | None
  size: int
  axes: tuple[str, ...]
  axes_size: int

  def __str__(self):
    axes = " x ".join(f"'{a}'" for a in self.axes)
    return (f"parameter {self.path} dimension {self.dim} ('{self.name}', size {self.size}) "
            f"is not divisible by mesh axis {axes} (size {self.axes_size})")


def divisibility_problems(abstract_tree: Any, mesh_sizes: dict[str, int],
                          rules: Rules) -> list[DivisibilityProblem]:
  """Every (parameter, dimension) whose size the mesh axes its rule maps it to do not divide."""
  problems = []
  flat = jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=_is_variable)[0]
  for path, x in flat:
    if not _is_variable(x):
      continue
    names = x.get_metadata().get("out_sharding")
    if not names:
      continue
    spec = logical_to_mesh_spec(names, rules)
    shape = x.get_value().shape if hasattr(x, "get_value") else x.value.shape
    for dim, (name, size) in enumerate(zip(names, shape)):
      axes = spec_axes(spec, dim)
      n = int(np.prod([mesh_sizes.get(a, 1) for a in axes])) if axes else 1
      if n > 1 and size % n:
        problems.append(DivisibilityProblem(jax.tree_util.keystr(path, simple=True,
                                                                 separator="."),
                                            dim, name, int(size), axes, n))
  return problems
