"""(e) The expert path, Pallas kernels vs the chunked XLA `peer_experts`: fwd and fwd+bwd.

    python -m benchmarks.bench_pallas                       # on a TPU or GPU: time both,
                                                            # interleaved
    python -m benchmarks.bench_pallas --T 4096 --D 1024 --dtype bfloat16
    python -m benchmarks.bench_pallas --topology v5p-8      # no device: AOT compile for a
                                                            # TPU topology (libtpu venv)

Timing mode runs on whatever device JAX has and times the Pallas kernels of that backend
next to `peer_experts`: on TPU `peer_experts_pallas` (Mosaic, pallas_experts.py), on GPU
`peer_experts_pallas_gpu` (Triton, pallas_experts_gpu.py). On CPU only `peer_experts` is
timed; `--interpret` adds both Pallas versions in interpret mode (tiny shapes only).
Besides time, each case reports the bytes the
expert path must move at least (gathered table rows, token rows, the dense (N, D) table
gradients) divided by the median time: the achieved HBM bandwidth, and its share of the
device's peak (`--peak-gbps`, default from the device kind: H200 4800, H100 3350,
v5p 2765, v5e 819, v4 1200, v6e 1640 GB/s).

`--topology` mode lowers and compiles fwd and fwd+bwd of `peer_experts_pallas` for one
device of that TPU topology (see scripts/compile_tpu.py, docs/scaling.md for the libtpu
venv) and prints XLA's memory analysis and cost estimate. The Pallas calls' FLOPs / bytes
in that estimate are the kernels' own `pl.CostEstimate`, not a measurement.
"""

import argparse
import os

PEAK_GBPS = {"h200": 4800, "h100": 3350, "a100": 2039, "v5p": 2765, "v5 lite": 819,
             "v5e": 819, "v4": 1200, "v6": 1640}


def min_bytes(t, d, m, n, table_bytes, backward):
  """Bytes the expert path cannot avoid moving: gathered rows of u and v (read once in the
  forward, again in the backward), token rows, and one write of each dense table gradient."""
  rows = t * m * 2 * d * table_bytes
  tokens = 2 * t * d * 4
  if not backward:
    return rows + tokens
  # bwd: re-gather u, v rows; gather x, dy rows per pair for the table gradients; write
  # du, dv; read x, dy, write dx.
  return 2 * rows + t * m * 2 * d * 4 + 2 * n * d * table_bytes + 2 * tokens


def _peak_gbps(device):
  kind = device.device_kind.lower()
  return next((v for k, v in PEAK_GBPS.items() if k in kind), None)


def _inputs(a, jnp, np, sharding=None):
  import jax
  rng = np.random.default_rng(0)
  shapes = dict(x=((a.T, a.D), jnp.float32), idx=((a.T, a.H, a.K), jnp.int32),
                w=((a.T, a.H, a.K), jnp.float32), u=((a.N, a.D), a.dtype),
                v=((a.N, a.D), a.dtype))
  if sharding is not None:
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes.values()]
  x = jnp.asarray(rng.normal(size=(a.T, a.D)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, a.N, size=(a.T, a.H, a.K)), jnp.int32)
  w = jax.nn.softmax(jnp.asarray(rng.normal(size=(a.T, a.H, a.K)), jnp.float32), -1)
  u = (jax.random.normal(jax.random.key(1), (a.N, a.D), jnp.float32) / a.D**0.5).astype(a.dtype)
  v = jax.random.normal(jax.random.key(2), (a.N, a.D), jnp.float32).astype(a.dtype)
  return [x, idx, w, u, v]


def _fns(jax, jnp, pallas_kw, platform="tpu", interpret=False):
  """fwd and fwd+bwd of `peer_experts` and of the Pallas kernels that run on `platform`."""
  from peer_jax.ops import peer_experts
  from peer_jax.ops.pallas_experts import peer_experts_pallas
  from peer_jax.ops.pallas_experts_gpu import peer_experts_pallas_gpu
  impls = {"peer_experts (XLA, chunked)": peer_experts}
  if platform == "tpu" or interpret:
    impls["peer_experts_pallas"] = lambda *a: peer_experts_pallas(*a, **pallas_kw)
  if platform == "gpu" or interpret:
    impls["peer_experts_pallas_gpu"] = lambda *a: peer_experts_pallas_gpu(*a, **pallas_kw)
  out = {}
  for name, fn in impls.items():
    def fwdbwd(x, idx, w, u, v, fn=fn):
      loss = lambda x, w, u, v: jnp.sum(fn(x, idx, w, u, v).astype(jnp.float32))
      return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, u, v)
    out[name] = (fn, fwdbwd)
  return out


