"""isoFLOP sweeps, analysis half: fit each isoFLOP curve, check that its minimum is bracketed,
pick the sizes a second seed runs, estimate the compute-optimal loss with its seed spread and
the ratios to dense, and write the Table-1-style table, its CSV and the plot.

Everything here reads only run summaries (dicts as written by sweep_collect.make_summary:
name, arch, budget, seed, phase, params, ..., eval: {SET: {loss, ppl, bpb}}, experts), so
the committed summaries alone regenerate every output.

    fit_parabola(x, y)                 -> (coeffs, x_min, y_min) of y = a·x² + b·x + c
    bracket_status(x, y, coeffs, x_min) -> 'inside' | 'edge' | 'no_minimum' | 'too_few'
    family_points(points, fit_x, family) -> the points a curve is fitted to (one depth, or all)
    fit_curve(points, fit_x, eval_set, family) -> one curve's fit (status, minimum, best run)
    pick_seed_sizes(points, fit, n)    -> the n sizes nearest the fitted (or best) minimum
    analyze(summaries, fit_x, family)  -> {'curves': [...], 'ratios': [...]}
    write_table(analysis, out_dir, ...) / plot_isoflop(summaries, analysis, path, ...)
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np

from peer_jax import kinds
from peer_jax.sweep_plan import ARCHS, format_budget

STATUS_TEXT = {"inside": "bracketed", "edge": "minimum at an edge",
               "no_minimum": "no minimum", "too_few": "fewer than 3 sizes"}
SET_LABELS = {"wikitext2_valid": "WikiText-2 valid", "c4_sample": "C4 sample", "c4": "C4 sample",
              "c4_valid": "C4 valid"}


def arch_label(arch: str, moe_routing: str = "") -> str:
  """The kind's display label: 'MoE (expert choice, non-causal)' for the paper's MoE
  baseline; plain names otherwise."""
  return kinds.get(arch).display_label(moe_routing)


def fmt_budget(budget: float) -> str:
  return format_budget(budget).replace("p", ".")


# ----------------------------------------------------------------------------- one curve


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


def bracket_status(x, y, coeffs, x_min) -> str:
  """Whether a curve's minimum lies strictly inside the measured sizes.

  'inside' needs both: the parabola opens upwards with its minimum strictly between the
  smallest and largest measured x, and the best measured point is not an end point. Else
  'edge' (the minimum is at, or beyond, an end of the range), 'no_minimum' (the parabola
  opens downwards or is flat) or 'too_few' (fewer than 3 distinct sizes).
  """
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(np.unique(x)) < 3:
    return "too_few"
  if not math.isfinite(x_min):
    return "no_minimum"
  i = int(np.argmin(y))
  if not (x.min() < x_min < x.max()) or i in (int(np.argmin(x)), int(np.argmax(x))):
    return "edge"
  return "inside"


def _xy(points: list[dict], fit_x: str, eval_set: str):
  pts = sorted(points, key=lambda r: r[fit_x])
  return (pts, np.log([r[fit_x] for r in pts]),
          np.array([r["eval"][eval_set]["loss"] for r in pts], float))


FIT_FAMILIES = ("all", "depth")


def family_points(points: list[dict], fit_x: str, family: str = "all"
                  ) -> tuple[list[dict], int | None]:
  """The points a curve's parabola is fitted to, and their depth (None: every depth).

  'depth': the sizes of one depth only, the depth with the most distinct sizes (ties: the
  deeper). A ladder that changes depth between neighbouring sizes puts a step into the
  curve that has nothing to do with size: a one-block model is a different shape, and in
  it the one expert layer is the model's only FFW. Choosing the family by its size count,
  never by its losses, keeps the choice the same for every architecture and replicate.
  """
  if family == "all":
    return list(points), None
  if family != "depth":
    raise ValueError(f"fit_family: expected one of {', '.join(FIT_FAMILIES)}, got {family!r}")
  by_depth: dict[int, set] = {}
  for p in points:
    by_depth.setdefault(int(p["num_layers"]), set()).add(p[fit_x])
  if not by_depth:
    return [], None
  depth = max(by_depth, key=lambda d: (len(by_depth[d]), d))
  return [p for p in points if int(p["num_layers"]) == depth], depth


def fit_curve(points: list[dict], fit_x: str, eval_set: str, family: str = "all"
              ) -> dict[str, Any]:
  """Parabola of loss vs ln(fit_x) through one curve's points (one per size) of its fit
  family (`family_points`); points outside it are listed, never fitted."""
  fam, depth = family_points(points, fit_x, family)
  excluded = sorted(p["name"] for p in points if p not in fam)
  pts, x, y = _xy(fam, fit_x, eval_set)
  coeffs, x_min, y_min = fit_parabola(x, y)
  status = bracket_status(x, y, coeffs, x_min)
  best = pts[int(np.argmin(y))]
  return {"status": status, "bracketed": status == "inside",
          "coeffs": [float(c) for c in coeffs],
          "opt_x": float(math.exp(x_min)) if status == "inside" else None,
          "opt_loss": float(y_min) if status == "inside" else None,
          "best_run": best["name"], "best_loss": float(y.min()),
          "best_size": [best["d_model"], best["num_layers"]], "n_points": len(pts),
          "fit_family": family, "family_depth": depth, "excluded_runs": excluded}


def pick_seed_sizes(points: list[dict], fit: dict, n: int, fit_x: str) -> list[tuple[int, int]]:
  """The n sizes (d_model, num_layers) nearest the curve's minimum in ln(fit_x): the fitted
  minimum when bracketed, else the best measured run; only sizes of the fit's family."""
  if n <= 0 or not points:
    return []
  if fit.get("family_depth") is not None:
    points = [p for p in points if int(p["num_layers"]) == fit["family_depth"]]
  centre = (math.log(fit["opt_x"]) if fit["status"] == "inside" else
            math.log(next(p[fit_x] for p in points if p["name"] == fit["best_run"])))
  order = sorted(points, key=lambda p: (abs(math.log(p[fit_x]) - centre), p[fit_x]))
  return [(p["d_model"], p["num_layers"]) for p in order[:n]]


