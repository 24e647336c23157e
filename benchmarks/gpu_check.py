"""The short GPU check of issue 17 (run by benchmarks/gpu_check.sh): three side-by-side
measurements in one process, each case timed interleaved with the others.

    python -m benchmarks.gpu_check            # one GPU (H200 sizes: ~8 min budget)
    python -m benchmarks.gpu_check --tiny     # CPU smoke run, tiny shapes, seconds

(a) Expert path fwd+bwd, XLA (`peer_experts`) against the Pallas kernels of this backend
    (Triton on GPU, Mosaic on TPU; on CPU the Triton kernels in interpret mode), at
    N = 1024², D = 1024, 16k tokens, h = 8, k = 16, f32 and bf16 tables: median time,
    the bytes the path must move at least (benchmarks.bench_pallas.min_bytes) over that
    time, and its share of the card's peak HBM bandwidth.
(b) The PEER layer fwd+bwd (retrieval included) with kernel=xla and kernel=pallas against
    a dense FFW of the same forward FLOPs (d_ff = PEER FLOPs / 4D, peer_jax.flops).
(c) A full bf16 train step (forward, backward, AdamW) of a ~100M-parameter dense model and
    its PEER counterpart (the middle block's FFW replaced, kernel=auto): tokens/s, and MFU
    from peer_jax.flops (training FLOPs per token over the bf16 dense peak).

Ratios are of medians measured in the same run. Nothing here asserts on time.
"""

import argparse
import functools
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.bench_pallas import PEAK_GBPS, min_bytes


def _peak_gbps():
  kind = jax.devices()[0].device_kind.lower()
  return next((v for k, v in PEAK_GBPS.items() if k in kind), None)


def _pallas_impl():
  platform = jax.default_backend()
  if platform == "tpu":
    from peer_jax.ops.pallas_experts import peer_experts_pallas
    return "pallas (Mosaic)", peer_experts_pallas, False
  from peer_jax.ops.pallas_experts_gpu import peer_experts_pallas_gpu
  return ("pallas (Triton)" if platform == "gpu" else "pallas (Triton, interpret)",
          peer_experts_pallas_gpu, platform == "cpu")


def expert_path(a, lines):
  from peer_jax.ops import peer_experts
  name, pallas_fn, interpret = _pallas_impl()
  T, D, H, K, N = a.tokens, a.d, a.h, a.k, a.n
  peak = _peak_gbps()
  lines.append(f"\n## (a) expert path fwd+bwd: T={T}, D={D}, N={N}, h={H}, k={K}\n")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, N, size=(T, H, K)), jnp.int32)
  w = jax.nn.softmax(jnp.asarray(rng.normal(size=(T, H, K)), jnp.float32), -1)
  dy = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  rows = []
  for dtype in a.table_dtypes:
    u = (jax.random.normal(jax.random.key(1), (N, D)) / D**0.5).astype(dtype)
    v = jax.random.normal(jax.random.key(2), (N, D)).astype(dtype)

    def fwd_bwd(fn):
      def f(x, w, u, v):
        y, vjp = jax.vjp(lambda x, w, u, v: fn(x, idx, w, u, v, jax.nn.gelu), x, w, u, v)
        return vjp(dy.astype(y.dtype))
      return jax.jit(f)

    cases = {"xla": fwd_bwd(functools.partial(peer_experts, chunk_size=a.chunk)),
             name: fwd_bwd(functools.partial(pallas_fn, interpret=interpret))}
    # Same results before timing (a wrong fast kernel is not fast).
    got = [jax.tree.map(np.asarray, c(x, w, u, v)) for c in cases.values()]
    err = max(float(np.max(np.abs(g1.astype(np.float32) - g0.astype(np.float32)))
                    / max(1.0, float(np.max(np.abs(g0.astype(np.float32))))))
              for g0, g1 in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1])))
    times = common.interleaved({k: functools.partial(c, x, w, u, v) for k, c in cases.items()},
                               repeats=a.repeats)
    need = min_bytes(T, D, H * K, N, jnp.dtype(dtype).itemsize, backward=True)
    for k, ts in times.items():
      med = common.summary(ts)["median"]
      gbps = need / med / 1e9
      rows.append({"tables": jnp.dtype(dtype).name, "case": k, "median ms": f"{med * 1e3:.2f}",
                   "vs xla": f"{common.summary(times['xla'])['median'] / med:.2f}×",
                   "GB/s (min bytes)": f"{gbps:.0f}",
                   "% of peak": f"{100 * gbps / peak:.0f}%" if peak else "n/a",
                   "max rel err vs xla": f"{err:.1e}" if k != "xla" else ""})
    del u, v
  lines.append(common.table(rows, list(rows[0])))
  lines.append(f"\nmin bytes = gathered u, v rows fwd and bwd, x / dy rows per pair, one "
               f"write of du, dv, token rows; peak = {peak} GB/s ({jax.devices()[0].device_kind})")


