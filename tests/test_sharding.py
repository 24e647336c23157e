"""Sharding: meshes from config, logical rules, the D-sharded PEER bank, equivalence on 8 devices.

Multi-device checks run in subprocesses that set
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported (this file is
also the worker script: `python tests/test_sharding.py WORKER ARGS_JSON`), so the rest of
the suite keeps its single CPU device.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
# f32 everywhere; the sharded programs only reorder sums (psums, partitioned matmuls), so
# losses agree to float32 rounding amplified by a few optimizer steps.
LOSS_RTOL = 1e-4


def run_worker(worker: str, args: dict, devices: int = 8, timeout: int = 900,
               script: str = __file__) -> dict:
  """Run `script WORKER ARGS_JSON` with `devices` host devices; its last stdout line (JSON)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  out = subprocess.run([sys.executable, os.path.abspath(script), worker, json.dumps(args)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- workers
# (run in the subprocess; jax is imported there, after XLA_FLAGS is set)


def equivalence_config(ffw: str):
  from tests.conftest import tiny_config
  cfg = tiny_config(ffw)
  m = cfg.model
  # Every sharded dimension divisible by 8: heads 8 (tensor), d_model 64 (fsdp/tensor), ...
  m.vocab_size, m.d_model, m.num_heads, m.d_ff = 512, 64, 8, 128
  m.ffw_layers = "1"
  cfg.train.batch_size, cfg.train.seq_len = 8, 16
  cfg.train.learning_rate, cfg.train.warmup_steps = 1e-2, 1
  return cfg


def fixed_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.ones((b, t), np.int32), "mask": np.ones((b, t), np.float32)}


def train_losses(cfg, mesh_shape, steps, devices=None):
  """Losses of `steps` train steps on a fixed batch with the given (data, fsdp, tensor) mesh."""
  import jax
  from peer_jax import sharding
  from peer_jax.config_validation import validate_config
  from peer_jax.train import Trainer
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  devices = jax.devices() if devices is None else devices
  validate_config(cfg, num_devices=len(devices), check_files=False)
  trainer = Trainer.build(cfg, devices=devices)
  batch = fixed_batch(cfg)
  rules = tuple(cfg.sharding.rules)
  with sharding.use_rules(trainer.mesh, rules):
    state = trainer.init_state()
    gb = {}
    for k, v in batch.items():
      shard = trainer.batch_sharding(v.ndim)
      if jax.process_count() == 1:
        gb[k] = jax.device_put(v, shard)
      else:  # each process feeds only its own rows, as the data pipeline does
        from peer_jax.distributed import local_batch_rows
        rows = local_batch_rows(shard, v.shape[0])
        gb[k] = jax.make_array_from_process_local_data(shard, v[rows], v.shape)
    losses = []
    for _ in range(steps):
      state, metrics = trainer.train_step(state, gb)
      losses.append(float(metrics["train/loss"]))
  return losses, trainer


def worker_equivalence(args):
  import jax
  out = {}
  for ffw in args["ffws"]:
    cfg = equivalence_config(ffw)
    res = {"1": train_losses(cfg, (1, 1, 1), args["steps"], devices=jax.devices()[:1])[0]}
    for shape in args["meshes"]:
      res[",".join(map(str, shape))] = train_losses(cfg, tuple(shape), args["steps"])[0]
    out[ffw] = res
  return out


def worker_bank(args):
  """Values and gradients of the sharded bank against the naive reference."""
  import jax
  import jax.numpy as jnp
  from peer_jax.ops.experts import peer_experts_glu_reference, peer_experts_reference
  from peer_jax.ops.sharded_experts import sharded_peer_experts
  from peer_jax.sharding import make_mesh
  T, H, K, N, D = 40, 2, 4, 256, 32
  ks = jax.random.split(jax.random.key(0), 7)
  x = jax.random.normal(ks[0], (T, D))
  idx = jax.random.randint(ks[1], (T, H, K), 0, N)
  idx = idx.at[:4].set(7)  # many tokens choosing one expert: duplicate scatter-adds
  w = jax.nn.softmax(jax.random.normal(ks[2], (T, H, K)), -1)
  u = jax.random.normal(ks[3], (N, D)) / D**0.5
  v = jax.random.normal(ks[4], (N, D))
  g = jax.random.normal(ks[5], (N, D)) / D**0.5
  dy = jax.random.normal(ks[6], (T, D))
  errs = {}
  for shape in args["meshes"]:
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    for glu in (False, True):
      def sharded(x, w, u, v, g):
        return sharded_peer_experts(x, idx, w, u, v, jax.nn.gelu, mesh=mesh,
                                    g=g if glu else None, chunk_size=3)

      def ref(x, w, u, v, g):
        return (peer_experts_glu_reference(x, idx, w, u, g, v) if glu
                else peer_experts_reference(x, idx, w, u, v))

      loss = lambda f: lambda *a: jnp.sum(f(*a) * dy)
      a = (x, w, u, v, g)
      got = (jax.jit(sharded)(*a),) + jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2, 3, 4)))(*a)
      want = (ref(*a),) + jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(*a)
      names = ("y", "dx", "dw", "du", "dv", "dg")
      errs[f"{shape} glu={glu}"] = {
          n: float(jnp.max(jnp.abs(p - q)) / (jnp.max(jnp.abs(q)) + 1e-30))
          for n, p, q in zip(names, got, want)}
  return errs