# ----------------------------------------------------------------------------- the sweep


def _size(r) -> tuple[int, int]:
  return (r["d_model"], r["num_layers"])


def curve_points(summaries: list[dict], budget: float, arch: str, seed: int = 0) -> list[dict]:
  """The main curve of (budget, arch): one seed-`seed` point per size (LR-sweep runs only
  where they are the main point, i.e. phase 'lr' runs at the chosen LR are listed by the
  caller in `summaries` with role 'main')."""
  return [r for r in summaries if r["budget"] == budget and r["arch"] == arch
          and r.get("seed", 0) == seed and r.get("role", "main") == "main"]


def eval_sets_of(summaries: list[dict]) -> list[str]:
  order = list(SET_LABELS)
  names = {s for r in summaries for s in r.get("eval", {})}
  return sorted(names, key=lambda s: (order.index(s) if s in order else len(order), s))


def analyze(summaries: list[dict], fit_x: str = "params", family: str = "all"
            ) -> dict[str, list[dict]]:
  """Per (budget, arch, eval set): the seed-0 fit, the replicate fits with seed 1.. at the
  sizes that have them (each replicate replaces those points), the compute-optimal loss
  and perplexity (mean of the replicates' bracketed minima) with their spread (half the
  range over replicates), the seed noise per point; per (budget, arch ≠ dense, eval set)
  the perplexity ratio to dense with its spread.

  `summaries` are the main-curve points (role 'main', seed 0) and the seed runs (seed > 0).
  """
  curves = []
  sets = eval_sets_of(summaries)
  keys = sorted({(r["budget"], r["arch"]) for r in summaries},
                key=lambda k: (k[0], ARCHS.index(k[1])))
  for budget, arch in keys:
    main = curve_points(summaries, budget, arch, 0)
    if not main:
      continue
    extra = sorted({r["seed"] for r in summaries if r["budget"] == budget and r["arch"] == arch
                    and r.get("seed", 0) > 0})
    routing = next((r.get("moe_routing", "") for r in main), "")
    for eval_set in sets:
      pts = [r for r in main if eval_set in r["eval"]]
      if not pts:
        continue
      fit = fit_curve(pts, fit_x, eval_set, family)
      replicates = [fit]
      noise = []
      for seed in extra:
        others = {_size(r): r for r in summaries if r["budget"] == budget and r["arch"] == arch
                  and r.get("seed") == seed and eval_set in r["eval"]}
        if not others:
          continue
        rep = [others.get(_size(p), p) for p in pts]
        replicates.append(fit_curve(rep, fit_x, eval_set, family))
        # Seed noise over every re-run size, in the fit's family or not.
        noise += [others[_size(p)]["eval"][eval_set]["loss"] - p["eval"][eval_set]["loss"]
                  for p in pts if _size(p) in others]
      bpb_per_loss = float(np.mean([p["eval"][eval_set]["bpb"] / p["eval"][eval_set]["loss"]
                                    for p in pts if "bpb" in p["eval"][eval_set]] or [np.nan]))
      inside = [f["opt_loss"] for f in replicates if f["status"] == "inside"]
      all_inside = len(inside) == len(replicates)
      rec = {"budget": budget, "arch": arch, "eval_set": eval_set, "fit_x": fit_x,
             "moe_routing": routing, **fit, "n_replicates": len(replicates),
             "replicate_status": [f["status"] for f in replicates],
             "replicate_opt_loss": [f["opt_loss"] for f in replicates],
             "seed_noise_loss": float(np.sqrt(np.mean(np.square(noise)) / 2)) if noise else None,
             "bpb_per_nat": bpb_per_loss}
      if fit["status"] == "inside" and all_inside:
        loss = float(np.mean(inside))
        half = float((max(inside) - min(inside)) / 2) if len(inside) > 1 else None
        ppls = [math.exp(v) for v in inside]
        rec.update(opt_loss=loss, opt_ppl=math.exp(loss), opt_bpb=loss * bpb_per_loss,
                   opt_ppl_spread=(max(ppls) - min(ppls)) / 2 if len(ppls) > 1 else None,
                   opt_loss_spread=half, compute_optimal=True)
      else:
        # Not bracketed (or a replicate is not): no compute-optimal value is claimed.
        rec.update(opt_loss=None, opt_ppl=None, opt_bpb=None, opt_ppl_spread=None,
                   opt_loss_spread=None, compute_optimal=False)
      rec["best_ppl"] = math.exp(fit["best_loss"])
      rec["best_bpb"] = fit["best_loss"] * bpb_per_loss
      best = next(p for p in pts if p["name"] == fit["best_run"])
      rec["best_experts"] = (best.get("experts") or {}).get(eval_set, {})
      curves.append(rec)
  return {"curves": curves, "ratios": ratios(curves)}


