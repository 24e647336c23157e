"""Whole-config validation, run before anything is built or compiled.

Each problem is reported as one line naming the key and what is wrong with it.
"""

import math
import os

import jax

from peer_jax import sharding
from peer_jax.data.sources import TEXT_FORMATS, DataError, check_sources
from peer_jax.layers.common import DTYPES
from peer_jax.layers.ffw import FFW_ACTIVATIONS
from peer_jax.model import FFW_KINDS, expert_layer_indices
from peer_jax.layers.moe import MOE_ROUTINGS
from peer_jax.layers.peer import VALUE_INITS
from peer_jax.optim import TABLE_KINDS, TABLE_LR_SCHEDULES

QUERY_NORMS = ("batchnorm", "layernorm", "rmsnorm", "none")
ROUTERS = ("softmax", "sigmoid")
EXPERT_ACTIVATIONS = ("gelu", "relu")
PLACEMENTS = ("replace", "parallel")


class ConfigError(ValueError):
  """An impossible config value; str() is one line starting with the key."""


def _fail(key: str, msg: str):
  raise ConfigError(f"{key}: {msg}")


def _positive_int(cfg, key: str, allow_zero: bool = False):
  value = _get(cfg, key)
  low = 0 if allow_zero else 1
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    _fail(key, f"must be an integer >= {low}, got {value!r}")
  return value


