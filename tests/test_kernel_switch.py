"""model.peer.kernel: resolution rules, config errors, and the PEER layer (not only the op)
equal to its XLA path in values and in the gradient of every parameter, with kernel=pallas
(TPU and GPU kernels in Pallas interpret mode) and cpu_ffi, on one device and on an
8-device CPU mesh with the sharded bank (subprocess, as tests/test_sharding.py).

Also PKM's embedding bag through the switch. Shapes are tiny; tests never time anything.
`python tests/test_kernel_switch.py WORKER ARGS_JSON` is the multi-device worker.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# (kernel, interpret) pairs checked against kernel="xla".
FAST_KERNELS = [("pallas", "tpu"), ("pallas", "gpu"), ("cpu_ffi", None)]
RTOL = ATOL = 2e-4


def _layer_values_and_grads(kernel, interpret, *, glu=False, rules=None, mesh=None, seed=0,
                            d=32, tokens=(2, 8), query_norm="layernorm"):
  """Output and the gradient of every nnx.Param of one PEER layer, as numpy dicts."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from peer_jax import sharding
  from peer_jax.layers.peer import PEER

  layer = PEER(d, num_experts=8 ** 2, heads=2, top_k=4, query_dim=8, query_norm=query_norm,
               glu=glu, chunk_size=5, kernel=kernel, interpret=interpret,
               rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed + 1), (*tokens, d))
  ct = jax.random.normal(jax.random.key(seed + 2), (*tokens, d))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    model = nnx.merge(graphdef, params, rest)
    y, _ = model(x, train=False)
    return jnp.sum(y * ct), y

  def run(params, x):
    (_, y), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, g_params, g_x

  if mesh is not None:
    def traced(params, x):
      with sharding.use_rules(mesh, rules):
        return run(params, x)
    y, g_params, g_x = jax.jit(traced)(params, x)
  else:
    y, g_params, g_x = jax.jit(run)(params, x)
  grads = {"/".join(map(str, path)): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
           for path, v in nnx.to_flat_state(g_params)}
  grads["x"] = np.asarray(g_x)
  return np.asarray(y), grads


def _assert_same(got, want):
  y, g = got
  y_ref, g_ref = want
  np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL * max(1, np.abs(y_ref).max()))
  assert sorted(g) == sorted(g_ref)
  for name in g_ref:
    scale = max(1.0, float(np.abs(g_ref[name]).max()))
    np.testing.assert_allclose(g[name], g_ref[name], rtol=RTOL, atol=ATOL * scale,
                               err_msg=name)


# ----------------------------------------------------------------------- resolution


def test_resolution_rules():
  from peer_jax.ops.kernels import KernelError, resolve_kernel
  r = lambda k, **kw: resolve_kernel(k, **{"glu": False, "d_model": 128, "slots": 8, **kw})[0]
  assert r("auto", platform="cpu") == "cpu_ffi"
  assert r("auto", platform="cpu", num_devices=8) == "xla"
  assert r("auto", platform="tpu") == "pallas_tpu"
  assert r("auto", platform="gpu") == "pallas_gpu"
  assert r("auto", platform="tpu", d_model=64) == "xla"          # D % 128
  assert r("auto", platform="tpu", d_model=256, model_shards=4) == "xla"  # 64 per shard
  assert r("auto", platform="tpu", slots=12) == "xla"             # H*K % 8
  assert r("auto", platform="gpu", d_model=40) == "xla"           # D % 16
  assert r("auto", platform="gpu", glu=True) == "xla"
  assert r("auto", platform="cpu", table_dtype=np.dtype("float16")) == "xla"
  assert r("xla", platform="tpu") == "xla"
  assert r("pallas", platform="cpu", interpret="gpu") == "pallas_gpu"
  assert r("pallas", platform="cpu", interpret="tpu", d_model=40, slots=3) == "pallas_tpu"
  assert r("cpu_ffi", platform="cpu", num_devices=8) == "cpu_ffi"  # per shard
  for kernel, kw, words in [
      ("pallas", {"platform": "cpu"}, "needs a TPU or GPU"),
      ("pallas", {"platform": "gpu", "glu": True}, "no GLU"),
      ("pallas", {"platform": "tpu", "d_model": 64}, "D % 128"),
      ("cpu_ffi", {"platform": "gpu"}, "only on CPU"),
      ("cpu_ffi", {"platform": "cpu", "table_dtype": np.dtype("float16")}, "f32"),
      ("fast", {"platform": "cpu"}, "unknown value")]:
    with pytest.raises(KernelError, match=words) as e:
      r(kernel, **kw)
    msg = str(e.value)
    assert msg.startswith("model.peer.kernel: ") and "\n" not in msg, msg


