"""(d) Optimizer step on one PEER expert table (N, D): dense AdamW vs the table variants of
peer_jax.optim (lazy / row-sparse Adam, SGD, Adafactor), interleaved.

    python -m benchmarks.bench_optim                 # N = 1024², D = 256, T·h·k = 2048·8·16 rows
    python -m benchmarks.bench_optim --N 65536

The gradient is dense (N, D) with T·h·k random rows nonzero, as the expert kernel's VJP
produces it. Each case jits update + apply_updates with the parameters and optimizer state
donated (in place), like the train step.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from peer_jax import optim


def main(argv=None):
  ap = argparse.ArgumentParser()
  r = common.REFERENCE
  ap.add_argument("--N", type=int, default=r["N"])
  ap.add_argument("--D", type=int, default=r["D"])
  ap.add_argument("--rows", type=int, default=r["T"] * r["H"] * r["K"])
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--kinds", default="adamw,lazy_adam,sgd,adafactor")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = rng.integers(0, a.N, a.rows)
  grad = jnp.zeros((a.N, a.D), jnp.float32).at[rows].add(
      jnp.asarray(rng.normal(size=(a.rows, a.D)), jnp.float32))
  distinct = len(np.unique(rows))
  kw = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, max_rows=min(a.N, a.rows))
  cases, extra = {}, {}
  for kind in a.kinds.split(","):
    tx = optim.table_transform(kind, 1e-3, **kw)
    params = jnp.asarray(rng.normal(size=(a.N, a.D)) * 0.05, jnp.float32)
    state = tx.init(params)

    def step(params, state, grad, tx=tx):
      updates, state = tx.update(grad, state, params)
      return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    m = jitted.lower(params, state, grad).compile().memory_analysis()
    state_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    holder = {"p": params, "s": state}

    def run(holder=holder, jitted=jitted):
      holder["p"], holder["s"] = jitted(holder["p"], holder["s"], grad)
      return holder["p"]
    cases[kind] = run
    extra[kind] = {"opt state MiB": f"{state_mib:.0f}",
                   "XLA temp MiB": f"{m.temp_size_in_bytes / 2**20:.0f}"}
  if "lazy_adam" in a.kinds.split(","):  # the same step applied in place (no dense updates)
    params = jnp.asarray(rng.normal(size=(a.N, a.D)) * 0.05, jnp.float32)
    holder = {"p": params, "m": jnp.zeros_like(params), "v": jnp.zeros_like(params),
              "c": jnp.zeros((), jnp.int32)}

    def inplace(p, m, v, c, g):
      p, m, v = optim.lazy_adam_apply(p, m, v, g, c, 1e-3, max_rows=kw["max_rows"], b1=0.9,
                                      b2=0.95, eps=1e-8, weight_decay=0.1)
      return p, m, v, c + 1
    jitted = jax.jit(inplace, donate_argnums=(0, 1, 2, 3))
    m = jitted.lower(holder["p"], holder["m"], holder["v"], holder["c"], grad).compile()
    m = m.memory_analysis()

    def run_inplace(holder=holder, jitted=jitted):
      holder["p"], holder["m"], holder["v"], holder["c"] = jitted(
          holder["p"], holder["m"], holder["v"], holder["c"], grad)
      return holder["p"]
    cases["lazy_adam, applied in place"] = run_inplace
    extra["lazy_adam, applied in place"] = {
        "opt state MiB": f"{2 * params.nbytes / 2**20:.0f}",
        "XLA temp MiB": f"{m.temp_size_in_bytes / 2**20:.0f}"}
  times = common.interleaved(cases, repeats=a.repeats, warmup=1)
  out = [f"Machine: {common.machine()}", f"Command: `{common.command()}`",
         f"One table N={a.N}, D={a.D}, f32; gradient with {distinct} distinct nonzero rows "
         f"(of {a.rows} draws); weight decay 0.1", ""]
  base = "adamw" if "adamw" in cases else None
  out.append(common.table(common.timing_rows(times, baseline=base, extra=extra),
                          ["case", "median ms", "min ms", "IQR ms", "n"]
                          + ([f"vs {base}"] if base else []) + ["opt state MiB", "XLA temp MiB"]))
  common.report(out, a.out)


if __name__ == "__main__":
  main()
