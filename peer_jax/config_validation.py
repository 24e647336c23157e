"""Whole-config validation, run before anything is built or compiled.

Each problem is reported as one line naming the key and what is wrong with it.
"""

import math
import os

import jax

from peer_jax import kinds, sharding
from peer_jax.data.sources import TEXT_FORMATS, DataError, check_sources
from peer_jax.kinds import checks
from peer_jax.kinds.checks import ConfigError  # noqa: F401 (the stable name)
from peer_jax.layers.common import DTYPES
from peer_jax.layers.ffw import FFW_ACTIVATIONS
from peer_jax.layers.peer import PEER_ACTIVATIONS, PLACEMENTS, QUERY_NORMS, ROUTERS  # noqa: F401
from peer_jax.model import expert_layer_indices
from peer_jax.optim import TABLE_KINDS, TABLE_LR_SCHEDULES

EXPERT_ACTIVATIONS = PEER_ACTIVATIONS

_fail = checks.fail
_positive_int = checks.positive_int
_positive_float = checks.positive_float
_choice = checks.choice
_get = checks.get
_square_root = checks.square_root


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
  kind = kinds.get(_choice(cfg, "model.ffw", kinds.names()))
  _choice(cfg, "model.dtype", tuple(DTYPES))
  _positive_float(cfg, "model.rope_theta")
  try:
    expert_layer_indices(cfg.model.ffw_layers, layers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  kind.validate(cfg, checks)


def validate_kernels(cfg, mesh_shape, platform: str | None = None) -> None:
  """model.peer.kernel / model.pkm.kernel can run on this backend and mesh (one line if not).

  `pallas` on CPU, `cpu_ffi` on an accelerator, or a shape the compiled kernels do not take
  fail here, before anything is traced. `auto` never fails (it falls back to XLA).
  """
  from peer_jax.ops.kernels import KernelError
  kind = kinds.get(cfg.model.ffw)
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
  rules = tuple(cfg.sharding.rules) if "sharding" in cfg else ()
  try:
    kind.validate_kernel(cfg, sizes=sizes, rules=rules, num_devices=math.prod(mesh_shape),
                         platform=platform)
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
  if not isinstance(_get(cfg, "train.expert_stats"), bool):
    _fail("train.expert_stats", f"must be True or False, got {_get(cfg, 'train.expert_stats')!r}")
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
  for name in kinds.get(cfg.model.ffw).unsharded_names:
    if any(sizes[a] > 1 for a in sharding.rule_axes(rules, name)):
      _fail("sharding.rules", f"'{name}' must map to None: expert tables are sharded along D "
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