def test_target_platform_picks_kernels_for_the_compile_target():
  """scripts/compile_tpu.py compiles for a TPU from a CPU host: inside target_platform('tpu')
  auto and pallas mean the compiled Mosaic kernels (not interpret mode), and outside it the
  host's backend decides again."""
  from peer_jax.ops import kernels, pallas_experts, pallas_experts_gpu
  r = lambda k: kernels.resolve_kernel(k, glu=False, d_model=256, slots=32, model_shards=2)[0]
  assert r("auto") == "cpu_ffi" and pallas_experts._interpret(None)
  with kernels.target_platform("tpu"):
    assert kernels.backend_platform() == "tpu"
    assert r("auto") == "pallas_tpu" and r("pallas") == "pallas_tpu"
    assert not pallas_experts._interpret(None)
    with kernels.target_platform("gpu"):
      assert r("auto") == "pallas_gpu" and not pallas_experts_gpu._interpret(None)
    assert kernels.backend_platform() == "tpu"
  assert kernels.backend_platform() == "cpu" and r("auto") == "cpu_ffi"


def test_auto_fallback_logs_one_line(caplog):
  from peer_jax.ops import kernels
  kernels._logged.clear()
  with caplog.at_level(logging.WARNING, logger="peer_jax"):
    for _ in range(3):
      impl, why = kernels.resolve_kernel("auto", glu=True, d_model=128, slots=8, platform="tpu")
      kernels.log_choice(impl, why, "auto")
    kernels.log_choice("pallas_tpu", "tpu backend", "auto")   # a Pallas pick logs nothing
    kernels.log_choice("xla", "requested", "xla")             # an explicit setting neither
  lines = [r.getMessage() for r in caplog.records if "model.peer.kernel" in r.getMessage()]
  assert len(lines) == 1 and "GLU" in lines[0] and "\n" not in lines[0], lines


def test_config_validation_names_the_key():
  from peer_jax.config_validation import ConfigError, validate_config
  from tests.conftest import tiny_config
  for ffw, key, value, words in [("peer", "peer", "pallas", "needs a TPU or GPU"),
                                 ("peer", "peer", "triton", "unknown value"),
                                 ("pkm", "pkm", "pallas", "no Pallas embedding-bag"),
                                 ("pkm", "pkm", "cpu_ffi", "one CPU device")]:
    cfg = tiny_config(ffw)
    cfg.model[key].kernel = value
    if value == "cpu_ffi":
      cfg.mesh.data = 2   # a 2-device mesh (validated for 2 devices, nothing is built)
    with pytest.raises(ConfigError) as e:
      validate_config(cfg, num_devices=2 if value == "cpu_ffi" else 1, check_files=False)
    msg = str(e.value)
    assert msg.startswith(f"model.{key}.kernel: ") and words in msg and "\n" not in msg, msg
  for value in ("auto", "xla", "cpu_ffi"):
    cfg = tiny_config("peer")
    cfg.model.peer.kernel = value
    validate_config(cfg, num_devices=1, check_files=False)


def test_pallas_on_cpu_fails_at_build_time_not_in_tracing():
  """The layer (no config) raises the same one-line error when called, before tracing."""
  import jax
  from flax import nnx
  from peer_jax.layers.peer import PEER
  from peer_jax.ops.kernels import KernelError
  layer = PEER(16, num_experts=16, heads=1, top_k=2, query_dim=4, query_norm="none",
               kernel="pallas", rngs=nnx.Rngs(0))
  with pytest.raises(KernelError, match="^model.peer.kernel: pallas needs a TPU or GPU"):
    layer(jax.numpy.ones((1, 2, 16)))


# ----------------------------------------------------------------------- one device


@pytest.fixture(scope="module")
def xla_layer():
  return _layer_values_and_grads("xla", None)