def ratios(curves: list[dict]) -> list[dict]:
  """Perplexity of each arch over dense's, per budget and eval set, replicate by replicate
  (replicate i of one curve with replicate i of the other); only where both curves are
  bracketed in every replicate. Otherwise the ratio of the best measured runs, flagged."""
  by = {(c["budget"], c["arch"], c["eval_set"]): c for c in curves}
  out = []
  for (budget, arch, eval_set), c in sorted(by.items(), key=lambda kv: (kv[0][0],
                                                                        ARCHS.index(kv[0][1]),
                                                                        kv[0][2])):
    d = by.get((budget, kinds.DENSE, eval_set))  # the baseline every ratio is taken to
    if arch == kinds.DENSE or d is None:
      continue
    rec = {"budget": budget, "arch": arch, "eval_set": eval_set, "moe_routing": c["moe_routing"]}
    if c["compute_optimal"] and d["compute_optimal"]:
      n = min(c["n_replicates"], d["n_replicates"])
      reps = [math.exp(c["replicate_opt_loss"][i] - d["replicate_opt_loss"][i])
              for i in range(n)]
      rec.update(kind="compute_optimal", ratio=c["opt_ppl"] / d["opt_ppl"],
                 spread=(max(reps) - min(reps)) / 2 if len(reps) > 1 else None,
                 replicates=reps)
    else:
      rec.update(kind="best_measured", ratio=c["best_ppl"] / d["best_ppl"], spread=None,
                 replicates=[])
    out.append(rec)
  return out