def hlo_collectives(hlo_text: str):
  """(op, element count) of every array a collective produces in an HLO module.

  Combined collectives (a tuple of arrays) count each array separately.
  """
  import re
  out = []
  for line in hlo_text.splitlines():
    m = re.search(r"\s(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                  r"(-start)?\(", line)
    if not m or " = " not in line[:m.start()]:
      continue
    lhs = line[line.index(" = ") + 3:m.start()]
    for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", lhs):
      n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      out.append((m.group(1), n))
  return out


def worker_hlo(args):
  """Collectives of the compiled PEER train step with tensor > 1."""
  import jax
  from peer_jax import sharding
  from peer_jax.train import Trainer, BATCH_KEYS
  cfg = equivalence_config("peer")
  p = cfg.model.peer
  p.num_experts, p.heads, p.top_k, p.query_dim = 64**2, 4, 8, 32
  cfg.model.d_model = 128
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = args["mesh"]
  trainer = Trainer.build(cfg)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding(v.ndim))
           for k, v in fixed_batch(cfg).items() if k in BATCH_KEYS}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       trainer.abstract_state, trainer.state_shardings)
  with sharding.use_rules(trainer.mesh, tuple(cfg.sharding.rules)):
    compiled = trainer.train_step.lower(state, batch).compile()
  n, d = p.num_experts, cfg.model.d_model
  return {"collectives": hlo_collectives(compiled.as_text()), "table": n * d,
          "tensor": args["mesh"][2]}


# ----------------------------------------------------------------------------- tests


