"""(a) PEER expert path + retrieval fwd+bwd vs the naive JAX version, (b) the PEER layer vs
dense FFWs (d_ff = h·k and 4·D) and vs the public PyTorch PEER layer.

    python -m benchmarks.bench_layer                     # reference configuration
    python -m benchmarks.bench_layer --torch-python /tmp/torchvenv/bin/python
    python -m benchmarks.bench_layer --T 512 --N 65536   # smaller / quicker

All cases are timed interleaved in one process run (the torch layer in a subprocess of
its own virtualenv, driven call by call); prints Markdown tables.
"""

import argparse
import functools
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from benchmarks import common
from peer_jax.layers.ffw import DenseFFW
from peer_jax.layers.peer import PEER
from peer_jax.ops import peer_experts, peer_experts_reference, product_key_topk


def naive_product_key_topk(q1, q2, c1, c2, k):
  """The straightforward version: autodiff through lax.top_k (dense (.., n) score grads)."""
  n = c1.shape[0]
  s1, i1 = lax.top_k(jnp.einsum("...d,nd->...n", q1, c1), k)
  s2, i2 = lax.top_k(jnp.einsum("...d,nd->...n", q2, c2), k)
  cand = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], k * k)
  scores, flat = lax.top_k(cand, k)
  rows = jnp.take_along_axis(i1, flat // k, axis=-1)
  cols = jnp.take_along_axis(i2, flat % k, axis=-1)
  return scores, rows * n + cols


def retrieval_and_experts(topk_fn, experts_fn, H, K, Q):
  def f(x, w_q, c1, c2, u, v):
    T = x.shape[0]
    q = (x @ w_q).reshape(T, H, Q)
    s, i = topk_fn(q[..., :Q // 2], q[..., Q // 2:], c1, c2, K)
    return experts_fn(x, i, jax.nn.softmax(s, axis=-1), u, v)
  return f


def fwd_bwd(f, argnums):
  """jit of y, grads = vjp(f)(dy) for the given differentiable arguments."""
  def step(dy, *args):
    y, vjp = jax.vjp(lambda *a: f(*a), *args)
    return y, vjp(dy)
  return jax.jit(step)


def main(argv=None):
  ap = argparse.ArgumentParser()
  r = common.REFERENCE
  for key in ("T", "D", "H", "K", "Q", "N"):
    ap.add_argument(f"--{key}", type=int, default=r[key])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--torch-python", default=os.environ.get("PEER_BENCH_TORCH_PYTHON", ""),
                  help="python of a venv with torch==2.13.0 and peer-pytorch ('' to skip)")
  ap.add_argument("--skip-naive", action="store_true")
  ap.add_argument("--out", default="", help="also write the Markdown here")
  a = ap.parse_args(argv)
  T, D, H, K, Q, N = a.T, a.D, a.H, a.K, a.Q, a.N
  n = int(round(N ** 0.5))
  rng = np.random.default_rng(0)
  arr = lambda shape, s: jnp.asarray(rng.normal(size=shape) * s, jnp.float32)
  x, dy = arr((T, D), 1.0), arr((T, D), 1.0)
  w_q = arr((D, H * Q), D ** -0.5)
  c1, c2 = arr((n, Q // 2), Q ** -0.5), arr((n, Q // 2), Q ** -0.5)
  u, v = arr((N, D), D ** -0.5), arr((N, D), (K / H) ** 0.5)
  args = (x, w_q, c1, c2, u, v)

  out = [f"Machine: {common.machine()}", f"Command: `{common.command()}`",
         f"Configuration: f32, T={T}, D={D}, h={H}, k={K}, query dim {Q}, N={N} (n={n})", ""]

  # ---- (a) + (b): everything interleaved in one round-robin.
  cases, mem = {}, {}
  # Ours as the PEER layer runs on one CPU device: the FFI top-k (peer_jax.ops.fast_topk)
  # and the fused FFI expert kernels (peer_jax.ops.cpu_experts); "XLA" cases without them.
  fast_pk = functools.partial(product_key_topk, fast_cpu_topk=True)
  fast_experts = functools.partial(peer_experts, fast_cpu=True)
  ours = fwd_bwd(retrieval_and_experts(fast_pk, fast_experts, H, K, Q), None)
  cases["ours: retrieval+experts"] = lambda: ours(dy, *args)
  mem["ours: retrieval+experts"] = common.compiled_memory(ours, dy, *args)
  if not a.skip_naive:
    naive = fwd_bwd(retrieval_and_experts(naive_product_key_topk, peer_experts_reference,
                                          H, K, Q), None)
    cases["naive: retrieval+experts"] = lambda: naive(dy, *args)
    mem["naive: retrieval+experts"] = common.compiled_memory(naive, dy, *args)
  idx = jnp.asarray(rng.integers(0, N, (T, H, K)), jnp.int32)
  w = jax.nn.softmax(arr((T, H, K), 1.0), axis=-1)
  for label, fast in (("", True), (", XLA", False)):
    exp_only = jax.jit(lambda dy, x, w, u, v, fast=fast: jax.vjp(
        lambda x, w, u, v: peer_experts(x, idx, w, u, v, fast_cpu=fast), x, w, u, v)[1](dy))
    cases[f"ours: experts only{label}"] = lambda exp_only=exp_only: exp_only(dy, x, w, u, v)
    mem[f"ours: experts only{label}"] = common.compiled_memory(exp_only, dy, x, w, u, v)
  # bf16 tables: the chunked XLA path (f32 compute and accumulation after the gather).
  u16, v16 = u.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  cases["ours: experts only, bf16 tables"] = lambda: exp_only(dy, x, w, u16, v16)
  mem["ours: experts only, bf16 tables"] = common.compiled_memory(exp_only, dy, x, w, u16, v16)
  q = (x @ w_q).reshape(T, H, Q)
  ds = arr((T, H, K), 1.0)
  for label, topk_fn in (("", fast_pk), (", XLA top-k", product_key_topk)):
    ret_only = jax.jit(lambda ds, q1, q2, topk_fn=topk_fn: jax.vjp(
        lambda q1, q2, c1, c2: topk_fn(q1, q2, c1, c2, K)[0], q1, q2, c1, c2)[1](ds))
    cases[f"ours: top-k retrieval only{label}"] = (
        lambda ret_only=ret_only: ret_only(ds, q[..., :Q // 2], q[..., Q // 2:]))
  if not a.skip_naive:
    nret = jax.jit(lambda ds, q1, q2: jax.vjp(
        lambda q1, q2, c1, c2: naive_product_key_topk(q1, q2, c1, c2, K)[0],
        q1, q2, c1, c2)[1](ds))
    cases["naive: top-k retrieval only"] = lambda: nret(ds, q[..., :Q // 2], q[..., Q // 2:])

  # The nnx PEER layer itself (query network without norm, like peer-pytorch) and dense FFWs.
  layers = {
      "PEER layer (shared keys)": PEER(D, num_experts=N, heads=H, top_k=K, query_dim=Q,
                                       query_norm="none", rngs=nnx.Rngs(0)),
      f"dense FFW d_ff={H * K} (h·k)": DenseFFW(D, H * K, "gelu", rngs=nnx.Rngs(0)),
      f"dense FFW d_ff={4 * D} (4·D)": DenseFFW(D, 4 * D, "gelu", rngs=nnx.Rngs(0)),
  }
  for name, module in layers.items():
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def make(graphdef=graphdef, rest=rest):
      @jax.jit
      def step(params, x, dy):
        def f(params, x):
          out = nnx.merge(graphdef, params, rest)(x[None], train=True)
          return (out[0] if isinstance(out, tuple) else out)[0]
        y, vjp = jax.vjp(f, params, x)
        return y, vjp(dy)
      return step
    step = make()
    cases[name] = (lambda step=step, params=params: step(params, x, dy))
    mem[name] = common.compiled_memory(step, params, x, dy)
  del layers

  worker = None
  if a.torch_python:
    worker = subprocess.Popen(
        [a.torch_python, os.path.join(os.path.dirname(__file__), "torch_peer_worker.py"),
         f"--T={T}", f"--D={D}", f"--H={H}", f"--K={K}", f"--Q={Q}", f"--N={N}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = worker.stdout.readline().split(" ", 1)
    if ready[0] != "ready":
      raise RuntimeError(f"torch worker failed: {ready}")
    info = json.loads(ready[1])
    out.insert(2, f"PyTorch: peer-pytorch PEER, torch {info['torch']}, {info['threads']} "
               f"threads, softmax top-{K} per head, per-head keys")

    class TorchTimed:
      def __call__(self):
        worker.stdin.write("run\n")
        worker.stdin.flush()
        self.last = float(worker.stdout.readline())
        return None
    cases["peer-pytorch layer"] = TorchTimed()

  times = common.interleaved(cases, repeats=a.repeats)
  if worker:  # its own clock: only the layer's fwd+bwd, as for the JAX cases
    worker.stdin.write("quit\n")
    worker.stdin.flush()
    worker.wait()
  extra = {k: {"XLA temp MiB": f"{m['temp']:.0f}"} for k, m in mem.items()}
  base = "peer-pytorch layer" if worker else None
  rows = common.timing_rows(times, baseline=base, extra=extra)
  pairs = {"ours: retrieval+experts": "naive: retrieval+experts",
           "PEER layer (shared keys)": "naive: retrieval+experts",
           "ours: top-k retrieval only": "naive: top-k retrieval only",
           "ours: top-k retrieval only, XLA top-k": "naive: top-k retrieval only"}
  for row in rows:
    ref = pairs.get(row["case"])
    if ref in times:
      med = lambda c: common.summary(times[c])["median"]
      row["vs naive"] = f"{med(ref) / med(row['case']):.2f}×"
  cols = ["case", "median ms", "min ms", "IQR ms", "n", "XLA temp MiB"]
  cols += [c for c in (f"vs {base}" if base else None, "vs naive") if c and c in
           set().union(*rows)]
  out.append(common.table(rows, cols))
  common.report(out, a.out)


if __name__ == "__main__":
  main()
