"""Ablations at equal training FLOPs: plan variant runs, run them resumably, tabulate.

An ablation config (configs/ablations.py) is a ConfigDict with
  base:        run config every variant starts from (path relative to the repository root)
  budget:      training FLOPs of every run; steps = round(budget / (3·forward FLOPs per
               token · batch_size · seq_len)), so variants of different cost get different
               step counts and the same compute
  tokenizer_vocab: >0: train that many pieces on data.train_path once (cached in the
               workdir, peer_jax/small_tokenizer.py) and use it for every run
  overrides:   flat {'dotted.key': value} for every run
  variants:    {name: {'dotted.key': value}}; a variant is one training config
  seeds:       {name: (seeds...)} for variants run with more than `default_seeds`
  default_seeds: seeds of every other variant
  priority:    variants whose every seed runs before anything else (the seed-noise one)
  studies:     {study: {'title', 'variants': (names...), 'x' (optional key to plot against)}}

Every run is a normal `scripts/train.py` run in WORKDIR/runs/VARIANT_sSEED; its small summary
(overrides, command, steps, tokens, FLOPs, final eval metrics, expert usage) goes to
RESULTS/VARIANT_sSEED.json, and the tables and plots are made from those summaries alone.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import sys
from typing import Any

import numpy as np

from peer_jax import flops as flops_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AblationError(ValueError):
  """A bad ablation config or results directory; str() is one line."""


@dataclasses.dataclass(frozen=True)
class AblationRun:
  variant: str
  seed: int
  steps: int
  overrides: tuple[tuple[str, Any], ...]  # every --config.KEY=VALUE of the run
  train_flops: float

  @property
  def name(self) -> str:
    return f"{self.variant}_s{self.seed}"


def load_config_file(path: str):
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(full):
    raise AblationError(f"config file not found: {path}")
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location(f"_ablation_cfg_{abs(hash(full))}", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_overrides(cfg, overrides) -> None:
  for key, value in overrides:
    node = cfg
    *path, last = key.split(".")
    for part in path:
      if part not in node:
        raise AblationError(f"override {key}: no section {part!r} in the run config")
      node = node[part]
    if last not in node:
      raise AblationError(f"override {key}: unknown config key")
    node[last] = value


def plan(abl_cfg, tokenizer_path: str | None = None) -> list[AblationRun]:
  """Every (variant, seed) run of the config, at equal training FLOPs."""
  base = load_config_file(abl_cfg.base)
  runs = []
  for variant, var_over in abl_cfg.variants.items():
    # A variant's value replaces the shared one (one flag per key on the command line).
    overrides = list({**dict(abl_cfg.overrides), **dict(var_over)}.items())
    if tokenizer_path:
      overrides += [("data.tokenizer", tokenizer_path),
                    ("model.vocab_size", int(abl_cfg.tokenizer_vocab))]
    cfg = copy.deepcopy(base)
    apply_overrides(cfg, overrides)
    t = cfg.train
    per_token = 3 * flops_lib.flops_per_token(cfg.model, t.seq_len)["total"]
    steps = max(1, round(abl_cfg.budget / (per_token * t.batch_size * t.seq_len)))
    warmup = max(1, round(steps * abl_cfg.get("warmup_fraction", 0.05)))
    run_over = overrides + [("train.steps", steps), ("train.warmup_steps", warmup),
                            ("train.eval_every", steps), ("checkpoint.every", steps)]
    seeds = dict(abl_cfg.get("seeds", {})).get(variant, tuple(abl_cfg.default_seeds))
    for seed in seeds:
      runs.append(AblationRun(variant, int(seed), steps, tuple(run_over + [("seed", int(seed))]),
                              per_token * t.batch_size * t.seq_len * steps))
  # Every variant's first seed before any second seed: an interrupted run of the whole
  # config still has one result per variant.
  order = {s: i for i, s in enumerate(sorted({r.seed for r in runs}))}
  first = tuple(abl_cfg.get("priority", ()))
  return sorted(runs, key=lambda r: (r.variant not in first, order[r.seed]))


def selected_runs(runs, abl_cfg, studies) -> list[AblationRun]:
  if not studies:
    return runs
  unknown = [s for s in studies if s not in abl_cfg.studies]
  if unknown:
    raise AblationError(f"--study: unknown {unknown}; expected some of {list(abl_cfg.studies)}")
  wanted = {v for s in studies for v in abl_cfg.studies[s]["variants"]}
  return [r for r in runs if r.variant in wanted]


def format_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return str(value)


def train_command(run: AblationRun, base: str, workdir: str, python: str = sys.executable):
  return [python, "scripts/train.py", f"--config={base}", f"--workdir={workdir}"] + [
      f"--config.{k}={format_value(v)}" for k, v in run.overrides]


def shell_join(argv) -> str:
  return " ".join(shlex.quote(a) for a in argv)


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a torn last line of an interrupted run
  return out


def summarize(run: AblationRun, base: str, run_dir: str) -> dict | None:
  """The run's summary, or None if it has not finished (no final eval yet)."""
  records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  final = [r for r in records if r.get("step") == run.steps]
  if not final or not any(k.startswith("eval/") for k in final[-1]):
    return None
  last = final[-1]
  keep = {k: v for k, v in last.items()
          if k.startswith(("eval/", "train/loss", "moe/", "experts/"))}
  display = train_command(run, base, "$WORKDIR/runs/" + run.name, python="python")
  return {"name": run.name, "variant": run.variant, "seed": run.seed, "steps": run.steps,
          "train_flops": run.train_flops, "overrides": dict(run.overrides),
          "command": shell_join(display), "final": keep}