# ----------------------------------------------------------------------------- outputs


def _pm(value, spread, digits=2) -> str:
  if value is None:
    return "—"
  return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _family_note(curves: list[dict]) -> str:
  """The table's sentence on which sizes were fitted ('' when every size was)."""
  depths = sorted({c["family_depth"] for c in curves if c.get("family_depth") is not None})
  if not depths:
    return ""
  n_out = sum(len(c["excluded_runs"]) for c in curves)
  return (" Each curve is fitted over the sizes of one depth only (fit_family 'depth': the "
          "depth with the most sizes; here " + ", ".join(f"{d} blocks" for d in depths)
          + "); its best run is the best of those. " + str(n_out) + " curve points of other "
          "depths are plotted but not fitted (fits.json: excluded_runs).")


def table_markdown(analysis: dict, lr_table: list[dict] | None = None) -> str:
  """The Table-1 layout (rows 'PEER 1e12'; perplexity and bits per byte per eval set), the
  bracketing and seed columns, the ratios to dense, expert usage and (if given) the LR sweep."""
  curves = analysis["curves"]
  sets = []
  for c in curves:
    if c["eval_set"] not in sets:
      sets.append(c["eval_set"])
  rows: dict[tuple, dict[str, dict]] = {}
  for c in curves:
    rows.setdefault((c["budget"], ARCHS.index(c["arch"])), {})[c["eval_set"]] = c
  head = ["model"]
  for s in sets:
    label = SET_LABELS.get(s, s)
    head += [f"{label} ppl", f"{label} bpb", f"{label} curve"]
  head += ["best run (seed 0)", "seed noise (loss)"]
  md = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for (budget, _), by_set in sorted(rows.items()):
    first = next(iter(by_set.values()))
    cells = [f"{arch_label(first['arch'], first['moe_routing'])} {fmt_budget(budget)}"]
    for s in sets:
      c = by_set.get(s)
      if c is None:
        cells += ["", "", ""]
        continue
      if c["compute_optimal"]:
        cells += [_pm(c["opt_ppl"], c["opt_ppl_spread"]),
                  _pm(c["opt_bpb"], c["opt_loss_spread"] and c["opt_loss_spread"]
                      * c["bpb_per_nat"], 3),
                  "bracketed"]
      else:
        why = sorted(set(c["replicate_status"]) - {"inside"}) or [c["status"]]
        cells += [f"({c['best_ppl']:.2f})", f"({c['best_bpb']:.3f})",
                  "NOT bracketed: " + ", ".join(STATUS_TEXT[w] for w in why)]
    c0 = by_set[sets[0]] if sets[0] in by_set else first
    cells.append(f"d{c0['best_size'][0]}×{c0['best_size'][1]}")
    cells.append(f"{c0['seed_noise_loss']:.3f}" if c0["seed_noise_loss"] is not None else "—")
    md.append("| " + " | ".join(cells) + " |")
  md += ["", "Perplexity and bits per byte of the compute-optimal model: the minimum of a "
         "parabola in ln(" + (curves[0]["fit_x"] if curves else "params") + ") fitted to each "
         "isoFLOP curve, shown only where the minimum lies strictly inside the measured sizes "
         "(and the best measured size is not an end point) for every seed replicate; "
         "± is half the range over the replicates (seed 0; seed 1 at the sizes nearest the "
         "minimum). A value in parentheses is the best measured run of a curve that is not "
         "bracketed: not a compute-optimal value. Seed noise: RMS over the re-run sizes of "
         "(loss seed 1 − loss seed 0)/√2. MoE with expert-choice routing (the paper's "
         "baseline) is not causal: a token's routing depends on later tokens of its "
         "sequence." + _family_note(curves), ""]
  rs = analysis["ratios"]
  if rs:
    md += ["Perplexity ratio to dense (same budget and eval set; < 1: better than dense):", "",
           "| budget | model | " + " | ".join(SET_LABELS.get(s, s) for s in sets) + " |",
           "|---|---|" + "---|" * len(sets)]
    keyed = {}
    for r in rs:
      keyed.setdefault((r["budget"], ARCHS.index(r["arch"]), r["arch"], r["moe_routing"]),
                       {})[r["eval_set"]] = r
    for (budget, _, arch, routing), by_set in sorted(keyed.items()):
      cells = []
      for s in sets:
        r = by_set.get(s)
        if r is None:
          cells.append("")
        elif r["kind"] == "compute_optimal":
          cells.append(_pm(r["ratio"], r["spread"], 3))
        else:
          cells.append(f"({r['ratio']:.3f}, best runs; not bracketed)")
      md.append(f"| {fmt_budget(budget)} | {arch_label(arch, routing)} / Dense | "
                + " | ".join(cells) + " |")
    md.append("")
  usage = [c for c in curves if c["best_experts"]]
  if usage:
    md += ["Expert usage of each curve's best run (share of experts with nonzero router weight "
           "on the eval set; unevenness: KL from uniform, paper Table 2):", "",
           "| model | eval set | block | usage | unevenness |", "|---|---|---|---|---|"]
    for c in usage:
      for block, st in sorted(c["best_experts"].items()):
        md.append(f"| {arch_label(c['arch'], c['moe_routing'])} {fmt_budget(c['budget'])} | "
                  f"{SET_LABELS.get(c['eval_set'], c['eval_set'])} | {block} | "
                  f"{st.get('usage', float('nan')):.1%} | "
                  f"{st.get('unevenness', float('nan')):.3f} |")
    md.append("")
  if lr_table:
    md += ["Learning-rate sweep (" + SET_LABELS.get(lr_table[0]["eval_set"],
                                                  lr_table[0]["eval_set"])
           + " loss at the LR-sweep budget and size; * = chosen):", "",
           "| model | " + " | ".join(f"lr {format_budget(lr).replace('p', '.')}"
                                    for lr in lr_table[0]["grid"]) + " |",
           "|---" * (len(lr_table[0]["grid"]) + 1) + "|"]
    for row in lr_table:
      cells = []
      for lr in row["grid"]:
        loss = row["losses"].get(repr(float(lr)))
        mark = "*" if row.get("chosen") is not None and math.isclose(lr, row["chosen"]) else ""
        cells.append("" if loss is None else f"{loss:.3f}{mark}")
      md.append(f"| {arch_label(row['arch'], row.get('moe_routing', ''))} | "
                + " | ".join(cells) + " |")
    edges = [arch_label(r["arch"], r.get("moe_routing", "")) for r in lr_table
             if lr_edge(r)]
    if edges:
      md += ["", "**LR not bracketed** (best at an end of the grid, so a better LR may lie "
             "beyond it; widen lr_sweep.grid): " + ", ".join(edges) + "."]
    md.append("")
  return "\n".join(md)