def test_mesh_shapes_and_errors():
  from peer_jax import sharding
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.resolve_full_mesh_shape(
      {"data": -1, "fsdp": 1, "tensor": 2, "dcn_data": 2}, 16) == (8, 1, 2)
  with pytest.raises(sharding.MeshError, match="multiply to 4, but 8 devices"):
    sharding.resolve_mesh_shape({"data": 2, "fsdp": 1, "tensor": 2}, 8)
  with pytest.raises(sharding.MeshError, match="mesh.data: cannot fill"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(sharding.MeshError, match="3 slices"):
    sharding.resolve_full_mesh_shape({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 3}, 8)
  with pytest.raises(sharding.MeshError, match="mesh.dcn_fsdp"):
    sharding.dcn_shape({"dcn_fsdp": 0})


def test_logical_rules_and_constrain_is_identity_off_mesh():
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from peer_jax import sharding
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # fsdp is already taken by the batch: the embed dimension of activations stays whole.
  assert sharding.logical_to_mesh_spec(("batch", "length", "embed"), rules) == \
      P(("data", "fsdp"), None, None)
  x = jnp.ones((2, 3, 4))
  assert sharding.constrain(x, ("batch", "length", "embed")) is x
  assert sharding.current_rules() is None


def test_divisibility_error_names_dimension_axis_and_sizes():
  from peer_jax.config_validation import ConfigError, validate_sharding
  from tests.conftest import tiny_config
  cfg = tiny_config("peer")  # 2 attention heads
  with pytest.raises(ConfigError) as info:
    validate_sharding(cfg, (1, 1, 8))
  msg = str(info.value)
  assert msg.startswith("sharding.rules: parameter block_")
  assert "('heads', size 2)" in msg and "mesh axis 'tensor' (size 8)" in msg, msg
  cfg.model.num_heads = 1
  cfg.model.d_model = 36  # not divisible by fsdp=8 either
  with pytest.raises(ConfigError, match=r"'embed', size 36\) is not divisible by mesh axis "
                                        r"'fsdp' \(size 8\)"):
    validate_sharding(cfg, (1, 8, 1))
  cfg = tiny_config("peer")
  cfg.sharding.rules = tuple(cfg.sharding.rules) + (("experts", "data"),)
  cfg.sharding.rules = tuple(r for r in cfg.sharding.rules if r != ("experts", None))
  with pytest.raises(ConfigError, match="'experts' must map to None"):
    validate_sharding(cfg, (2, 1, 1))
  validate_sharding(tiny_config("peer"), (1, 1, 1))  # nothing to check on one device


def test_mesh_mismatch_error_through_validate_config():
  from peer_jax.config_validation import ConfigError, validate_config
  from tests.conftest import tiny_config
  cfg = tiny_config()
  cfg.mesh.data, cfg.mesh.tensor = 2, 2
  with pytest.raises(ConfigError, match="mesh: axis sizes .* multiply to 4, but 8 devices"):
    validate_config(cfg, num_devices=8, check_files=False)


@pytest.mark.parametrize("meshes", [
    [(2, 2, 2), (1, 1, 8)],
    pytest.param([(8, 1, 1), (1, 2, 4)], marks=pytest.mark.slow)])
def test_sharded_bank_matches_reference_values_and_grads(meshes):
  errs = run_worker("bank", {"meshes": meshes})
  for case, e in errs.items():
    for name, err in e.items():
      assert err < 1e-5, (case, name, err)


def test_peer_train_step_never_gathers_a_table():
  """Compiled PEER train step on mesh (2,1,4): no all-gather as large as a table slice."""
  out = run_worker("hlo", {"mesh": [2, 1, 4]})
  table_slice = out["table"] // out["tensor"]
  gathers = [n for op, n in out["collectives"] if op in ("all-gather", "all-to-all")]
  assert gathers, "expected some all-gathers (indices, activations)"
  assert max(gathers) < table_slice, (max(gathers), table_slice, out["collectives"])
  # The table gradients are all-reduced as D-slices over the data axis, never whole.
  reduces = [n for op, n in out["collectives"] if op == "all-reduce"]
  assert max(reduces) <= table_slice, (max(reduces), table_slice)


def check_equivalence(res):
  for ffw, by_mesh in res.items():
    ref = np.asarray(by_mesh.pop("1"))
    assert ref[-1] < ref[0]  # it trains
    for mesh, losses in by_mesh.items():
      np.testing.assert_allclose(losses, ref, rtol=LOSS_RTOL, err_msg=f"{ffw} mesh {mesh}")


def test_peer_meshes_train_the_same_losses_as_one_device():
  """The quick version: PEER on the mesh that uses every axis at once (the rest: slow)."""
  check_equivalence(run_worker("equivalence", {"ffws": ["peer"], "meshes": [(2, 2, 2)],
                                               "steps": 3}))


@pytest.mark.slow
@pytest.mark.parametrize("ffw", ["dense", "moe", "pkm", "peer"])
def test_all_meshes_train_the_same_losses_as_one_device(ffw):
  check_equivalence(run_worker("equivalence", {"ffws": [ffw], "meshes": MESHES, "steps": 3}))


def test_compile_tpu_rejects_bad_topology_names():
  script = os.path.join(REPO, "scripts", "compile_tpu.py")
  cfg = "--config=" + os.path.join(REPO, "configs", "c4_dense.py")
  for topo, msg in (("v9-8", "not a TPU slice name"), ("v5p-24", "not a power of two"),
                    ("v5p:2xQ", "bad chip grid")):
    out = subprocess.run([sys.executable, script, cfg, f"--topology={topo}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: --topology={topo}")
    assert msg in out.stderr and "v5p-32" in out.stderr  # lists valid names


def test_topology_names_map_to_libtpu_grids():
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  try:
    from compile_tpu import parse_topology  # noqa: E402  (flags defined on import)
  finally:
    sys.path.pop(0)
  assert parse_topology("v5p-32") == ("v5p", "v5p:2x2x4", 16)
  assert parse_topology("v4-8") == ("v4", "v4:2x2x1", 4)
  assert parse_topology("v5p-128") == ("v5p", "v5p:4x4x4", 64)
  assert parse_topology("v5litepod-16") == ("v5e", "v5e:4x4", 16)
  assert parse_topology("v6e-8") == ("v6e", "v6e:2x4", 8)


def test_compile_tpu_num_slices_must_match_the_dcn_mesh():
  """--num_slices is checked against mesh.dcn_* before libtpu is needed (none here)."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  try:
    from compile_tpu import TopologyError, check_num_slices  # noqa: E402
  finally:
    sys.path.pop(0)
  one = {"data": -1, "fsdp": 1, "tensor": 4, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1}
  assert check_num_slices(one, 1) == (1, 1, 1)
  assert check_num_slices({**one, "dcn_data": 2}, 2) == (2, 1, 1)
  assert check_num_slices({**one, "dcn_data": 2, "dcn_fsdp": 2}, 4) == (2, 2, 1)
  for mesh, n, msg in ((one, 2, "--config.mesh.dcn_data=2"),
                       ({**one, "dcn_data": 2}, 1, "pass --num_slices=2"),
                       ({**one, "dcn_data": 2}, 4, "spans 2 slice(s)"),
                       (one, 0, "must be a positive integer"),
                       ({**one, "dcn_data": 0}, 1, "mesh.dcn_data")):
    with pytest.raises(TopologyError, match=re.escape(msg)):
      check_num_slices(mesh, n)
  script = os.path.join(REPO, "scripts", "compile_tpu.py")
  out = subprocess.run([sys.executable, script, "--config=" + os.path.join(REPO, "configs",
                        "c4_dense.py"), "--topology=v5p-32", "--num_slices=2"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith("error: --num_slices=2: the config's mesh")


WORKERS = {"equivalence": worker_equivalence, "bank": worker_bank, "hlo": worker_hlo}

if __name__ == "__main__":
  sys.path.insert(0, REPO)
  import peer_jax  # noqa: F401  (Flax flags)
  result = WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
  print(json.dumps(result))
