"""isoFLOP sweeps: plan runs at fixed compute budgets, collect their summaries, fit, tabulate, plot.

The pieces live in peer_jax/sweep_config.py (base config, overrides, smoke form, tokenizer),
sweep_plan.py (checks, run names, phases), sweep_commands.py (train / gcloud commands, time
estimate), sweep_collect.py (run status, summaries) and sweep_analysis.py (fits,
bracketing, seed spread, table, plot); this module re-exports them and ties the phases
together (docs/sweeps.md):

    state = sweep_state(planner, summaries)   # what is planned, what is done, what is next
    report(sweep_cfg, results_dir)            # table.md, table.csv, fits.json, isoflop.png
                                              #   from the summaries in results_dir alone
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from peer_jax.sweep_analysis import (  # noqa: F401  (re-exported)
    STATUS_TEXT, analyze, arch_label, bracket_status, family_points, fit_curve, fit_parabola,
    plot_isoflop,
    pick_seed_sizes, ratios, table_markdown, write_table)
from peer_jax.sweep_collect import (  # noqa: F401  (re-exported)
    final_eval, make_summary, plan_digest, read_metrics, read_summaries, results_dir_of,
    run_status, summary_matches, summary_path, write_jsonl, write_summary)
from peer_jax.sweep_commands import (  # noqa: F401  (re-exported)
    estimate_seconds, gcloud_command, run_in_process, shell_join, train_command)
from peer_jax.sweep_config import (  # noqa: F401  (re-exported)
    REPO, SweepError, apply_overrides, apply_smoke, ensure_sweep_tokenizer, load_config_file)
from peer_jax.sweep_plan import (  # noqa: F401  (re-exported)
    ARCH_LABELS, ARCHS, FIT_X, PHASES, Planner, Run, budget_sizes, format_budget,
    parse_budget, parse_run_name, plan_sweep, run_name, size_grid, validate_sweep)


def select_eval_set(sweep, planner: Planner) -> str:
  """The eval set that picks LRs and seed sizes: select_eval_set, plot_eval_set, or the
  first of data.eval_paths."""
  name = sweep.get("select_eval_set") or sweep.get("plot_eval_set")
  if name:
    return name
  first = str(planner.base.data.eval_paths).split(",")[0]
  return first.split("=", 1)[0] if "=" in first else "eval"


def _done(summaries: dict[str, dict], run: Run) -> dict | None:
  s = summaries.get(run.name)
  return s if summary_matches(s, run) else None


@dataclasses.dataclass
class SweepState:
  lr_runs: list[Run]
  lrs: dict[str, float]           # arch -> the LR its main and seed runs use (known ones)
  lr_source: dict[str, str]       # arch -> 'config' (pinned) | 'lr_sweep' (measured)
  lr_table: list[dict]
  main_runs: list[Run]            # provisional (base LR) for archs whose LR is not known yet
  seed_runs: list[Run]            # for curves whose main runs are all done
  seed_pending: int               # seed runs not plannable yet (their curve is unfinished)
  seed_pending_keys: list         # (budget, arch, count) of those
  done: dict[str, dict]           # name -> summary, for every planned run with a summary

  def all_runs(self) -> list[Run]:
    seen, out = set(), []
    for r in self.lr_runs + self.main_runs + self.seed_runs:
      if r.name not in seen:
        seen.add(r.name)
        out.append(r)
    return out

  def todo(self) -> list[Run]:
    """Runs that can run now, in order: the LR sweep, main runs at a known LR, seed runs."""
    return [r for r in self.all_runs() if r.name not in self.done and not r.provisional]


def sweep_state(planner: Planner, summaries: dict[str, dict]) -> SweepState:
  sweep = planner.sweep
  eval_set = select_eval_set(sweep, planner)
  fit_x = sweep.get("fit_x", "params")
  family = sweep.get("fit_family", "all")
  lr_runs = planner.lr_runs()
  done = {r.name: _done(summaries, r) for r in lr_runs}
  lrs, source, lr_table = dict(planner.pinned_lrs()), {}, []
  for arch in lrs:
    source[arch] = "config"
  for arch in sweep.archs:
    runs = [r for r in lr_runs if r.arch == arch]
    if not runs:
      continue
    losses = {repr(r.learning_rate): done[r.name]["eval"][eval_set]["loss"]
              for r in runs if done[r.name] and eval_set in done[r.name]["eval"]}
    measured = None
    if len(losses) == len(runs):
      measured = min(runs, key=lambda r: losses[repr(r.learning_rate)]).learning_rate
      if arch not in lrs:
        lrs[arch], source[arch] = measured, "lr_sweep"
    lr_table.append({"arch": arch, "eval_set": eval_set, "grid": list(planner.lr_grid),
                     "losses": losses, "chosen": lrs.get(arch), "measured_best": measured,
                     "moe_routing": runs[0].moe_routing})
  # The main grid, extended (sizes.extend) where a finished curve is not bracketed: one
  # more ladder size beyond the end its best run is at, until it is or the limit is met.
  extend = sweep.sizes.get("extend", 0)
  extra: dict[tuple, list[int]] = {}
  final: dict[tuple, dict] = {}  # (budget, arch) -> fit of a finished, settled curve
  for _ in range(extend + 1):
    main_runs = planner.main_runs(lrs, extra)
    done.update({r.name: _done(summaries, r) for r in main_runs})
    grown = False
    for bi, budget in enumerate(sweep.budgets):
      for arch in sweep.archs:
        key = (float(budget), arch)
        if key in final:
          continue
        curve = [r for r in main_runs if r.budget == key[0] and r.arch == arch]
        pts = [done[r.name] for r in curve]
        if (not curve or any(r.provisional for r in curve)
            or any(p is None or eval_set not in p["eval"] for p in pts)):
          continue
        fit = fit_curve(pts, fit_x, eval_set, family)
        step = _extension(planner, curve, pts, fit, fit_x)
        new = None if step is None else _next_size(planner, curve, step, fit["family_depth"])
        if new is not None and len(extra.get(key, ())) < extend:
          extra.setdefault(key, []).append(new)
          grown = True
        else:
          final[key] = fit
    if not grown:
      break
  picks: dict[tuple, list] = {}
  nearest = (sweep.get("seeds") or {}).get("nearest", 0)
  pending, pending_keys = 0, []
  if (sweep.get("seeds") or {}).get("extra", 0) and nearest:
    for budget in sweep.budgets:
      for arch in sweep.archs:
        key = (float(budget), arch)
        curve = [r for r in main_runs if r.budget == key[0] and r.arch == arch]
        if key not in final:
          pending += sweep.seeds.extra * min(nearest, len(curve))
          pending_keys.append((key[0], arch, sweep.seeds.extra * min(nearest, len(curve))))
          continue
        pts = [done[r.name] for r in curve]
        picks[key] = pick_seed_sizes(pts, final[key], nearest, fit_x)
  seed_runs = planner.seed_runs(main_runs, picks)
  done.update({r.name: _done(summaries, r) for r in seed_runs})
  return SweepState(lr_runs=lr_runs, lrs=lrs, lr_source=source, lr_table=lr_table,
                    main_runs=main_runs, seed_runs=seed_runs, seed_pending=pending,
                    seed_pending_keys=pending_keys,
                    done={k: v for k, v in done.items() if v is not None})


def program_key(run: Run) -> tuple:
  """What a run's compiled train step depends on among a sweep's runs: its architecture and
  size (LR, warmup and length are step inputs: peer_jax/schedules.py)."""
  return (run.arch, run.d_model, run.num_layers, run.num_heads, run.d_ff)


def remaining_seconds(state: SweepState, timing) -> float:
  """Planned seconds of every run not finished yet, seed runs not plannable yet included
  (each at the mean planned time of its curve's main runs), plus `timing.compile_s` for
  each program (`program_key`) that no finished run has compiled yet."""
  todo = [r for r in state.all_runs() if r.name not in state.done]
  total = sum(estimate_seconds(r, timing) for r in todo)
  compiled = {program_key(r) for r in state.all_runs() if r.name in state.done}
  total += float((timing or {}).get("compile_s", 0.0)) * len(
      {program_key(r) for r in todo} - compiled)
  for budget, arch, count in state.seed_pending_keys:
    curve = [estimate_seconds(r, timing) for r in state.main_runs
             if r.budget == budget and r.arch == arch]
    total += count * (sum(curve) / len(curve) if curve else 0.0)
  return total


def _next_size(planner, curve, step: int, depth: int | None) -> int | None:
  """Index into the ladder of the size beyond the curve's smallest (step -1) or largest
  (+1) size, of the fit family's depth when it has one; None: the ladder has none."""
  idx = [planner.grid.index(planner._size(r.size)) for r in curve
         if depth is None or r.num_layers == depth]
  if not idx:
    return None
  ladder = range(min(idx) - 1, -1, -1) if step < 0 else range(max(idx) + 1, len(planner.grid))
  return next((i for i in ladder if depth is None or planner.grid[i][1] == depth), None)


def _extension(planner, curve, pts, fit, fit_x) -> int | None:
  """-1 / +1: the side a not-bracketed curve should grow towards; None: bracketed, or no
  side to tell (no minimum with an interior best run)."""
  if fit["status"] == "inside":
    return None
  if fit.get("family_depth") is not None:
    pts = [p for p in pts if int(p["num_layers"]) == fit["family_depth"]]
  order = sorted(range(len(pts)), key=lambda i: pts[i][fit_x])
  best = next(i for i in order if pts[i]["name"] == fit["best_run"])
  if best == order[0]:
    return -1
  if best == order[-1]:
    return +1
  a, b, _ = fit["coeffs"]
  if fit["status"] == "edge" and a > 0:
    import math as _m
    x_min = -b / (2 * a)
    return -1 if x_min < _m.log(pts[order[0]][fit_x]) else +1
  return None


def result_records(state: SweepState) -> list[dict]:
  """Finished runs as analysis inputs: main points (role 'main') and seed runs."""
  out = []
  for r in state.main_runs:
    s = state.done.get(r.name)
    if s is not None and not r.provisional:
      out.append(dict(s, role="main", lr_source=state.lr_source.get(r.arch, "base")))
  for r in state.seed_runs:
    s = state.done.get(r.name)
    if s is not None:
      out.append(dict(s, role="seed", lr_source=state.lr_source.get(r.arch, "base")))
  return out


def report(sweep, results_dir: str, log=print) -> dict[str, Any] | None:
  """Fit, tabulate and plot from results_dir's summaries alone (no workdir, no tokenizer):
  results_dir/table.md, table.csv, fits.json, isoflop.png. Returns the analysis (None if
  no main curve has a finished run)."""
  planner = Planner(sweep, None)
  summaries = read_summaries(results_dir)
  state = sweep_state(planner, summaries)
  records = result_records(state)
  planned = {r.name for r in state.all_runs()}
  stale = sorted(n for n in summaries if n in planned and n not in state.done)
  other = sorted(n for n in summaries if n not in planned)
  log(f"summaries: {len(state.done)} of this plan's {len(planned)} planned runs "
      f"(+{state.seed_pending} seed runs not plannable yet) in {results_dir}/runs"
      + (f"; {len(stale)} made by another plan (ignored, rerun to replace)" if stale else "")
      + (f"; {len(other)} not in this plan (ignored)" if other else ""))
  if not records:
    return None
  fit_x = sweep.get("fit_x", "params")
  analysis = analyze(records, fit_x, sweep.get("fit_family", "all"))
  analysis["lrs"] = {a: {"learning_rate": lr, "source": state.lr_source.get(a)}
                     for a, lr in state.lrs.items()}
  analysis["lr_table"] = state.lr_table
  md, csv_path = write_table(analysis, results_dir, state.lr_table)
  with open(os.path.join(results_dir, "fits.json"), "w") as f:
    json.dump(analysis, f, indent=1, sort_keys=True, default=_json_default)
    f.write("\n")
  eval_set = sweep.get("plot_eval_set") or None
  png = plot_isoflop(records, analysis, os.path.join(results_dir, "isoflop.png"), eval_set,
                     fit_x)
  log(f"wrote {md}, {csv_path}, {os.path.join(results_dir, 'fits.json')}, {png}")
  return analysis


def _json_default(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return str(v)
