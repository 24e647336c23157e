#!/usr/bin/env python
"""XLA's TPU cost of small programs, against peer_jax.hlo_bytes' walker: how the PEER
retrieval's bytes were located (docs/scaling.md, "Where the bytes went").

  python scripts/tpu_cost_probes.py [--topology=v5p-32] [--json=out.json]

Needs libtpu (the `jax[tpu]` virtualenv of docs/scaling.md); nothing runs on a device. Each
probe is compiled for one device of the topology at the per-device shapes of the 6e18 PEER
layer on a data 4 x tensor 4 mesh (32 sequences of 2048 tokens, 2 of the 8 heads, n = 1024
sub-keys of 128, top-16), and printed with XLA's "bytes accessed" and the walker's count.
Pairs show the form peer_jax uses on TPU next to the one it replaced.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from absl import app, flags



def _define_flags():
  """Flags are defined only when run as a script (importing this module defines none)."""
  flags.DEFINE_string("topology", "v5p-32", "TPU slice whose first device the probes target.")
  flags.DEFINE_string("json", None, "Also write the results as JSON here.")


B, T, H_LOCAL, K, N_SUB, HALF = 32, 2048, 2, 16, 1024, 128


def probes(mesh):
  """{name: (function, [(shape, dtype), ...])}: each pair's TPU form after the one it
  replaced. mesh: a 1-device mesh of the TPU device the probes are compiled for."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from peer_jax.expert_stats import accumulate_expert_weights, expert_unevenness, expert_usage
  from peer_jax.ops.product_keys import _dense_backward, _sparse_backward, select_last
  from peer_jax.ops.sharded_experts import sharded_peer_experts

  bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
  lead = (B, T, H_LOCAL)
  cand, pick = ((*lead, K * K), bf), ((*lead, K), i32)
  q, c, ds = ((*lead, HALF), bf), ((N_SUB, HALF), bf), ((*lead, K), f32)

  def stats(i, w):
    z = accumulate_expert_weights(i, w, N_SUB * N_SUB)
    return expert_usage(z), expert_unevenness(z)

  slots = ((B * T * 8 * K,), i32), ((B * T * 8 * K,), f32)  # every head's retrievals

  def bank_grad(impl):
    # The D-sharded bank on one device's slice (D/t = 256 of 1024).
    def grad(x, idx, w, u, v):
      loss = lambda x, w, u, v: jnp.sum(sharded_peer_experts(x, idx, w, u, v, mesh=mesh,
                                                             impl=impl).astype(f32) ** 2)
      return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, u, v)
    return grad

  tokens, d_local, n_rows = B * T, 256, N_SUB * N_SUB
  bank = [((tokens, d_local), bf), ((tokens, 8, K), i32), ((tokens, 8, K), f32),
          ((n_rows, d_local), f32), ((n_rows, d_local), f32)]
  return {
      "expert bank fwd+bwd, XLA path (walker calibrated here)": (bank_grad("xla"), bank),
      "expert bank fwd+bwd, Pallas path (row kernels, table_grads)":
          (bank_grad("pallas_tpu"), bank),
      "candidates: take_along_axis (replaced)":
          (lambda v, j: jnp.take_along_axis(v, j, axis=-1), [cand, pick]),
      "candidates: one-hot select (TPU form)": (select_last, [cand, pick]),
      "sub-key backward: gather + scatter-add (replaced)":
          (lambda q, c, i, d: _sparse_backward(q, c, i, d, f32), [q, c, pick, ds]),
      "sub-key backward: dense, two matmuls (TPU form)":
          (lambda q, c, i, d: _dense_backward(q, c, i, d, f32), [q, c, pick, ds]),
      "sub-key top-k: lax.top_k over n": (lambda s: lax.top_k(s, K), [((*lead, N_SUB), bf)]),
      "per-step usage histogram (train.expert_stats)": (stats, list(slots)),
  }


def main(argv):
  del argv
  import jax
  import numpy as np
  from jax.sharding import Mesh, SingleDeviceSharding
  import compile_tpu
  from peer_jax import hlo_bytes
  from peer_jax.ops import kernels
  _, _, devices = compile_tpu.topology_devices(flags.FLAGS.topology)
  where = SingleDeviceSharding(devices[0])
  mesh = Mesh(np.array(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  out = {}
  # The mesh context tells the Pallas TPU lowering which chip it compiles for.
  with kernels.target_platform("tpu"), jax.sharding.set_mesh(mesh):
    for name, (fn, shapes) in probes(mesh).items():
      args = [jax.ShapeDtypeStruct(s, d, sharding=where) for s, d in shapes]
      compiled = jax.jit(fn).lower(*args).compile()
      xla = float(compiled.cost_analysis()["bytes accessed"])
      ours = sum(r.bytes * r.count for r in hlo_bytes.attribute(compiled.as_text()))
      out[name] = {"xla_bytes": xla, "walker_bytes": ours}
      print(f"{name:52s} XLA {xla:.3e} B   walker {ours:.3e} B", flush=True)
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as f:
      json.dump({"topology": flags.FLAGS.topology, "probes": out}, f, indent=2)


if __name__ == "__main__":
  _define_flags()
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