def _positive_float(cfg, key: str, allow_zero: bool = False):
  value = _get(cfg, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value < 0 or (value == 0 and not allow_zero):
    _fail(key, f"must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
  return value


def _choice(cfg, key: str, choices):
  value = _get(cfg, key)
  if value not in choices:
    _fail(key, f"unknown value {value!r}; expected one of {', '.join(map(str, choices))}")
  return value


def _get(cfg, key: str):
  node = cfg
  for part in key.split("."):
    if part not in node:
      _fail(key, "missing from the config (start configs from configs/base.py)")
    node = node[part]
  return node


def _file(cfg, key: str, path: str):
  if not os.path.isfile(path):
    _fail(key, f"file not found: {path}")


def validate_model(cfg) -> None:
  d = _positive_int(cfg, "model.d_model")
  layers = _positive_int(cfg, "model.num_layers")
  heads = _positive_int(cfg, "model.num_heads")
  if d % heads:
    _fail("model.num_heads", f"{heads} heads do not divide model.d_model={d}")
  if (d // heads) % 2:
    _fail("model.num_heads", f"head dimension d_model/num_heads={d // heads} must be even for RoPE")
  _positive_int(cfg, "model.vocab_size")
  _positive_int(cfg, "model.d_ff")
  _choice(cfg, "model.ffw_activation", FFW_ACTIVATIONS)
  kind = _choice(cfg, "model.ffw", FFW_KINDS)
  _choice(cfg, "model.dtype", tuple(DTYPES))
  _positive_float(cfg, "model.rope_theta")
  try:
    expert_layer_indices(cfg.model.ffw_layers, layers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if kind == "peer":
    validate_peer(cfg)
  elif kind == "moe":
    _positive_int(cfg, "model.moe.num_experts")
    _positive_int(cfg, "model.moe.d_ff", allow_zero=True)
    _positive_float(cfg, "model.moe.capacity_factor")
    routing = _choice(cfg, "model.moe.routing", MOE_ROUTINGS)
    if routing == "token_choice":
      k = _positive_int(cfg, "model.moe.top_k")
      if k > cfg.model.moe.num_experts:
        _fail("model.moe.top_k", f"{k} exceeds model.moe.num_experts={cfg.model.moe.num_experts}")
      _positive_float(cfg, "model.moe.aux_loss_coef", allow_zero=True)
  elif kind == "pkm":
    n = _square_root(cfg, "model.pkm.num_memories")
    _positive_int(cfg, "model.pkm.heads")
    k = _positive_int(cfg, "model.pkm.top_k")
    if k > n:
      _fail("model.pkm.top_k", f"{k} exceeds sqrt(model.pkm.num_memories)={n}")
    if _positive_int(cfg, "model.pkm.key_dim") % 2:
      _fail("model.pkm.key_dim", f"must be even (two product-key halves), got {cfg.model.pkm.key_dim}")
    _choice(cfg, "model.pkm.query_norm", QUERY_NORMS)
    _choice(cfg, "model.pkm.value_init", VALUE_INITS)
    from peer_jax.ops.kernels import KERNELS
    if "kernel" in cfg.model.pkm:
      _choice(cfg, "model.pkm.kernel", KERNELS)


def _square_root(cfg, key: str) -> int:
  n_sq = _positive_int(cfg, key)
  n = math.isqrt(n_sq)
  if n * n != n_sq:
    _fail(key, f"{n_sq} is not a perfect square (product keys need N = n*n)")
  return n


def validate_peer(cfg) -> None:
  n = _square_root(cfg, "model.peer.num_experts")
  _positive_int(cfg, "model.peer.heads")
  k = _positive_int(cfg, "model.peer.top_k")
  if k > n:
    _fail("model.peer.top_k", f"{k} exceeds sqrt(model.peer.num_experts)={n}")
  qd = _positive_int(cfg, "model.peer.query_dim")
  if qd % 2:
    _fail("model.peer.query_dim", f"must be even (two product-key halves), got {qd}")
  _choice(cfg, "model.peer.query_norm", QUERY_NORMS)
  _choice(cfg, "model.peer.router", ROUTERS)
  _choice(cfg, "model.peer.activation", EXPERT_ACTIVATIONS)
  _choice(cfg, "model.peer.placement", PLACEMENTS)
  _positive_int(cfg, "model.peer.chunk_size")
  _choice(cfg, "model.peer.value_init", VALUE_INITS)
  from peer_jax.ops.kernels import KERNELS
  if "kernel" in cfg.model.peer:
    _choice(cfg, "model.peer.kernel", KERNELS)


def validate_kernels(cfg, mesh_shape, platform: str | None = None) -> None:
  """model.peer.kernel / model.pkm.kernel can run on this backend and mesh (one line if not).

  `pallas` on CPU, `cpu_ffi` on an accelerator, or a shape the compiled kernels do not take
  fail here, before anything is traced. `auto` never fails (it falls back to XLA).
  """
  from peer_jax.ops.kernels import KernelError, resolve_kernel
  from peer_jax.layers.pkm import resolve_bag_kernel
  from peer_jax.layers.common import DTYPES
  kind = cfg.model.ffw
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
  num_devices = math.prod(mesh_shape)
  rules = tuple(cfg.sharding.rules) if "sharding" in cfg else ()
  try:
    if kind == "peer" and "kernel" in cfg.model.peer:
      p = cfg.model.peer
      shards = math.prod(sizes.get(a, 1) for a in sharding.rule_axes(rules, "expert_embed"))
      resolve_kernel(p.kernel, glu=bool(p.glu), d_model=cfg.model.d_model,
                     slots=p.heads * p.top_k, model_shards=shards if num_devices > 1 else 1,
                     num_devices=num_devices, platform=platform)
    elif kind == "pkm" and "kernel" in cfg.model.pkm:
      resolve_bag_kernel(cfg.model.pkm.kernel, num_devices=num_devices,
                         table_dtype=DTYPES["float32"], platform=platform)
  except KernelError as e:
    raise ConfigError(str(e)) from None


def validate_train(cfg, data_parallel: int) -> None:
  _positive_int(cfg, "train.steps")
  batch = _positive_int(cfg, "train.batch_size")
  _positive_int(cfg, "train.seq_len")
  accum = _positive_int(cfg, "train.grad_accum_steps")
  if batch % accum:
    _fail("train.batch_size", f"{batch} is not divisible by train.grad_accum_steps={accum}")
  micro = batch // accum
  if micro % data_parallel:
    _fail("train.batch_size",
          f"microbatch {micro} (batch_size/grad_accum_steps) is not divisible by the "
          f"data-parallel mesh size {data_parallel} (mesh.data * mesh.fsdp)")
  _positive_float(cfg, "train.learning_rate")
  _positive_int(cfg, "train.warmup_steps", allow_zero=True)  # clamped to train.steps
  ratio = _positive_float(cfg, "train.min_lr_ratio", allow_zero=True)
  if ratio > 1:
    _fail("train.min_lr_ratio", f"must be in [0, 1], got {ratio}")
  _positive_float(cfg, "train.weight_decay", allow_zero=True)
  for key in ("train.b1", "train.b2"):
    if not 0 <= _get(cfg, key) < 1:
      _fail(key, f"must be in [0, 1), got {_get(cfg, key)}")
  _positive_float(cfg, "train.eps")
  _positive_float(cfg, "train.grad_clip", allow_zero=True)
  _choice(cfg, "train.table_optimizer", TABLE_KINDS)
  _positive_float(cfg, "train.table_lr_scale")
  _choice(cfg, "train.table_lr_schedule", TABLE_LR_SCHEDULES)
  twd = _get(cfg, "train.table_weight_decay")
  if not isinstance(twd, (int, float)) or (twd < 0 and twd != -1):
    _fail("train.table_weight_decay", f"must be >= 0, or -1 for train.weight_decay; got {twd!r}")
  _positive_int(cfg, "train.log_every")
  _positive_int(cfg, "train.eval_every", allow_zero=True)
  _positive_int(cfg, "checkpoint.every", allow_zero=True)
  _positive_int(cfg, "checkpoint.keep")
  _positive_int(cfg, "checkpoint.keep_period", allow_zero=True)
  if not isinstance(_get(cfg, "checkpoint.async_save"), bool):
    _fail("checkpoint.async_save", f"must be True or False, got {cfg.checkpoint.async_save!r}")
  init_from = _get(cfg, "checkpoint.init_from")
  if init_from and "://" not in init_from and not os.path.isdir(os.path.expanduser(init_from)):
    _fail("checkpoint.init_from", f"not a directory: {init_from}")
  _positive_int(cfg, "seed", allow_zero=True)


def validate_data(cfg) -> None:
  _file(cfg, "data.tokenizer", cfg.data.tokenizer)
  _choice(cfg, "data.text_format", TEXT_FORMATS)
  for key, split in (("data.train_path", "train"), ("data.eval_paths", "validation")):
    spec = _get(cfg, key)
    if key == "data.eval_paths" and not str(spec).strip():
      continue
    try:
      check_sources(spec, split)
    except DataError as e:
      raise ConfigError(f"{key}: {e}") from None
  if not isinstance(_get(cfg, "data.tfds_data_dir"), str):
    _fail("data.tfds_data_dir", "must be a string (empty for the TFDS default)")
  _positive_int(cfg, "data.num_threads", allow_zero=True)
  _positive_int(cfg, "data.prefetch", allow_zero=True)
  _positive_int(cfg, "data.shuffle_buffer")
  from peer_jax.data.streaming import BAD_RECORDS
  _choice(cfg, "data.bad_records", BAD_RECORDS)
  _positive_int(cfg, "data.eval_batches")


def validate_mesh(cfg, num_devices: int) -> tuple[int, ...]:
  try:
    return sharding.resolve_full_mesh_shape(dict(cfg.mesh), num_devices)
  except sharding.MeshError as e:
    raise ConfigError(str(e)) from None


def validate_sharding(cfg, mesh_shape) -> None:
  """Every parameter dimension divisible by the mesh axes `sharding.rules` maps it to.

  mesh_shape: (data, fsdp, tensor) sizes. The model is built abstractly (no memory).
  """
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
  # The table's form is checked on every mesh (also on one device, where it is not used yet).
  rules = _get(cfg, "sharding.rules")
  if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
    _fail("sharding.rules", f"must be a sequence of (logical_name, mesh_axes) pairs, got "
          f"{rules!r}")
  rules = tuple(rules)
  for entry in rules:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      _fail("sharding.rules", f"each entry must be (logical_name, mesh_axes), got {entry!r}")
    target = entry[1]
    targets = target if isinstance(target, (tuple, list)) else (target,)
    if not all(t is None or isinstance(t, str) for t in targets):
      _fail("sharding.rules", f"{entry[0]!r}: mesh axes must be None, a name or a tuple of "
            f"names, got {target!r}")
    bad = [a for a in targets if a is not None and a not in sharding.MESH_AXES]
    if bad:
      _fail("sharding.rules", f"{entry[0]!r} maps to unknown mesh axis {bad[0]!r}; mesh axes are "
            f"{', '.join(sharding.MESH_AXES)}")
  if all(s == 1 for s in sizes.values()):
    return
  if cfg.model.ffw in ("peer", "pkm") and any(
      sizes[a] > 1 for a in sharding.rule_axes(rules, "experts")):
    _fail("sharding.rules", "'experts' must map to None: expert tables are sharded along D "
          "('expert_embed'), never by rows")
  from flax import nnx
  from peer_jax.model import Transformer
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  problems = sharding.divisibility_problems(nnx.state(model, nnx.Param), sizes, rules)
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    _fail("sharding.rules", f"{problems[0]}{more}; change the mesh, the model size or the rule")


def validate_config(cfg, num_devices: int, check_files: bool = True) -> None:
  """Raise ConfigError on the first impossible value; return None when all is well."""
  validate_model(cfg)
  mesh_shape = validate_mesh(cfg, num_devices)
  validate_train(cfg, sharding.data_parallel_size(mesh_shape))
  validate_sharding(cfg, mesh_shape)
  validate_kernels(cfg, mesh_shape)
  nproc = jax.process_count()
  if cfg.train.batch_size % nproc:
    _fail("train.batch_size", f"{cfg.train.batch_size} is not divisible by the {nproc} processes")
  if check_files:
    validate_data(cfg)
