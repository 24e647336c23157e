"""Shared benchmark machinery: interleaved repeated timing, memory readings, Markdown.

Every case is compiled and warmed up first; then the cases are run round-robin (in a
rotating order) `repeats` times, so a load change on the machine hits all of them alike.
Reported: median, min and the interquartile range (spread) per case, in milliseconds.
"""

import os
import shlex
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import jax

REFERENCE = dict(T=2048, D=256, H=8, K=16, Q=128, N=1024**2)


def block(x):
  return jax.block_until_ready(x)


def interleaved(cases: dict[str, Callable[[], object]], repeats: int = 7,
                warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of each zero-argument callable, timed round-robin."""
  for fn in cases.values():
    for _ in range(warmup):
      block(fn())
  names = list(cases)
  times = {name: [] for name in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      t0 = time.perf_counter()
      block(cases[name]())
      times[name].append(time.perf_counter() - t0)
  return times


def summary(ts: list[float]) -> dict[str, float]:
  ts = sorted(ts)
  q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
  return {"median": statistics.median(ts), "min": ts[0], "q1": q[0], "q3": q[2], "n": len(ts)}


def rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compiled_memory(jitted, *args) -> dict[str, float]:
  """XLA's own buffer sizes (MiB) for a jitted function at these arguments."""
  m = jitted.lower(*args).compile().memory_analysis()
  mib = lambda b: b / 2**20
  return {"temp": mib(m.temp_size_in_bytes), "args": mib(m.argument_size_in_bytes),
          "out": mib(m.output_size_in_bytes), "alias": mib(m.alias_size_in_bytes)}


def table(rows: list[dict], columns: list[str]) -> str:
  head = "| " + " | ".join(columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join([head, sep, *body])


def timing_rows(times: dict[str, list[float]], baseline: str | None = None,
                extra: dict[str, dict] | None = None) -> list[dict]:
  rows = []
  base = summary(times[baseline])["median"] if baseline else None
  for name, ts in times.items():
    s = summary(ts)
    row = {"case": name, "median ms": f"{s['median'] * 1e3:.1f}",
           "min ms": f"{s['min'] * 1e3:.1f}",
           "IQR ms": f"{s['q1'] * 1e3:.1f}–{s['q3'] * 1e3:.1f}", "n": s["n"]}
    if base:
      row[f"vs {baseline}"] = f"{base / s['median']:.2f}×"
    row.update((extra or {}).get(name, {}))
    rows.append(row)
  return rows


def machine() -> str:
  cpu = "?"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    load = "?"
  malloc = os.environ.get("LD_PRELOAD", "") or "glibc malloc"
  return (f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, allocator: {malloc}, "
          f"load average at start: {load}")


def command() -> str:
  """This run's command line as a user types it from the repo root (`python -m benchmarks.X`)."""
  script, *args = sys.argv
  module = os.path.splitext(os.path.basename(script))[0]
  if os.path.basename(os.path.dirname(os.path.abspath(script))) == "benchmarks":
    return " ".join(["python", "-m", f"benchmarks.{module}"] + [shlex.quote(a) for a in args])
  return " ".join(["python", script] + [shlex.quote(a) for a in args])


def report(lines: list[str], out_path: str | None) -> None:
  """Print the report (with this process's peak RSS) and write it to `out_path` if given."""
  text = "\n".join(lines + [f"\nPeak RSS of this process: {peak_rss_mib():.0f} MiB"])
  print(text)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
      f.write(text + "\n")
    print(f"written to {out_path}")
