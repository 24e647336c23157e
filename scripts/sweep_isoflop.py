#!/usr/bin/env python
"""Plan, launch, collect and fit an isoFLOP sweep (docs/sweeps.md).

  python scripts/sweep_isoflop.py --config=configs/isoflop_cpu.py --workdir=DIR \\
      [--dry_run] [--launcher=local|inprocess|print|gcloud] [--collect_only] [--smoke] \\
      [--results_dir=RESULTS] [--config.KEY=VALUE ...]

The local launcher runs the whole sweep, resumably: it trains the sweep's small tokenizer
(once, cached in DIR/tokenizer), the LR sweep, the main grid at each architecture's chosen
LR, then the second seeds at the sizes nearest each curve's minimum, one run after another
in DIR/runs/NAME (finished runs skipped, an interrupted one resumed), writing each finished
run's small summary to RESULTS/runs/NAME.json; then RESULTS/table.md, table.csv, fits.json
and isoflop.png. RESULTS is the config's results_dir (docs/results/isoflop_cpu for the CPU
sweep), else DIR/results.
  --dry_run            print the plannable runs as JSON lines and the time estimate; stop
                       (with --launcher=gcloud: print the submissions instead)
  --launcher=inprocess the local launcher, every run in this one process (no start-up per
                       run; runs of one size share one compiled step): the GPU sweep's
  --launcher=print     print one scripts/train.py command per run that can run now; stop
  --launcher=gcloud    submit those runs to TPU VMs (gcloud compute tpus tpu-vm ssh)
  --collect_only       only fit, tabulate and plot the summaries in RESULTS (no --workdir
                       needed: a fresh clone regenerates the committed table and plot)
  --smoke              the sweep config's tiny `smoke` form (results in DIR/results)
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: plan, tokenizer, runs/NAME "
                               "(required except with --collect_only).")
_RESULTS = flags.DEFINE_string("results_dir", None, "Where summaries, table and plot go "
                               "(default: the config's results_dir, else WORKDIR/results).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (JSON lines) and the time "
                             "estimate without training; with --launcher=gcloud print the "
                             "submissions instead.")
LAUNCHERS = ("local", "inprocess", "print", "gcloud")
_LAUNCHER = flags.DEFINE_enum("launcher", None, list(LAUNCHERS),
                              "How runs are launched (default: the sweep config's `launcher`, "
                              "else local).")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only fit, tabulate and plot the "
                                  "summaries in the results directory.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Run the sweep config's tiny smoke form.")
flags.mark_flags_as_required(["config"])


def say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


class _Stop:
  """SIGTERM/SIGINT: forward SIGTERM to the running train.py (it saves and exits), then stop.

  An in-process run holds its own SIGTERM handler while it trains (loop.Preemption); a
  Ctrl-C then becomes a SIGTERM to this process, which that handler takes."""

  def __init__(self):
    self.requested = False
    self.child = None
    self.in_process = False

  def handle(self, signum, frame):
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)
    elif self.in_process and signum != signal.SIGTERM:
      signal.raise_signal(signal.SIGTERM)


def _count(runs, phase):
  return sum(r.phase == phase for r in runs)


def _train_subprocess(run, base, run_dir, log_path, env, stop) -> int:
  from peer_jax import sweep
  cmd = sweep.train_command(run, base, os.path.abspath(run_dir), python=sys.executable)
  with open(log_path, "a") as log:
    log.write(f"$ {sweep.shell_join(cmd)}\n")
    log.flush()
    stop.child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)
    rc = stop.child.wait()
    stop.child = None
  return rc


def _train_in_process(run, base, run_dir, log_path, stop) -> int:
  from peer_jax import sweep
  stop.in_process = True
  try:
    rc = sweep.run_in_process(run, base, os.path.abspath(run_dir), log_path)
  finally:
    stop.in_process = False
  if rc == 0 and sweep.run_status(run_dir, run.steps)[0] != "done":
    stop.requested = True  # its SIGTERM handler took the signal: saved, not finished
  return rc


def _use_compilation_cache(env: dict, in_process: bool) -> None:
  if in_process:
    import jax
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def launch_local(sweep_cfg, planner, workdir, results_dir, in_process: bool = False) -> int:
  from peer_jax import sweep
  from peer_jax.metrics import format_duration
  stop = _Stop()
  signal.signal(signal.SIGTERM, stop.handle)
  signal.signal(signal.SIGINT, stop.handle)
  runs_dir = os.path.join(workdir, "runs")
  base = sweep_cfg.base
  timing = sweep_cfg.get("timing") or {}
  sweep.ensure_sweep_tokenizer(sweep_cfg, planner.raw_base, workdir, log=say)
  env = dict(os.environ)
  if sweep_cfg.get("compilation_cache"):
    # One persistent XLA cache for every run: the eval step of a size is shared by its
    # budgets and seeds, and a seed run's train step is its seed-0 run's.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(workdir),
                                                             "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    _use_compilation_cache(env, in_process)
  state = sweep.sweep_state(planner, sweep.read_summaries(results_dir))
  planned = len(state.all_runs()) + state.seed_pending
  finished = len(state.done)
  est0 = sweep.remaining_seconds(state, timing)
  say(f"sweep: {planned} runs ({len(state.lr_runs)} LR sweep, "
      f"{len(state.main_runs) - _count(state.main_runs, 'lr')} more main, "
      f"{len(state.seed_runs) + state.seed_pending} seed), {finished} finished; estimated "
      f"{format_duration(est0)} to go at the configured rates; logs in "
      f"{runs_dir}/NAME/train.log, summaries in {results_dir}/runs")
  t_start, failed = time.time(), set()
  est_done = wall_done = 0.0
  n = 0
  while True:
    if stop.requested:
      say("stopped between runs; run the same command again to resume")
      return 130
    state = sweep.sweep_state(planner, sweep.read_summaries(results_dir))
    todo = [r for r in state.todo() if r.name not in failed]
    if not todo:
      break
    run = todo[0]
    n += 1
    left = len(todo) + state.seed_pending + sum(r.provisional for r in state.all_runs()
                                                if r.name not in state.done)
    tag = f"[{finished + n}/{planned}]"
    run_dir = os.path.join(runs_dir, run.name)
    os.makedirs(run_dir, exist_ok=True)
    status, last = sweep.run_status(run_dir, run.steps)
    if status != "done":
      what = f"resuming after step {last}" if status == "partial" else "starting"
      say(f"{tag} {run.name} ({run.phase}, lr {run.learning_rate:g}, seed {run.seed}): {what}; "
          f"{run.steps} steps, {run.params / 1e6:.2f}M params, {run.total_flops:.3g} FLOPs")
      t0 = time.time()
      log_path = os.path.join(run_dir, "train.log")
      if in_process:
        rc = _train_in_process(run, base, run_dir, log_path, stop)
      else:
        rc = _train_subprocess(run, base, run_dir, log_path, env, stop)
      if stop.requested:
        say(f"stopped during {run.name} (its checkpoint is kept); run the same command again "
            "to resume")
        return 130
      took = time.time() - t0
    else:
      rc, took = 0, None
    summary = sweep.make_summary(run, run_dir, base)
    if rc != 0 or summary is None:
      failed.add(run.name)
      say(f"{tag} {run.name}: FAILED (exit {rc}); see {run_dir}/train.log")
      continue
    if took is not None:
      summary["wall_s"] = round(took, 1)
    sweep.write_summary(results_dir, summary)
    losses = ", ".join(f"{k} {v['loss']:.3f}" for k, v in summary["eval"].items())
    if took is None:
      say(f"{tag} {run.name}: already trained in {run_dir}; summary written ({losses})")
      continue
    est_done += sweep.estimate_seconds(run, timing)
    wall_done += took
    state = sweep.sweep_state(planner, sweep.read_summaries(results_dir))
    eta = sweep.remaining_seconds(state, timing) * (wall_done / max(est_done, 1e-9))
    say(f"{tag} {run.name}: done in {format_duration(took)} ({losses}); elapsed "
        f"{format_duration(time.time() - t_start)}, ETA {format_duration(eta)} "
        f"(~{left - 1} runs left)")
  state = sweep.sweep_state(planner, sweep.read_summaries(results_dir))
  for arch, lr in sorted(state.lrs.items()):
    if state.lr_source.get(arch) == "lr_sweep":
      say(f"lr_sweep: {arch} chose lr {lr:g}; pin it as lr_sweep.chosen['{arch}'] in the "
          "sweep config")
  from peer_jax import sweep_analysis
  for row in state.lr_table:
    if sweep_analysis.lr_edge(row):
      say(f"warning: lr_sweep: {row['arch']}: the best LR {row['measured_best']:g} is at an "
          "end of lr_sweep.grid; widen the grid (the table marks it not bracketed)")
  waiting = [r.name for r in state.all_runs() if r.provisional and r.name not in state.done]
  if failed or waiting:
    if failed:
      say(f"error: {len(failed)} run(s) failed: {', '.join(sorted(failed))}")
    if waiting:
      say(f"error: {len(waiting)} run(s) wait for an LR sweep that did not finish")
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
      f"--workdir/runs and rerun (finished runs get their summaries; the next phase is "
      "planned from them)")
  return 1 if bad else 0


def harvest(planner, state, workdir, results_dir, base) -> int:
  """Summaries for runs finished in WORKDIR/runs (e.g. copied back from elsewhere)."""
  from peer_jax import sweep
  n = 0
  for run in state.todo():
    summary = sweep.make_summary(run, os.path.join(workdir, "runs", run.name), base)
    if summary is not None:
      sweep.write_summary(results_dir, summary)
      n += 1
  return n


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... --dry_run | head` ends quietly
  from peer_jax import sweep
  from peer_jax.metrics import format_duration
  try:
    sweep_cfg = _CONFIG.value
    sweep_cfg.get("budgets")  # forces the lazy load, which raises a stored load error
  except OSError as e:
    say(f"error: command line: --config: cannot load config file "
        f"{flags.FLAGS['config'].config_filename} ({str(e).splitlines()[-1].strip()})")
    return 2
  workdir = _WORKDIR.value
  try:
    if _SMOKE.value:
      sweep_cfg = sweep.apply_smoke(sweep_cfg)
    if not workdir and not _COLLECT_ONLY.value:
      raise sweep.SweepError("--workdir: required (except with --collect_only)")
    results_dir = sweep.results_dir_of(sweep_cfg, workdir, _RESULTS.value)
    if _COLLECT_ONLY.value:
      if not sweep.report(sweep_cfg, results_dir, log=say):
        say(f"collect: no finished run in {results_dir}/runs yet")
      return 0
    planner = sweep.Planner(sweep_cfg, workdir)
    state = sweep.sweep_state(planner, sweep.read_summaries(results_dir))
  except sweep.SweepError as e:
    say(f"error: sweep config: {e}")
    return 2
  runs = state.all_runs()
  if not runs:
    d = planner.dropped
    say(f"error: sweep config: every candidate was dropped ({len(d)}: e.g. "
        f"{d[0]['name']}: {d[0]['reason']}); raise the budgets or shrink the sizes")
    return 2
  base = sweep_cfg.base
  try:
    os.makedirs(workdir, exist_ok=True)
    sweep.write_jsonl(os.path.join(workdir, "plan.jsonl"), [r.plan_record() for r in runs])
    sweep.write_jsonl(os.path.join(workdir, "dropped.jsonl"), planner.dropped)
  except OSError as e:
    say(f"error: --workdir: cannot write to {workdir} ({e.strerror or e})")
    return 2
  timing = sweep_cfg.get("timing") or {}
  provisional = sum(r.provisional for r in runs)
  if timing:
    est = (f"Estimated {format_duration(sweep.remaining_seconds(state, timing))} to go at the "
           f"configured rates (timing: {timing.get('overhead_s', 30.0):g} s per run + "
           f"{dict(timing.get('tokens_per_sec') or {}) or '-'} tokens/s, "
           f"{dict(timing.get('gflops') or {}) or '-'} GFLOP/s)")
  else:
    est = "No time estimate (the config has no timing section)"
  say(f"plan: {len(runs)} runs now plannable ({_count(runs, 'lr')} LR sweep, "
      f"{_count(runs, 'main')} main, {_count(runs, 'seed')} seed; {provisional} of them wait "
      f"for the LR sweep) + {state.seed_pending} seed runs planned once their curves finish; "
      f"{len(planner.dropped)} candidates dropped; {len(state.done)} finished. {est}. "
      f"Plan in {workdir}/plan.jsonl")

  launcher = _LAUNCHER.value or sweep_cfg.get("launcher") or "local"
  if launcher not in LAUNCHERS:
    say(f"error: sweep config: launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    return 2
  if launcher in ("gcloud", "print"):
    harvest(planner, state, workdir, results_dir, base)
    state = sweep.sweep_state(planner, sweep.read_summaries(results_dir))
    todo = state.todo()
    if launcher == "gcloud":
      return launch_gcloud(todo, base, sweep_cfg, _DRY_RUN.value)
    for r in todo:
      print(sweep.shell_join(sweep.train_command(r, base, os.path.join(workdir, "runs", r.name))))
    if provisional or state.seed_pending:
      say(f"print: {len(todo)} runs can run now; the rest depend on their results: when these "
          "are finished in WORKDIR/runs, run this again for the next ones")
    return 0
  if _DRY_RUN.value:
    for r in runs:
      print(json.dumps(r.plan_record()))
    return 0
  rc = launch_local(sweep_cfg, planner, workdir, results_dir, in_process=launcher == "inprocess")
  if rc in (0, 1):
    try:
      sweep.report(sweep_cfg, results_dir, log=say)
    except sweep.SweepError as e:
      say(f"error: sweep config: {e}")
      return 2
  return rc


if __name__ == "__main__":
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