@pytest.mark.parametrize("kernel,interpret", FAST_KERNELS)
def test_layer_matches_xla_one_device(kernel, interpret, xla_layer):
  _assert_same(_layer_values_and_grads(kernel, interpret), xla_layer)


def test_layer_auto_is_the_ffi_path_on_one_cpu_device(xla_layer):
  _assert_same(_layer_values_and_grads("auto", None), xla_layer)


def test_layer_glu_cpu_ffi_matches_xla():
  _assert_same(_layer_values_and_grads("cpu_ffi", None, glu=True),
               _layer_values_and_grads("xla", None, glu=True))


def test_interpret_env_var_selects_pallas(monkeypatch, xla_layer):
  from peer_jax.ops import kernels
  monkeypatch.setenv(kernels.INTERPRET_ENV, "gpu")
  assert kernels.resolve_kernel("pallas", glu=False, d_model=32, slots=8)[0] == "pallas_gpu"
  _assert_same(_layer_values_and_grads("pallas", None), xla_layer)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,interpret", FAST_KERNELS)
def test_layer_matches_xla_batchnorm_larger(kernel, interpret):
  kw = dict(d=64, tokens=(2, 24), query_norm="batchnorm", seed=3)
  _assert_same(_layer_values_and_grads(kernel, interpret, **kw),
               _layer_values_and_grads("xla", None, **kw))


@pytest.mark.parametrize("kernel", ["auto", "xla", "cpu_ffi"])
def test_pkm_bag_kernels_match_reference(kernel):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from peer_jax.layers.pkm import PKM, embedding_bag_cpu, embedding_bag_reference
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 50, size=(9, 6)), jnp.int32).at[:3, 0].set(7)
  w = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(9, 12)), jnp.float32)
  f = lambda bag: jax.value_and_grad(lambda t, w: jnp.sum(ct * bag(t, idx, w)), (0, 1))(table, w)
  got, want = jax.jit(lambda: f(embedding_bag_cpu))(), f(embedding_bag_reference)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # and the whole PKM layer with this kernel against kernel=xla
  def layer_out(k):
    layer = PKM(16, num_memories=36, heads=2, top_k=3, key_dim=8, query_norm="none",
                kernel=k, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    g, p, rest = nnx.split(layer, nnx.Param, ...)
    def loss(p):
      return jnp.sum(nnx.merge(g, p, rest)(x)[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(p)
  rng = np.random.default_rng(1)
  a = layer_out(kernel)
  rng = np.random.default_rng(1)
  b = layer_out("xla")
  for x1, x2 in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x1, x2, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- CPU mesh


def run_worker(worker: str, args: dict, devices: int = 8, timeout: int = 900) -> dict:
  """This file as the worker script of test_sharding's subprocess runner."""
  from tests.test_sharding import run_worker as run_script_worker
  return run_script_worker(worker, args, devices, timeout, script=__file__)


def worker_mesh(args):
  """Max errors of the layer on each mesh and kernel against kernel=xla on one device."""
  import jax
  from configs import base
  from peer_jax.sharding import make_mesh
  rules = tuple(base.get_config().sharding.rules)
  out = {}
  for glu in args["glu"]:
    want = _layer_values_and_grads("xla", None, glu=glu)
    for shape in args["meshes"]:
      mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
      for kernel, interpret in args["kernels"]:
        if glu and kernel == "pallas":
          continue
        name = f"{kernel}/{interpret}/{','.join(map(str, shape))}/glu={glu}"
        try:
          _assert_same(_layer_values_and_grads(kernel, interpret, glu=glu, rules=rules,
                                               mesh=mesh), want)
          out[name] = "ok"
        except AssertionError as e:
          out[name] = str(e)[:600]
  return out


def _check_mesh(meshes, kernels, glu):
  res = run_worker("worker_mesh", {"meshes": meshes, "kernels": kernels, "glu": glu})
  assert res and all(v == "ok" for v in res.values()), res


def test_sharded_bank_layer_matches_xla_on_a_cpu_mesh():
  # (data, fsdp, tensor): tokens over 2, D over 4 (8 columns per shard).
  # (kernel=xla on meshes against the references: tests/test_sharding.py)
  _check_mesh([[2, 1, 4]], [list(k) for k in FAST_KERNELS], [False])


@pytest.mark.slow
def test_sharded_bank_layer_matches_xla_on_more_meshes():
  _check_mesh([[8, 1, 1], [2, 4, 1], [1, 2, 4], [1, 1, 8]],
              [list(k) for k in FAST_KERNELS] + [["xla", None]], [False, True])


if __name__ == "__main__":
  worker, worker_args = sys.argv[1], json.loads(sys.argv[2])
  print(json.dumps(globals()[worker](worker_args)))


# ----------------------------------------------------------------------- gpu_check.sh


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
  """benchmarks/gpu_check.sh --tiny runs its three parts on CPU (no timing asserted)."""
  out = tmp_path / "gpu_check.md"
  env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(out), JAX_PLATFORMS="cpu",
             GPU_CHECK_TIMEOUT="1500",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--tiny"],
                       capture_output=True, text=True, env=env, timeout=1800)
  assert res.returncode == 0, res.stderr[-4000:]
  text = out.read_text()
  for words in ("## (a) expert path", "pallas (Triton, interpret)", "max rel err",
                "## (b) layer fwd+bwd", "PEER kernel=pallas", "## (c) bf16 train step", "MFU"):
    assert words in text, (words, text)
  assert "FAILED" not in text


# ----------------------------------------------------------------------- lowering for GPU


def _triton_kernels(fn, *args):
  import re
  import jax
  exported = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args)
  return sorted(set(re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*name = "(\w+)"',
                               exported.mlir_module())))


