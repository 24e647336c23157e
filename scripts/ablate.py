#!/usr/bin/env python
"""Run the paper's ablations at CPU scale, at equal training FLOPs (docs/ablations.md).

  python scripts/ablate.py --config=configs/ablations.py --workdir=DIR [--study=a_num_experts]
      [--results_dir=docs/results/ablations] [--dry_run] [--collect_only]

Runs every (variant, seed) of the selected studies one after another in DIR/runs/NAME
(finished runs are skipped, an interrupted one resumes from its checkpoint), writes each
finished run's summary to RESULTS/NAME.json, then the tables (RESULTS/tables.md) and plots
(docs/img/ablation_STUDY.png) from the summaries alone (--report_dir puts both elsewhere).
--collect_only only remakes the tables and plots: a fresh clone regenerates
docs/ablations.md's numbers from the repo.
"""

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Ablation config (configs/ablations.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs train (required unless "
                               "--collect_only).")
_RESULTS = flags.DEFINE_string("results_dir", None, "Summaries and tables (default: the "
                               "config's results_dir).")
_REPORT = flags.DEFINE_string("report_dir", None, "Where tables.md/tables.json and the plots "
                              "go (default: RESULTS for the tables, docs/img for the plots).")
_STUDY = flags.DEFINE_list("study", [], "Studies to run (default: all).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the runs and their commands; stop.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only remake tables and plots.")
flags.mark_flags_as_required(["config"])


def say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from peer_jax import ablation
  cfg = _CONFIG.value
  results = os.path.abspath(_RESULTS.value or os.path.join(REPO, cfg.results_dir))
  report_dir = os.path.abspath(_REPORT.value) if _REPORT.value else results
  img_dir = report_dir if _REPORT.value else os.path.join(REPO, "docs", "img")
  try:
    if _COLLECT_ONLY.value:
      os.makedirs(img_dir, exist_ok=True)
      print(ablation.write_report(cfg, results, report_dir, img_dir))
      return 0
    if not _WORKDIR.value:
      say("error: flags: --workdir is required (or pass --collect_only)")
      return 2
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    tok = None
    if cfg.get("tokenizer_vocab", 0):
      base_cfg = ablation.load_config_file(cfg.base)
      train_path = dict(cfg.overrides).get("data.train_path", base_cfg.data.train_path)
      if _DRY_RUN.value:
        from peer_jax.small_tokenizer import tokenizer_path
        tok = tokenizer_path(workdir, train_path, cfg.tokenizer_vocab)
      else:
        from peer_jax.small_tokenizer import ensure_tokenizer
        tok = ensure_tokenizer(workdir, train_path, cfg.tokenizer_vocab, log=say)
    runs = ablation.selected_runs(ablation.plan(cfg, tok), cfg, _STUDY.value)
  except (ablation.AblationError, ValueError, OSError) as e:
    say(f"error: ablation: {e}")
    return 2
  if _DRY_RUN.value:
    for r in runs:
      print(json.dumps({"name": r.name, "steps": r.steps, "train_flops": r.train_flops}))
      print("  " + ablation.shell_join(ablation.train_command(
          r, cfg.base, os.path.join(workdir, "runs", r.name))))
    return 0
  os.makedirs(results, exist_ok=True)
  todo = [r for r in runs if not os.path.exists(os.path.join(results, f"{r.name}.json"))]
  say(f"ablation: {len(runs)} runs, {len(runs) - len(todo)} already summarised in {results}")
  stop = {"requested": False, "child": None}

  def handle(signum, frame):
    stop["requested"] = True
    if stop["child"] is not None and stop["child"].poll() is None:
      stop["child"].send_signal(signal.SIGTERM)  # train.py saves and exits

  signal.signal(signal.SIGTERM, handle)
  signal.signal(signal.SIGINT, handle)
  total = sum(r.train_flops for r in todo)
  done, t_start, failed = 0.0, time.time(), []
  for i, run in enumerate(todo, 1):
    run_dir = os.path.join(workdir, "runs", run.name)
    os.makedirs(run_dir, exist_ok=True)
    summary = ablation.summarize(run, cfg.base, run_dir)
    if summary is None:
      cmd = ablation.train_command(run, cfg.base, run_dir)
      with open(os.path.join(run_dir, "train.log"), "a") as log:
        log.write(f"$ {ablation.shell_join(cmd)}\n")
        log.flush()
        stop["child"] = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        rc = stop["child"].wait()
        stop["child"] = None
      if stop["requested"]:
        say(f"stopped during {run.name}; run the same command again to resume")
        return 130
      summary = ablation.summarize(run, cfg.base, run_dir)
      if rc != 0 or summary is None:
        failed.append(run.name)
        say(f"[{i}/{len(todo)}] {run.name}: FAILED (exit {rc}); see {run_dir}/train.log")
        continue
    with open(os.path.join(results, f"{run.name}.json.tmp"), "w") as f:
      json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(os.path.join(results, f"{run.name}.json.tmp"),
               os.path.join(results, f"{run.name}.json"))
    done += run.train_flops
    elapsed = time.time() - t_start
    loss = summary["final"].get(f"eval/{cfg.get('eval_set', 'wikitext2_valid')}/loss")
    say(f"[{i}/{len(todo)}] {run.name}: {run.steps} steps, loss {loss:.4f}; elapsed "
        f"{ablation.format_duration(elapsed)}, ETA "
        f"{ablation.format_duration(ablation.estimate_left(done, elapsed, total - done))}")
  print(ablation.write_report(cfg, results, report_dir, img_dir))
  if failed:
    say(f"error: ablation: {len(failed)} run(s) failed: {', '.join(failed)}")
    return 1
  return 0


if __name__ == "__main__":
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