def layer_vs_dense(a, lines):
  from flax import nnx
  from configs import base
  from peer_jax import flops
  from peer_jax.layers.ffw import DenseFFW
  from peer_jax.layers.peer import PEER
  cfg = base.get_config().model
  cfg.d_model, cfg.ffw = a.d, "peer"
  cfg.peer.num_experts, cfg.peer.heads, cfg.peer.top_k = a.n, a.h, a.k
  cfg.peer.query_dim = a.query_dim
  f = flops.flops_per_token(cfg, a.seq)
  peer_flops = f["expert_layer"] / len(flops._expert_layers(cfg))
  step = 8 if a.tiny else 128   # d_ff rounded to a multiple of this
  d_ff = max(step, int(round(peer_flops / (4 * a.d) / step)) * step)
  B, T = max(1, a.tokens // a.seq), a.seq
  lines.append(f"\n## (b) layer fwd+bwd: {B}×{T} tokens, D={a.d}; PEER N={a.n}, h={a.h}, "
               f"k={a.k}, query_dim={a.query_dim} ({peer_flops / 1e6:.1f} MFLOP/token fwd) "
               f"vs dense d_ff={d_ff} ({4 * a.d * d_ff / 1e6:.1f} MFLOP/token)\n")
  x = jax.random.normal(jax.random.key(0), (B, T, a.d), jnp.bfloat16)
  interp = "gpu" if jax.default_backend() == "cpu" else None
  layers = {
      "dense FFW": DenseFFW(a.d, d_ff, "gelu", rngs=nnx.Rngs(0), dtype=jnp.bfloat16),
      "PEER kernel=xla": PEER(a.d, num_experts=a.n, heads=a.h, top_k=a.k,
                              query_dim=a.query_dim, query_norm="batchnorm", kernel="xla",
                              rngs=nnx.Rngs(0), dtype=jnp.bfloat16),
      "PEER kernel=pallas": PEER(a.d, num_experts=a.n, heads=a.h, top_k=a.k,
                                 query_dim=a.query_dim, query_norm="batchnorm",
                                 kernel="pallas", interpret=interp, rngs=nnx.Rngs(0),
                                 dtype=jnp.bfloat16),
  }
  cases = {}
  for name, layer in layers.items():
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x, graphdef=graphdef, rest=rest):
      # train=False: batch-norm running statistics (no state update under grad; the
      # statistics' reduction is negligible next to the rest of the layer)
      out = nnx.merge(graphdef, params, rest)(x, train=False)
      y = out[0] if isinstance(out, tuple) else out
      return jnp.mean(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    cases[name] = functools.partial(step, params, x)
  times = common.interleaved(cases, repeats=a.repeats)
  lines.append(common.table(common.timing_rows(times, baseline="dense FFW"),
                            ["case", "median ms", "min ms", "IQR ms", "n", "vs dense FFW"]))
  lines.append("\n(vs dense FFW > 1× means faster than the dense FFW of equal FLOPs; the "
               "issue's goal is PEER ≥ 1/1.3 = 0.77×)")


def train_steps(a, lines):
  from benchmarks.bench_train import Stepper
  from configs import base
  from peer_jax import flops
  lines.append(f"\n## (c) bf16 train step (forward, backward, AdamW), batch {a.batch}×{a.seq}\n")
  cfgs = {}
  for kind in ("dense", "peer"):
    c = base.get_config()
    m = c.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.d_ff = (
        a.vocab, a.d_train, a.layers, a.heads_attn, 4 * a.d_train)
    m.dtype, m.ffw = "bfloat16", kind
    m.peer.num_experts, m.peer.heads, m.peer.top_k = a.n_train, a.h, a.k
    m.peer.query_dim = a.query_dim
    c.train.batch_size, c.train.seq_len = a.batch, a.seq
    c.train.warmup_steps = 1
    cfgs[kind] = c
  steppers = {k: Stepper(c) for k, c in cfgs.items()}
  times = common.interleaved(steppers, repeats=a.repeats)
  peak = flops.device_peak_flops()
  rows = []
  base_med = common.summary(times["dense"])["median"]
  for k, ts in times.items():
    s, c = steppers[k], cfgs[k]
    med = common.summary(ts)["median"]
    tps = s.tokens / med
    fpt = flops.flops_per_token(c.model, c.train.seq_len, training=True)["total_causal"]
    rows.append({"model": k, "params": f"{s.params / 1e6:.0f}M", "median ms": f"{med * 1e3:.1f}",
                 "tokens/s": f"{tps:,.0f}", "PEER/dense step": f"{med / base_med:.2f}×",
                 "train GFLOP/token": f"{fpt / 1e9:.2f}",
                 "MFU": f"{100 * flops.mfu(tps, fpt, peak):.1f}%"})
  lines.append(common.table(rows, list(rows[0])))
  lines.append(f"\nMFU peak: {peak / 1e12 if peak else float('nan'):.3g} TFLOP/s "
               f"(peer_jax.flops.device_peak_flops; bf16 dense on GPU, a measured f32 matmul on CPU)")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes")
  ap.add_argument("--parts", default="a,b,c")
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  if a.tiny:
    a.tokens, a.d, a.h, a.k, a.n, a.query_dim, a.chunk, a.seq = 64, 32, 2, 4, 16**2, 16, 32, 32
    a.vocab, a.d_train, a.layers, a.heads_attn, a.n_train, a.batch = 256, 32, 2, 2, 16**2, 2
    a.table_dtypes = (jnp.float32,)
    a.repeats = a.repeats or 2
  else:
    a.tokens, a.d, a.h, a.k, a.n, a.query_dim, a.chunk, a.seq = (
        16384, 1024, 8, 16, 1024**2, 256, 512, 2048)
    # ~100M dense: 12 blocks of D=768 (85M) + 32k-vocab embeddings; PEER: N = 1024².
    a.vocab, a.d_train, a.layers, a.heads_attn, a.n_train, a.batch = (
        32768, 768, 12, 12, 1024**2, 16)
    a.table_dtypes = (jnp.float32, jnp.bfloat16)
    a.repeats = a.repeats or 5
  lines = [f"# gpu_check ({'tiny' if a.tiny else 'full'})", "", common.machine(),
           f"command: {common.command()}"]
  t0 = time.perf_counter()
  failed = False
  try:
    for part, fn in (("a", expert_path), ("b", layer_vs_dense), ("c", train_steps)):
      if part not in a.parts.split(","):
        continue
      t1 = time.perf_counter()
      n = len(lines)
      try:
        fn(a, lines)
      except Exception as e:  # one part failing (e.g. a Triton compile) keeps the others
        failed = True
        lines.append(f"\n(part {part} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]})")
        traceback.print_exc()
      lines.append(f"\n(part {part}: {time.perf_counter() - t1:.0f} s)")
      print("\n".join(lines[n:]), flush=True)
  except KeyboardInterrupt:  # gpu_check.sh's timeout: keep what was measured
    failed = True
    lines.append("\n(INTERRUPTED by the time limit; the parts above are complete)")
  lines.append(f"\ntotal {time.perf_counter() - t0:.0f} s")
  common.report(lines, a.out or None)
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