def load_summaries(results_dir: str) -> dict[str, dict]:
  if not os.path.isdir(results_dir):
    raise AblationError(f"results directory not found: {results_dir}")
  out = {}
  for name in sorted(os.listdir(results_dir)):
    if name.endswith(".json") and name != "tables.json":  # one run's summary
      with open(os.path.join(results_dir, name)) as f:
        s = json.load(f)
      out[s["name"]] = s
  return out


def spread(values) -> tuple[float, float]:
  """Mean and sample std (0 for one value)."""
  a = np.asarray(values, float)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def study_rows(study: dict, summaries: dict[str, dict], eval_set: str) -> list[dict]:
  """One row per variant of a study: mean/std of loss, ppl, bpb, expert usage over seeds."""
  rows = []
  for variant in study["variants"]:
    runs = [s for s in summaries.values() if s["variant"] == variant]
    if not runs:
      rows.append({"variant": variant, "seeds": 0})
      continue
    row = {"variant": variant, "seeds": len(runs), "steps": runs[0]["steps"],
           "train_flops": runs[0]["train_flops"]}
    for metric in ("loss", "ppl", "bpb"):
      vals = [s["final"].get(f"eval/{eval_set}/{metric}") for s in runs]
      if all(v is not None for v in vals):
        row[metric], row[f"{metric}_std"] = spread(vals)
    for stat in ("usage", "unevenness"):
      vals = [np.mean([v for k, v in s["final"].items()
                       if k.startswith(f"eval/{eval_set}/experts/") and k.endswith(stat)] or
                      [np.nan]) for s in runs]
      if not np.all(np.isnan(vals)):
        row[stat] = float(np.nanmean(vals))
    drops = [v for s in runs for k, v in s["final"].items() if k.endswith("dropped_fraction")]
    if drops:
      row["dropped"] = float(np.mean(drops))
    if "x" in study:
      row["x"] = runs[0]["overrides"].get(study["x"])
    rows.append(row)
  return rows


