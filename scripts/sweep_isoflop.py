#!/usr/bin/env python
"""Plan, launch, collect and fit an isoFLOP sweep (docs/sweeps.md).

  python scripts/sweep_isoflop.py --config=configs/isoflop_cpu.py --workdir=DIR \\
      [--dry_run] [--launcher=local|print|gcloud] [--collect_only] [--config.KEY=VALUE ...]

Writes DIR/plan.jsonl and DIR/dropped.jsonl; the local launcher trains every run in
DIR/runs/NAME one after another (skipping finished runs, resuming an interrupted one), then
writes DIR/results.jsonl, DIR/fits.jsonl, DIR/table.md, DIR/table.csv and DIR/isoflop.png.
  --dry_run            print the plan as JSON lines (gcloud: print the submissions) and stop
  --launcher=print     print one scripts/train.py command per run and stop
  --launcher=gcloud    submit each run to a TPU VM (gcloud compute tpus tpu-vm ssh --worker=all)
  --collect_only       only collect, fit, tabulate and plot what DIR/runs holds
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Sweep config file (configs/isoflop_*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: plan, runs/NAME, results.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (JSON lines) without training; "
                             "with --launcher=gcloud print the submissions instead.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "print", "gcloud"],
                              "How runs are launched.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only collect, fit, tabulate, plot.")
flags.mark_flags_as_required(["config", "workdir"])


def say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


class _Stop:
  """SIGTERM/SIGINT: forward SIGTERM to the running train.py (it saves and exits), then stop."""

  def __init__(self):
    self.requested = False
    self.child = None

  def handle(self, signum, frame):
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)


def launch_local(runs, base, workdir) -> int:
  from peer_jax import sweep
  from peer_jax.metrics import format_duration
  stop = _Stop()
  signal.signal(signal.SIGTERM, stop.handle)
  signal.signal(signal.SIGINT, stop.handle)
  runs_dir = os.path.join(workdir, "runs")
  status = {r.name: sweep.run_status(os.path.join(runs_dir, r.name), r.steps) for r in runs}
  todo = [r for r in runs if status[r.name][0] != "done"]
  total_flops = sum(r.total_flops for r in todo)
  say(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to train "
      f"({total_flops:.3g} FLOPs); logs in {runs_dir}/NAME/train.log")
  done_flops, t_start, failed = 0.0, time.time(), []
  for i, run in enumerate(todo, 1):
    run_dir = os.path.join(runs_dir, run.name)
    os.makedirs(run_dir, exist_ok=True)
    state, last = status[run.name]
    what = f"resuming after step {last}" if state == "partial" else "starting"
    say(f"[{i}/{len(todo)}] {run.name}: {what}; {run.steps} steps, {run.params / 1e6:.2f}M "
        f"params, {run.total_flops:.3g} FLOPs")
    cmd = sweep.train_command(run, base, os.path.abspath(run_dir), python=sys.executable)
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "a") as log:
      log.write(f"$ {sweep.shell_join(cmd)}\n")
      log.flush()
      stop.child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
      rc = stop.child.wait()
      stop.child = None
    if stop.requested:
      say(f"stopped during {run.name} (its checkpoint is kept); run the same command again "
          "to resume")
      return 130
    final = sweep.final_eval(sweep.read_metrics(os.path.join(run_dir, "metrics.jsonl")),
                             run.steps)
    took = time.time() - t0
    if rc != 0 or final is None:
      failed.append(run.name)
      say(f"[{i}/{len(todo)}] {run.name}: FAILED (exit {rc}); see {run_dir}/train.log")
      continue
    done_flops += run.total_flops
    rate = done_flops / max(time.time() - t_start, 1e-9)
    eta = (total_flops - done_flops) / rate if rate > 0 else 0.0
    losses = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in final.items()
                       if k.endswith("/loss"))
    say(f"[{i}/{len(todo)}] {run.name}: done in {format_duration(took)} ({losses}); "
        f"elapsed {format_duration(time.time() - t_start)}, ETA {format_duration(eta)}")
  if failed:
    say(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")
    return 1
  return 0


def launch_gcloud(runs, base, sweep_cfg, dry_run: bool) -> int:
  from peer_jax import sweep
  g = sweep_cfg.get("gcloud")
  if g is None or not g.get("tpus"):
    say("error: sweep config: gcloud.tpus: list the TPU VM names to submit to")
    return 2
  tpus = list(g.tpus)
  queues = {t: [] for t in tpus}
  for i, run in enumerate(runs):  # round-robin; each TPU runs its queue one run at a time
    queues[tpus[i % len(tpus)]].append(sweep.gcloud_command(run, base, tpus[i % len(tpus)], g))
  if dry_run:
    for t in tpus:
      for cmd in queues[t]:
        print(sweep.shell_join(cmd))
    return 0
  rcs = {}

  def worker(tpu):
    for cmd in queues[tpu]:
      say(f"{tpu}: {sweep.shell_join(cmd)[:160]}...")
      rc = subprocess.call(cmd)
      rcs.setdefault(tpu, []).append(rc)

  threads = [threading.Thread(target=worker, args=(t,)) for t in tpus]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  bad = sum(rc != 0 for v in rcs.values() for rc in v)
  say(f"gcloud: {len(runs)} submissions, {bad} failed; copy {g.workdir}/runs back into "
      f"--workdir/runs and rerun with --collect_only")
  return 1 if bad else 0


def collect_and_fit(runs, sweep_cfg, workdir) -> None:
  from peer_jax import sweep
  results = sweep.collect(runs, os.path.join(workdir, "runs"))
  sweep.write_jsonl(os.path.join(workdir, "results.jsonl"), results)
  say(f"collected {len(results)}/{len(runs)} finished runs")
  if not results:
    return
  fit_x = sweep_cfg.get("fit_x", "params")
  fits = sweep.fit_sweep(results, fit_x)
  sweep.write_jsonl(os.path.join(workdir, "fits.jsonl"), fits)
  md, csv_path = sweep.write_table(fits, workdir)
  png = sweep.plot_isoflop(results, fits, os.path.join(workdir, "isoflop.png"),
                           sweep_cfg.get("plot_eval_set") or None, fit_x)
  say(f"wrote {md}, {csv_path}, {png}")
  with open(md) as f:
    say(f.read().rstrip())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... --dry_run | head` ends quietly
  from peer_jax import sweep
  try:
    sweep_cfg = _CONFIG.value
    sweep_cfg.get("budgets")  # forces the lazy load, which raises a stored load error
  except OSError as e:
    say(f"error: command line: --config: cannot load config file "
        f"{flags.FLAGS['config'].config_filename} ({str(e).splitlines()[-1].strip()})")
    return 2
  workdir = _WORKDIR.value
  try:
    runs, dropped = sweep.plan_sweep(sweep_cfg)
  except sweep.SweepError as e:
    say(f"error: sweep config: {e}")
    return 2
  if not runs:
    say(f"error: sweep config: every candidate was dropped ({len(dropped)}: e.g. "
        f"{dropped[0]['name']}: {dropped[0]['reason']}); raise the budgets or shrink the sizes")
    return 2
  base = sweep_cfg.base
  try:
    os.makedirs(workdir, exist_ok=True)
    sweep.write_jsonl(os.path.join(workdir, "plan.jsonl"), [r.plan_record() for r in runs])
    sweep.write_jsonl(os.path.join(workdir, "dropped.jsonl"), dropped)
  except OSError as e:
    say(f"error: --workdir: cannot write to {workdir} ({e.strerror or e})")
    return 2
  say(f"plan: {len(runs)} runs ({len(dropped)} candidates dropped) in {workdir}/plan.jsonl")

  if _COLLECT_ONLY.value:
    collect_and_fit(runs, sweep_cfg, workdir)
    return 0
  if _LAUNCHER.value == "gcloud":
    return launch_gcloud(runs, base, sweep_cfg, _DRY_RUN.value)
  if _DRY_RUN.value:
    for r in runs:
      print(json.dumps({k: v for k, v in r.plan_record().items()}))
    return 0
  if _LAUNCHER.value == "print":
    for r in runs:
      print(sweep.shell_join(sweep.train_command(r, base, os.path.join(workdir, "runs", r.name))))
    return 0
  rc = launch_local(runs, base, workdir)
  if rc in (0, 1):
    collect_and_fit(runs, sweep_cfg, workdir)
  return rc


if __name__ == "__main__":
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
