"""Load a run from its workdir: its config and a checkpoint, for evaluation and sampling.

`load_run(workdir)` is the one way the scripts (evaluate.py, sample.py) open a trained run.
It reads `config.json`, builds the model on this host's devices (`Model`: mesh, graphdef,
abstract state and shardings, no optimizer) and restores the newest readable checkpoint (or
`step`). It reads only: a damaged checkpoint is skipped with a warning, never moved. By
default only the parameters and model state are read (no optimizer is built or read);
`builder=train.Trainer.build` restores the whole TrainState.

`restore_params` reads another run's parameters the same way, for checkpoint.init_from.
`Model` is also what `train.Trainer` builds its state around, so both see the same graphdef
and parameter shardings.
"""

import dataclasses
import json
import os
import sys
from typing import Any

import flax
import jax
from flax import nnx
from jax.sharding import NamedSharding

from peer_jax import sharding
from peer_jax.checkpoint import Checkpointer, CheckpointError, resolve_path
from peer_jax.model import Transformer

# A mesh that fits any number of devices: pure data parallelism.
DATA_PARALLEL = {"data": -1, "fsdp": 1, "tensor": 1}


@flax.struct.dataclass
class ModelState:
  """What the model needs to run: its parameters and its other variables (batch-norm
  statistics); the fields TrainState has of the same names."""
  params: Any
  model_state: Any


@dataclasses.dataclass
class Model:
  """A config's model on a mesh: graphdef, abstract ModelState and its shardings."""
  cfg: Any
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_state: ModelState
  state_shardings: ModelState

  @classmethod
  def build(cls, cfg, devices=None) -> "Model":
    mesh = sharding.make_mesh(dict(cfg.mesh), devices)
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    rules = tuple(cfg.sharding.rules)
    shardings = ModelState(params=sharding.tree_shardings(abs_params, mesh, rules),
                           model_state=sharding.tree_shardings(abs_rest, mesh, rules))
    return cls(cfg, mesh, graphdef, ModelState(abs_params, abs_rest), shardings)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return sharding.batch_sharding(self.mesh, ndim)


@dataclasses.dataclass
class LoadedRun:
  cfg: Any
  model: Any  # Model, or a train.Trainer (both: cfg, graphdef, mesh, shardings)
  state: Any  # ModelState, or a TrainState for a Trainer
  step: int


def read_config(workdir: str):
  """The ConfigDict of a run's config.json (CheckpointError if it has none or it is bad)."""
  import ml_collections
  workdir = resolve_path(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{workdir} holds no run (no config.json); train one with "
                          "scripts/train.py --workdir=...")
  try:
    with open(path) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  # JSON made the rules' tuples lists; the rules table is read as tuples.
  cfg.sharding.rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in cfg.sharding.rules)
  return cfg


def build(cfg, *, mesh: dict | None = None, builder=None):
  """`builder(cfg)` (default Model.build; train.Trainer.build for the optimizer too) on this
  host's devices. `mesh`: the axis sizes to use; None: the run's own mesh where it fits
  these devices, else pure data parallelism (with a note on stderr)."""
  builder = builder or Model.build
  if mesh is not None:
    with cfg.unlocked():
      cfg.mesh.update(mesh)
    return builder(cfg)
  try:
    return builder(cfg)
  except sharding.MeshError as e:
    fallback = {k: (-1 if k == "data" else 1) for k in cfg.mesh}
    print(f"note: the run's mesh does not fit {jax.device_count()} devices ({e}); "
          f"evaluating with mesh {fallback}", file=sys.stderr)
    with cfg.unlocked():
      cfg.mesh.update(fallback)
    return builder(cfg)


def restore(workdir: str, model, step: int | None = None):
  """(step, state) of the newest readable checkpoint (or `step`) of `workdir`, read-only.

  A Model gets a ModelState (only the parameters and model state are read); a Trainer its
  whole TrainState."""
  workdir = resolve_path(workdir)
  ckpt = Checkpointer(workdir, model.cfg.checkpoint, read_only=True)
  try:
    restored = ckpt.restore_latest(model.abstract_state, model.state_shardings, step=step,
                                   params_only=isinstance(model.abstract_state, ModelState))
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"no complete checkpoint in {ckpt.directory}")
  return restored.step, restored.state


def load_run(workdir: str, step: int | None = None, *, mesh: dict | None = None,
             builder=None) -> LoadedRun:
  """A run's config, model and restored state (module doc; `mesh`, `builder`: `build`)."""
  cfg = read_config(workdir)
  model = build(cfg, mesh=mesh, builder=builder)
  step, state = restore(workdir, model, step)
  return LoadedRun(cfg, model, state, step)


def restore_params(path: str, abstract_state, shardings):
  """(step, params, model_state) of the newest readable checkpoint under `path` (a workdir
  or its checkpoints/ folder): checkpoint.init_from's start. Refuses (CheckpointError naming
  the parameter and both shapes) a model of another shape; reads only."""
  path = resolve_path(path)
  is_folder = os.path.basename(os.path.normpath(path)) == "checkpoints"
  workdir = os.path.dirname(os.path.normpath(path)) if is_folder else path
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint.init_from: no checkpoints folder at {directory}")

  def other_model(step: int, differences: list[str]) -> None:
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    raise CheckpointError(
        f"checkpoint.init_from: checkpoint {step} in {directory} is of another model: "
        f"{differences[0]}{more}; init_from needs the same model shape")

  ckpt = Checkpointer(workdir, {}, read_only=True)
  try:
    restored = ckpt.restore_latest(abstract_state, shardings, params_only=True,
                                   on_difference=other_model)
  except CheckpointError as e:
    if str(e).startswith("checkpoint.init_from"):
      raise
    raise CheckpointError(f"checkpoint.init_from: {e}") from None
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"checkpoint.init_from: no complete checkpoint in {directory}")
  return restored.step, restored.state.params, restored.state.model_state
