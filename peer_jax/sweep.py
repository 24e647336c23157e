"""isoFLOP sweeps: plan runs at fixed compute budgets, collect their results, fit, tabulate, plot.

A sweep config (configs/isoflop_*.py) is a ConfigDict with
  base:        path (relative to the repository root) of the run config every run starts from
  budgets:     training FLOPs per run, e.g. (6e18, 2e19)
  archs:       any of dense, moe, pkm, peer
  sizes:       the size rule: d_model × num_layers grid (tuples) or explicit (d_model,
               num_layers) pairs; heads = d_model // head_dim (or a num_heads grid);
               d_ff = d_ff_ratio · d_model
  arch_overrides: {arch: nested overrides} (per-architecture layer settings)
  overrides:   nested like the base config, {'train': {'batch_size': 8}}, for every run
  tolerance:   drop candidates whose rounded step count misses the budget by more than this
  min_steps:   drop candidates with fewer steps (too few to train)
  warmup_fraction, eval_batches, checkpoint_every, log_every: per-run schedule settings
  flops_key:   'total' (full T×T attention, as computed) or 'total_causal'
  fit_x:       the fit's abscissa: params | active_params | non_embedding_params | tokens
  gcloud:      tpus (names), zone, project, repo_dir, python, workdir (on the VMs)

Every run is a normal `scripts/train.py` run; the planner only chooses its overrides:
  steps = round(budget / (training FLOPs per token × batch_size × seq_len)),
with training FLOPs = 3 × forward (model FLOPs; remat's recomputation is not charged).

    plan_sweep(sweep_cfg)          -> (runs, dropped)   runs: list of Run
    run_name(budget, arch, d, l, heads=None) / parse_run_name(name)
    train_command(run, workdir, python=...) -> argv of scripts/train.py
    run_status(run_dir, steps)     -> 'done' | 'partial' | 'missing', last step
    collect(runs, runs_dir)        -> one record per run with its final eval metrics
    fit_parabola(x, y)             -> (coeffs, x_min, y_min) of y = a·x² + b·x + c
    fit_sweep(results, fit_x)      -> one record per (budget, arch, eval set)
    write_table(fits, out_dir) / plot_isoflop(results, fits, path, eval_set)
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
from typing import Any, Iterable

import numpy as np

from peer_jax import flops as flops_lib

ARCHS = ("dense", "moe", "pkm", "peer")
ARCH_LABELS = {"dense": "Dense", "moe": "MoE", "pkm": "PKM", "peer": "PEER"}
FIT_X = ("params", "active_params", "non_embedding_params", "tokens")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(ValueError):
  """A bad sweep config or sweep directory; str() is one line."""


# ----------------------------------------------------------------------------- names


def format_budget(budget: float) -> str:
  """6e18 -> '6e18', 1.5e15 -> '1p5e15', 2.25e13 -> '2p25e13' (3 significant digits)."""
  mant, exp = f"{float(budget):.2e}".split("e")
  mant = mant.rstrip("0").rstrip(".").replace(".", "p")
  return f"{mant}e{int(exp)}"


def parse_budget(text: str) -> float:
  return float(text.replace("p", "."))


_NAME_RE = re.compile(r"^b(?P<budget>\d+(?:p\d+)?e-?\d+)_(?P<arch>[a-z]+)_d(?P<d_model>\d+)"
                      r"_l(?P<num_layers>\d+)(?:_h(?P<num_heads>\d+))?$")


def run_name(budget: float, arch: str, d_model: int, num_layers: int,
             num_heads: int | None = None) -> str:
  """'b6e18_peer_d512_l8' (with '_h8' when the sweep varies the head count)."""
  name = f"b{format_budget(budget)}_{arch}_d{d_model}_l{num_layers}"
  return name + (f"_h{num_heads}" if num_heads is not None else "")


def parse_run_name(name: str) -> dict[str, Any]:
  """Inverse of run_name: {'budget', 'arch', 'd_model', 'num_layers', 'num_heads' (or None)}."""
  m = _NAME_RE.match(name)
  if not m or m["arch"] not in ARCHS:
    raise SweepError(f"not a sweep run name: {name!r} (expected e.g. b6e18_peer_d512_l8)")
  return {"budget": parse_budget(m["budget"]), "arch": m["arch"],
          "d_model": int(m["d_model"]), "num_layers": int(m["num_layers"]),
          "num_heads": int(m["num_heads"]) if m["num_heads"] else None}


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass
class Run:
  name: str
  arch: str
  budget: float
  params: int
  active_params: int
  non_embedding_params: int
  flops_per_token: float
  steps: int
  tokens: int
  total_flops: float
  d_model: int
  num_layers: int
  num_heads: int
  overrides: dict  # flat config key -> value, passed to scripts/train.py as --config.KEY=VALUE

  def plan_record(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def load_config_file(path: str):
  """get_config() of a Python config file (path absolute or relative to the repository)."""
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(full):
    raise SweepError(f"base: config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_sweep_base_{abs(hash(full))}", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flat(d, prefix: str = "") -> dict[str, Any]:
  """Nested dicts/ConfigDicts -> {'a.b.c': value} (config override keys)."""
  out = {}
  for key, value in (d or {}).items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _get(cfg, key: str):
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def apply_overrides(cfg, overrides: dict[str, Any]):
  """A copy of cfg with flat 'a.b.c' keys set; unknown keys or wrong types raise SweepError."""
  cfg = copy.deepcopy(cfg)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    try:
      for part in parents:
        node = node[part]
      if leaf not in node:
        raise KeyError(leaf)
      old = node[leaf]
      if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise SweepError(f"override {key}={value!r}: not a settable key of the base config "
                       f"({type(e).__name__}: {e})") from None
  return cfg


def _need(sweep, key: str):
  if key not in sweep:
    raise SweepError(f"{key}: missing from the sweep config")
  return sweep[key]


def validate_sweep(sweep) -> None:
  budgets = _need(sweep, "budgets")
  if not budgets or any(isinstance(b, bool) or not isinstance(b, (int, float)) or
                        not math.isfinite(b) or b <= 0 for b in budgets):
    raise SweepError(f"budgets: must be a non-empty list of positive FLOP counts, got {budgets!r}")
  archs = _need(sweep, "archs")
  bad = [a for a in archs or () if a not in ARCHS]
  if not archs or bad:
    raise SweepError(f"archs: expected a non-empty subset of {', '.join(ARCHS)}, got {archs!r}")
  sizes = _need(sweep, "sizes")
  if sizes.get("pairs"):
    bad = [p for p in sizes.pairs if len(p) != 2 or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in p)]
    if bad:
      raise SweepError(f"sizes.pairs: must be (d_model, num_layers) pairs of positive integers, "
                       f"got {bad[0]!r}")
  else:
    for key in ("d_model", "num_layers"):
      vals = _need(sizes, key)
      if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise SweepError(f"sizes.{key}: must be a non-empty list of positive integers, "
                         f"got {vals!r}")
  if not (0 < sweep.get("tolerance", 0.05) < 1):
    raise SweepError(f"tolerance: must be in (0, 1), got {sweep.get('tolerance')!r}")
  if sweep.get("fit_x", "params") not in FIT_X:
    raise SweepError(f"fit_x: expected one of {', '.join(FIT_X)}, got {sweep.get('fit_x')!r}")
  if sweep.get("flops_key", "total") not in ("total", "total_causal"):
    raise SweepError(f"flops_key: expected total or total_causal, got {sweep.get('flops_key')!r}")
  unknown = set(sweep.get("arch_overrides", {}) or {}) - set(ARCHS)
  if unknown:
    raise SweepError(f"arch_overrides: unknown architectures {sorted(unknown)}")


def size_grid(sizes) -> list[tuple[int, int, int, int]]:
  """(d_model, num_layers, num_heads, d_ff) of every size: sizes.pairs of (d_model, num_layers)
  if given, else the product sizes.d_model × sizes.num_layers; × sizes.num_heads if given,
  else heads = d_model // sizes.head_dim; d_ff = sizes.d_ff_ratio · d_model."""
  out = []
  pairs = [tuple(p) for p in sizes.get("pairs") or ()] or list(
      itertools.product(sizes.d_model, sizes.num_layers))
  head_dim = sizes.get("head_dim", 0)
  heads_opts = tuple(sizes.get("num_heads", ())) or (None,)
  ratio = sizes.get("d_ff_ratio", 4)
  for (d, layers), h in itertools.product(pairs, heads_opts):
    if h is None:
      if not head_dim or d % head_dim:
        raise SweepError(f"sizes.head_dim: {head_dim!r} must divide every d_model (got {d}); "
                         "or give sizes.num_heads")
      h = d // head_dim
    if d % h or (d // h) % 2:
      raise SweepError(f"sizes: {h} heads do not give an even head dimension at d_model={d}")
    out.append((d, layers, h, int(round(ratio * d))))
  return out


def _training_flops(model_cfg, seq_len: int, key: str) -> float:
  m = copy.deepcopy(model_cfg)
  m.remat = False  # model FLOPs: remat's recomputation is a cost, not part of the budget
  return flops_lib.flops_per_token(m, seq_len, training=True)[key]


def plan_sweep(sweep) -> tuple[list[Run], list[dict[str, Any]]]:
  """All (budget, arch, size) runs that fit their budget, and the dropped candidates (why)."""
  validate_sweep(sweep)
  from peer_jax.config_validation import ConfigError, validate_model
  base = apply_overrides(load_config_file(_need(sweep, "base")), _flat(sweep.get("overrides", {})))
  if not str(base.data.eval_paths or "").strip():
    raise SweepError("overrides: data.eval_paths is empty: a sweep run needs an eval set "
                     "(its final eval loss is the result)")
  batch, seq_len = base.train.batch_size, base.train.seq_len
  tokens_per_step = batch * seq_len
  tol = sweep.get("tolerance", 0.05)
  min_steps = sweep.get("min_steps", 1)
  warmup_fraction = sweep.get("warmup_fraction", 0.05)
  flops_key = sweep.get("flops_key", "total")
  arch_overrides = dict(sweep.get("arch_overrides", {}) or {})
  grid = size_grid(sweep.sizes)
  name_heads = len(tuple(sweep.sizes.get("num_heads", ()))) > 1
  runs, dropped = [], []
  for budget, arch, (d, layers, heads, d_ff) in itertools.product(sweep.budgets, sweep.archs,
                                                                  grid):
    name = run_name(budget, arch, d, layers, heads if name_heads else None)
    model_keys = {"model.ffw": arch, "model.d_model": d, "model.num_layers": layers,
                  "model.num_heads": heads, "model.d_ff": d_ff}
    model_keys.update(_flat(arch_overrides.get(arch, {})))
    cfg = apply_overrides(base, model_keys)
    try:
      validate_model(cfg)
    except ConfigError as e:
      raise SweepError(f"run {name}: config: {e}") from None
    fpt = _training_flops(cfg.model, seq_len, flops_key)
    steps = int(round(budget / (fpt * tokens_per_step)))
    total = steps * tokens_per_step * fpt
    why = None
    if steps < max(min_steps, 1):
      why = f"{steps} steps < min_steps {min_steps}"
    elif abs(total / budget - 1) > tol:
      why = f"{total / budget - 1:+.1%} off budget after rounding to {steps} steps"
    if why:
      dropped.append({"name": name, "steps": steps, "reason": why})
      continue
    counts = flops_lib.param_counts(cfg.model, seq_len)
    run_keys = dict(model_keys)
    run_keys.update({
        "train.steps": steps,
        "train.warmup_steps": max(1, int(round(warmup_fraction * steps))),
        # Evaluate once, at the final step (train.py always evaluates the last step).
        "train.eval_every": steps,
    })
    for key, sweep_key in (("checkpoint.every", "checkpoint_every"),
                           ("train.log_every", "log_every"),
                           ("data.eval_batches", "eval_batches")):
      if sweep_key in sweep:
        run_keys[key] = sweep[sweep_key]
    # Everything that differs from the base config file goes on the command line.
    overrides = dict(_flat(sweep.get("overrides", {})))
    overrides.update(run_keys)
    runs.append(Run(name=name, arch=arch, budget=float(budget), params=counts["total"],
                    active_params=counts["active"],
                    non_embedding_params=counts["non_embedding"], flops_per_token=fpt,
                    steps=steps, tokens=steps * tokens_per_step, total_flops=total,
                    d_model=d, num_layers=layers, num_heads=heads, overrides=overrides))
  return runs, dropped


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


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def final_eval(records: list[dict], steps: int) -> dict[str, float] | None:
  """The eval metrics logged at `steps` (the final step), or None if not there yet."""
  for r in reversed(records):
    if r.get("step") == steps and any(k.startswith("eval/") for k in r):
      return {k: v for k, v in r.items() if k.startswith("eval/")}
  return None


def run_status(run_dir: str, steps: int) -> tuple[str, int]:
  """('done' | 'partial' | 'missing', last logged step) of a run directory."""
  records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  if final_eval(records, steps) is not None:
    return "done", steps
  if records or os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return "partial", max((r.get("step", 0) for r in records), default=0)
  return "missing", 0


# ----------------------------------------------------------------------------- collecting


def collect(runs: list[Run], runs_dir: str) -> list[dict[str, Any]]:
  """One record per finished run: its plan fields and final `eval/NAME/{loss,ppl}` metrics."""
  out = []
  for run in runs:
    records = read_metrics(os.path.join(runs_dir, run.name, "metrics.jsonl"))
    ev = final_eval(records, run.steps)
    if ev is None:
      continue
    rec = {k: v for k, v in run.plan_record().items() if k != "overrides"}
    rec["eval"] = {}
    for key, value in ev.items():
      _, set_name, metric = key.split("/", 2)
      rec["eval"].setdefault(set_name, {})[metric] = value
    out.append(rec)
  return out


# ----------------------------------------------------------------------------- fitting


def fit_parabola(x, y) -> tuple[np.ndarray, float, float]:
  """y ≈ a·x² + b·x + c (numpy.polyfit); returns (coeffs, x at the minimum, y there).

  x_min is nan when the fit has no minimum (a <= 0) or there are fewer than 3 points.
  """
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or len(np.unique(x)) < 3:
    return np.full(3, np.nan), float("nan"), float("nan")
  coeffs = np.polyfit(x, y, 2)
  a, b, _ = coeffs
  if a <= 0:
    return coeffs, float("nan"), float("nan")
  x_min = -b / (2 * a)
  return coeffs, float(x_min), float(np.polyval(coeffs, x_min))


def fit_sweep(results: list[dict], fit_x: str = "params") -> list[dict[str, Any]]:
  """Per (budget, arch, eval set): the parabola of loss vs ln(fit_x) and its minimum.

  The compute-optimal loss is the parabola's minimum when it lies inside the measured range
  ('fit'); else (a minimum outside the range, no minimum, fewer than 3 points) the best
  measured run ('best_point'), since extrapolating a parabola is not a measurement.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in results:
    for set_name in r["eval"]:
      groups.setdefault((r["budget"], r["arch"], set_name), []).append(r)
  out = []
  for (budget, arch, set_name), rs in sorted(groups.items(),
                                             key=lambda kv: (kv[0][0], ARCHS.index(kv[0][1]),
                                                             kv[0][2])):
    rs = sorted(rs, key=lambda r: r[fit_x])
    x = np.log([r[fit_x] for r in rs])
    y = np.array([r["eval"][set_name]["loss"] for r in rs])
    coeffs, x_min, y_min = fit_parabola(x, y)
    best = rs[int(np.argmin(y))]
    inside = math.isfinite(x_min) and x.min() <= x_min <= x.max()
    loss = y_min if inside else float(y.min())
    out.append({
        "budget": budget, "arch": arch, "eval_set": set_name, "fit_x": fit_x,
        "method": "fit" if inside else "best_point", "n_points": len(rs),
        "coeffs": [float(c) for c in coeffs],
        "opt_x": float(math.exp(x_min)) if math.isfinite(x_min) else None,
        "opt_loss": float(loss), "opt_ppl": float(math.exp(loss)),
        "best_run": best["name"], "best_loss": float(y.min()),
        "best_ppl": float(math.exp(y.min())),
    })
  return out


# ----------------------------------------------------------------------------- outputs


def write_table(fits: list[dict], out_dir: str) -> tuple[str, str]:
  """table.md (Table-1 style: rows 'PEER 6e18', columns eval sets, compute-optimal ppl) and
  table.csv (one row per budget/arch/eval set with the fit details)."""
  os.makedirs(out_dir, exist_ok=True)
  sets = sorted({f["eval_set"] for f in fits})
  rows: dict[tuple, dict[str, dict]] = {}
  for f in fits:
    rows.setdefault((f["budget"], ARCHS.index(f["arch"]), f["arch"]), {})[f["eval_set"]] = f
  md = ["| model | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
  for (budget, _, arch), by_set in sorted(rows.items()):
    cells = []
    for s in sets:
      f = by_set.get(s)
      cells.append("" if f is None else f"{f['opt_ppl']:.2f}" + ("*" if f["method"] != "fit"
                                                                  else ""))
    md.append(f"| {ARCH_LABELS[arch]} {format_budget(budget).replace('p', '.')} | "
              + " | ".join(cells) + " |")
  md.append("")
  md.append("Perplexity of the compute-optimal model (minimum of a parabola in ln(params) fitted "
            "to each isoFLOP curve); * = best measured run (fit minimum outside the measured "
            "range or no minimum).")
  md_path = os.path.join(out_dir, "table.md")
  with open(md_path, "w") as fh:
    fh.write("\n".join(md) + "\n")
  csv_path = os.path.join(out_dir, "table.csv")
  fields = ["budget", "arch", "eval_set", "opt_ppl", "opt_loss", "method", "fit_x", "opt_x",
            "n_points", "best_run", "best_ppl", "best_loss"]
  with open(csv_path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for f in fits:
      w.writerow(f)
  return md_path, csv_path


def plot_isoflop(results: list[dict], fits: list[dict], path: str, eval_set: str | None = None,
                 fit_x: str = "params") -> str:
  """PNG of loss vs fit_x (log axis), one panel per budget, one curve per arch, minima marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if eval_set is None:
    names = sorted({s for r in results for s in r["eval"]})
    eval_set = names[0] if names else "?"
  budgets = sorted({r["budget"] for r in results})
  fig, axes = plt.subplots(1, max(len(budgets), 1), figsize=(5 * max(len(budgets), 1), 4),
                           squeeze=False)
  colors = {"dense": "tab:gray", "moe": "tab:blue", "pkm": "tab:green", "peer": "tab:red"}
  for ax, budget in zip(axes[0], budgets):
    for arch in ARCHS:
      rs = sorted((r for r in results if r["budget"] == budget and r["arch"] == arch
                   and eval_set in r["eval"]), key=lambda r: r[fit_x])
      if not rs:
        continue
      x = np.array([r[fit_x] for r in rs], float)
      y = np.array([r["eval"][eval_set]["loss"] for r in rs])
      ax.scatter(x, y, color=colors[arch], label=ARCH_LABELS[arch], s=18)
      fit = next((f for f in fits if f["budget"] == budget and f["arch"] == arch
                  and f["eval_set"] == eval_set), None)
      if fit and all(math.isfinite(c) for c in fit["coeffs"]):
        xs = np.linspace(np.log(x.min()) - 0.1, np.log(x.max()) + 0.1, 100)
        ax.plot(np.exp(xs), np.polyval(fit["coeffs"], xs), color=colors[arch], lw=1)
      if fit:
        opt_x = fit["opt_x"] if fit["method"] == "fit" else next(
            r[fit_x] for r in rs if r["name"] == fit["best_run"])
        ax.scatter([opt_x], [fit["opt_loss"]], marker="*", s=160, color=colors[arch],
                   edgecolor="black", zorder=5)
    ax.set_xscale("log")
    ax.set_title(f"{format_budget(budget).replace('p', '.')} FLOPs")
    ax.set_xlabel(fit_x.replace("_", " "))
    ax.set_ylabel(f"{eval_set} loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(path + ".tmp", path)
