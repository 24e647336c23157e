"""isoFLOP sweeps, the launching half: a run's planned wall time, its scripts/train.py
command, the same run in this process, and the gcloud command that runs it on every worker
of a TPU VM."""

from __future__ import annotations

import contextlib
import shlex
import traceback
from typing import Iterable

from peer_jax.sweep_plan import Run


# ----------------------------------------------------------------------------- time


def estimate_seconds(run: Run, timing) -> float:
  """Planned wall time of one run: per-run overhead + its FLOPs at the arch's sustained
  GFLOP/s or its tokens at the arch's tokens/s, whichever is slower."""
  timing = timing or {}
  rates = []
  gflops = dict(timing.get("gflops") or {}).get(run.arch)
  if gflops:
    rates.append(run.total_flops / (gflops * 1e9))
  tps = dict(timing.get("tokens_per_sec") or {}).get(run.arch)
  if tps:
    rates.append(run.tokens / tps)
  if not rates:
    rates.append(run.total_flops / 10e9)
  return float(timing.get("overhead_s", 30.0)) + max(rates)


# ----------------------------------------------------------------------------- launching


def _flag_value(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def train_command(run: Run, base: str, workdir: str, python: str = "python") -> list[str]:
  """argv of the scripts/train.py run for `run` (relative paths: run from the repository root)."""
  cmd = [python, "scripts/train.py", f"--config={base}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={_flag_value(v)}" for k, v in run.overrides.items()]
  return cmd


def shell_join(argv: Iterable[str]) -> str:
  return " ".join(shlex.quote(a) for a in argv)


def run_in_process(run: Run, base: str, run_dir: str, log_path: str) -> int:
  """Train `run` in this process, as `train_command` would in a new one; returns its exit
  code. Saves each run the interpreter start, the imports and the backend start; with the
  schedule's numbers as step inputs (peer_jax/schedules.py), runs of one size also share
  one compiled step. Its output is appended to log_path, as a subprocess's would be."""
  from peer_jax.cli import run_or_explain
  from peer_jax.sweep_config import apply_overrides, load_config_file
  from peer_jax.train import train_and_evaluate
  cfg = apply_overrides(load_config_file(base), run.overrides)
  with open(log_path, "a") as log, contextlib.redirect_stdout(log), \
       contextlib.redirect_stderr(log):
    print(f"$ (in process) {shell_join(train_command(run, base, run_dir))}", flush=True)
    try:
      return run_or_explain(lambda: train_and_evaluate(cfg, run_dir))
    except Exception:  # a crash fails this run, as a subprocess's would, not the sweep
      traceback.print_exc()
      return 1


def gcloud_command(run: Run, base: str, tpu: str, gcfg) -> list[str]:
  """`gcloud compute tpus tpu-vm ssh TPU --worker=all --command=...` for one run."""
  workdir = f"{gcfg.workdir.rstrip('/')}/runs/{run.name}"
  remote = (f"cd {shlex.quote(gcfg.repo_dir)} && "
            + shell_join(train_command(run, base, workdir, python=gcfg.python)))
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu]
  if gcfg.get("zone"):
    cmd.append(f"--zone={gcfg.zone}")
  if gcfg.get("project"):
    cmd.append(f"--project={gcfg.project}")
  cmd += ["--worker=all", f"--command={remote}"]
  return cmd