def compile_only(a):
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from scripts.compile_tpu import topology_devices

  _, libtpu_name, devices = topology_devices(a.topology)
  mesh = Mesh(devices[:1], ("d",))
  args = _inputs(a, jnp, np, NamedSharding(mesh, PartitionSpec()))
  fwd, fwdbwd = _fns(jax, jnp, dict(interpret=False))["peer_experts_pallas"]
  print(f"Topology {a.topology} ({libtpu_name}), one device ({devices[0].device_kind}); "
        f"T={a.T} D={a.D} H·K={a.H * a.K} N={a.N} tables {jnp.dtype(a.dtype).name}\n")
  print("| case | compiled | XLA temp MiB | args MiB | out MiB | XLA FLOPs | XLA bytes | "
        "min bytes (model) |")
  print("|---|---|---|---|---|---|---|---|")
  m = a.H * a.K
  for name, fn, bwd in (("fwd", fwd, False), ("fwd+bwd", fwdbwd, True)):
    with jax.set_mesh(mesh):
      c = jax.jit(fn).lower(*args).compile()
    mem, cost = c.memory_analysis(), c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    mib = lambda b: f"{b / 2**20:.1f}"
    need = min_bytes(a.T, a.D, m, a.N, jnp.dtype(a.dtype).itemsize, bwd)
    print(f"| {name} | yes | {mib(mem.temp_size_in_bytes)} | {mib(mem.argument_size_in_bytes)} "
          f"| {mib(mem.output_size_in_bytes)} | {cost.get('flops', 0):.3g} "
          f"| {cost.get('bytes accessed', 0):.3g} | {need:.3g} |")


def timed(a):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import common

  dev = jax.devices()[0]
  peak = a.peak_gbps or _peak_gbps(dev)
  args = _inputs(a, jnp, np)
  fns = _fns(jax, jnp, dict(interpret=a.interpret or None), dev.platform, a.interpret)
  m, tb = a.H * a.K, jnp.dtype(a.dtype).itemsize
  cases, extra = {}, {}
  for name, (fwd, fwdbwd) in fns.items():
    for kind, fn, bwd in (("fwd", fwd, False), ("fwd+bwd", fwdbwd, True)):
      jitted = jax.jit(fn)
      mem = common.compiled_memory(jitted, *args)
      key = f"{name} {kind}"
      cases[key] = lambda jitted=jitted: jitted(*args)
      extra[key] = {"bytes (model) GB": f"{min_bytes(a.T, a.D, m, a.N, tb, bwd) / 1e9:.2f}",
                    "XLA temp MiB": f"{mem['temp']:.0f}", "_bwd": bwd}
  times = common.interleaved(cases, repeats=a.repeats)
  for key, ts in times.items():
    med = common.summary(ts)["median"]
    gbps = min_bytes(a.T, a.D, m, a.N, tb, extra[key].pop("_bwd")) / med / 1e9
    extra[key]["achieved GB/s"] = f"{gbps:.0f}"
    if peak:
      extra[key]["of peak"] = f"{100 * gbps / peak:.0f} %"
  rows = common.timing_rows(times, extra=extra)
  cols = ["case", "median ms", "min ms", "IQR ms", "n", "bytes (model) GB", "achieved GB/s",
          "of peak", "XLA temp MiB"]
  lines = [f"Machine: {common.machine()}, device: {dev.device_kind}, peak HBM "
           f"{peak or '?'} GB/s", f"Command: `{common.command()}`",
           f"Configuration: T={a.T}, D={a.D}, h={a.H}, k={a.K}, N={a.N}, tables "
           f"{jnp.dtype(a.dtype).name}, x / w f32", "", common.table(rows, cols)]
  if len(fns) == 1:
    lines.append(f"\n(no Pallas kernels timed on {dev.platform}: `--interpret` runs them "
                 f"in interpret mode)")
  common.report(lines, a.out)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--T", type=int, default=4096)
  ap.add_argument("--D", type=int, default=1024)
  ap.add_argument("--H", type=int, default=8)
  ap.add_argument("--K", type=int, default=16)
  ap.add_argument("--N", type=int, default=1024**2)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--interpret", action="store_true", help="CPU: Pallas interpret mode")
  ap.add_argument("--peak-gbps", type=float, default=None)
  ap.add_argument("--topology", default="", help="AOT-compile for this TPU topology only")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  compile_only(a) if a.topology else timed(a)


if __name__ == "__main__":
  main()