def test_layer_with_kernel_pallas_lowers_to_triton_for_cuda(monkeypatch):
  """The whole PEER layer (fwd+bwd of every parameter), traced as if on a GPU with
  kernel=auto, holds the three Triton kernels (lowering only: no GPU, no PTX)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from peer_jax.layers.peer import PEER
  from peer_jax.ops import kernels
  monkeypatch.setattr(kernels, "backend_platform", lambda: "gpu")
  layer = PEER(64, num_experts=16 ** 2, heads=2, top_k=4, query_dim=16, kernel="auto",
               rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jnp.ones((2, 16, 64), jnp.bfloat16)

  def grads(params, x):
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0].astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  assert _triton_kernels(grads, params, x) == ["_pair_kernel", "_rows_kernel",
                                               "_segment_kernel"]


def test_sharded_bank_building_blocks_lower_to_triton_for_cuda():
  import jax
  import jax.numpy as jnp
  from peer_jax.ops import pallas_experts_gpu as g
  s = jax.ShapeDtypeStruct
  t, m, n, d = 256, 32, 4096, 256
  idx, a, x, tab = s((t, m), jnp.int32), s((t, m), jnp.float32), s((t, d), jnp.float32), \
      s((n, d), jnp.bfloat16)
  assert _triton_kernels(lambda tab, i, x: g.pair_dots(tab, i, x), tab, idx, x) == [
      "_pair_kernel"]
  assert _triton_kernels(lambda tab, i, c: g.weighted_rows(tab, i, c), tab, idx, a) == [
      "_rows_kernel"]
  assert _triton_kernels(
      lambda i, a, x: g.table_grads(i, a, x, a, x, n, jnp.bfloat16, jnp.bfloat16),
      idx, a, x) == ["_segment_kernel"]


# ----------------------------------------------------------------------- through the config


@pytest.mark.slow
@pytest.mark.parametrize("kernel,interpret", [("pallas", "gpu"), ("cpu_ffi", None)])
def test_config_kernel_reaches_the_train_step(kernel, interpret, monkeypatch):
  """model.peer.kernel through validation, Trainer and 2 train steps: the losses of XLA."""
  import jax
  from peer_jax.ops import kernels
  from tests.test_sharding import equivalence_config, train_losses
  cfg = equivalence_config("peer")
  cfg.model.peer.query_norm = "layernorm"
  want = train_losses(cfg, (1, 1, 1), 2, devices=jax.devices()[:1])[0]
  if interpret:
    monkeypatch.setenv(kernels.INTERPRET_ENV, interpret)
  cfg.model.peer.kernel = kernel
  got = train_losses(cfg, (1, 1, 1), 2, devices=jax.devices()[:1])[0]
  np.testing.assert_allclose(got, want, rtol=1e-4)