def lr_edge(row: dict) -> bool:
  """The LR sweep's measured best is the smallest or largest LR of its grid."""
  best, grid = row.get("measured_best"), list(row.get("grid") or ())
  return (best is not None and len(grid) > 1
          and (math.isclose(best, min(grid)) or math.isclose(best, max(grid))))


CSV_FIELDS = ["budget", "arch", "moe_routing", "eval_set", "status", "compute_optimal",
              "opt_ppl", "opt_ppl_spread", "opt_bpb", "opt_loss", "opt_loss_spread", "fit_x",
              "opt_x", "n_points", "n_replicates", "best_run", "best_ppl", "best_bpb",
              "best_loss", "seed_noise_loss"]


def write_table(analysis: dict, out_dir: str, lr_table: list[dict] | None = None
                ) -> tuple[str, str]:
  """out_dir/table.md (table_markdown) and out_dir/table.csv (one row per curve)."""
  os.makedirs(out_dir, exist_ok=True)
  md_path = os.path.join(out_dir, "table.md")
  with open(md_path, "w") as fh:
    fh.write(table_markdown(analysis, lr_table))
  csv_path = os.path.join(out_dir, "table.csv")
  with open(csv_path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for c in analysis["curves"]:
      w.writerow(c)
  return md_path, csv_path


COLORS = {k.name: k.color for k in kinds.all_kinds()}


def plot_isoflop(summaries: list[dict], analysis: dict, path: str, eval_set: str | None = None,
                 fit_x: str = "params") -> str:
  """PNG of loss vs fit_x (log axis), one panel per budget, one curve per arch: seed-0 points
  (filled; triangles: sizes outside the fit's depth family), other seeds (hollow), the
  fitted parabola, the compute-optimal minimum (star,
  with its seed spread as an error bar) or, for a curve that is not bracketed, an ×
  at its best run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if eval_set is None:
    names = eval_sets_of(summaries)
    eval_set = names[0] if names else "?"
  budgets = sorted({r["budget"] for r in summaries})
  fig, axes = plt.subplots(1, max(len(budgets), 1), figsize=(5 * max(len(budgets), 1), 4),
                           squeeze=False)
  for ax, budget in zip(axes[0], budgets):
    for arch in ARCHS:
      rs = sorted((r for r in curve_points(summaries, budget, arch, 0) if eval_set in r["eval"]),
                  key=lambda r: r[fit_x])
      if not rs:
        continue
      fit = next((c for c in analysis["curves"] if c["budget"] == budget and c["arch"] == arch
                  and c["eval_set"] == eval_set), None)
      x = np.array([r[fit_x] for r in rs], float)
      y = np.array([r["eval"][eval_set]["loss"] for r in rs])
      label = arch_label(arch, fit["moe_routing"] if fit else "")
      if fit and not fit["compute_optimal"]:
        label += " (not bracketed)"
      out = set(fit["excluded_runs"]) if fit else set()
      fitted = np.array([r["name"] not in out for r in rs])
      ax.scatter(x[fitted], y[fitted], color=COLORS[arch], label=label, s=18)
      if out:  # sizes of another depth: shown, not fitted
        ax.scatter(x[~fitted], y[~fitted], color=COLORS[arch], marker="^", s=18, alpha=0.4)
      x = x[fitted]
      more = [r for r in summaries if r["budget"] == budget and r["arch"] == arch
              and r.get("seed", 0) > 0 and eval_set in r["eval"]]
      if more:
        ax.scatter([r[fit_x] for r in more], [r["eval"][eval_set]["loss"] for r in more],
                   facecolors="none", edgecolors=COLORS[arch], s=30)
      if fit and all(math.isfinite(c) for c in fit["coeffs"]):
        xs = np.linspace(np.log(x.min()) - 0.1, np.log(x.max()) + 0.1, 100)
        ax.plot(np.exp(xs), np.polyval(fit["coeffs"], xs), color=COLORS[arch], lw=1)
      if fit and fit["compute_optimal"]:
        ax.errorbar([fit["opt_x"]], [fit["opt_loss"]], yerr=[[fit["opt_loss_spread"] or 0.0]],
                    fmt="*", ms=14, color=COLORS[arch], mec="black", capsize=4, zorder=5)
      elif fit:
        bx = next(r[fit_x] for r in rs if r["name"] == fit["best_run"])
        ax.scatter([bx], [fit["best_loss"]], marker="x", s=80, color=COLORS[arch], zorder=5)
    ax.set_xscale("log")
    ax.set_title(f"{fmt_budget(budget)} FLOPs")
    ax.set_xlabel(fit_x.replace("_", " "))
    ax.set_ylabel(f"{SET_LABELS.get(eval_set, eval_set)} loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