def markdown_table(rows: list[dict], eval_set: str) -> str:
  has = lambda key: any(key in r for r in rows)
  head = ["variant", "seeds", "steps", f"{eval_set} loss", "ppl", "bpb"]
  extra = [k for k in ("usage", "unevenness", "dropped") if has(k)]
  names = {"dropped": "dropped (last train step)"}
  lines = ["| " + " | ".join(head + [names.get(k, k) for k in extra]) + " |", "|" + "---|" * (len(head) + len(extra))]
  for r in rows:
    if not r.get("seeds"):
      lines.append(f"| {r['variant']} | 0 | not run |" + " |" * (len(head) + len(extra) - 3))
      continue
    pm = lambda m, f: (f"{r[m]:{f}} ± {r[m + '_std']:{f}}" if r.get(f"{m}_std") else
                       f"{r[m]:{f}}") if m in r else "–"
    cells = [r["variant"], str(r["seeds"]), str(r["steps"]), pm("loss", ".3f"), pm("ppl", ".1f"),
             pm("bpb", ".4f")]
    cells += [f"{r[k]:.3f}" if k in r else "–" for k in extra]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def noise_floor(abl_cfg, summaries, eval_set: str) -> tuple[str, float, int] | None:
  """(variant, std, n) of the variant with the most seeds: the stated seed noise."""
  best = None
  for variant in abl_cfg.variants:
    vals = [s["final"].get(f"eval/{eval_set}/loss") for s in summaries.values()
            if s["variant"] == variant]
    vals = [v for v in vals if v is not None]
    if len(vals) >= 2 and (best is None or len(vals) > best[2]):
      best = (variant, spread(vals)[1], len(vals))
  return best


def plot_study(rows: list[dict], study: dict, path: str, eval_set: str) -> bool:
  pts = [r for r in rows if r.get("seeds") and "x" in r and "loss" in r]
  if len(pts) < 2:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.4))
  xs = [r["x"] for r in pts]
  numeric = all(isinstance(x, (int, float)) for x in xs)
  pos = xs if numeric else list(range(len(xs)))
  ax.errorbar(pos, [r["loss"] for r in pts], yerr=[r.get("loss_std", 0) for r in pts],
              marker="o", capsize=3)
  if numeric and max(xs) / max(min(xs), 1e-9) > 8:
    ax.set_xscale("log", base=2)
  if not numeric:
    ax.set_xticks(pos, [r["variant"] for r in pts], rotation=20, fontsize=7)
  ax.set_xlabel(study.get("x", "variant"))
  ax.set_ylabel(f"{eval_set} loss")
  ax.set_title(study["title"], fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write_report(abl_cfg, results_dir: str, report_dir: str, img_dir: str) -> str:
  """Every study's table and plot, from the summaries in results_dir alone: writes
  report_dir/tables.md, report_dir/tables.json and img_dir/ablation_STUDY.png; returns the
  markdown."""
  summaries = load_summaries(results_dir)
  eval_set = abl_cfg.get("eval_set", "wikitext2_valid")
  os.makedirs(report_dir, exist_ok=True)
  os.makedirs(img_dir, exist_ok=True)
  parts = []
  noise = noise_floor(abl_cfg, summaries, eval_set)
  if noise:
    parts.append(f"Seed noise: {eval_set} loss std {noise[1]:.4f} over {noise[2]} seeds of "
                 f"`{noise[0]}`.\n")
  tables = {}
  for name, study in abl_cfg.studies.items():
    rows = study_rows(study, summaries, eval_set)
    tables[name] = rows
    parts.append(f"### {name}: {study['title']}\n\n{markdown_table(rows, eval_set)}\n")
    if plot_study(rows, study, os.path.join(img_dir, f"ablation_{name}.png"), eval_set):
      parts.append(f"![{name}](img/ablation_{name}.png)\n")
  report = "\n".join(parts)
  with open(os.path.join(report_dir, "tables.json"), "w") as f:
    json.dump(tables, f, indent=1, sort_keys=True)
  with open(os.path.join(report_dir, "tables.md"), "w") as f:
    f.write(report)
  return report


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def estimate_left(done_flops: float, elapsed: float, left_flops: float) -> float:
  return left_flops / (done_flops / elapsed) if done_flops > 0 and elapsed > 0 else math.nan
