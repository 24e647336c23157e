"""isoFLOP sweeps, planning: the sweep config's checks, run names and the runs of each phase.

Beside it: sweep_config.py (base config, overrides, smoke form, tokenizer), sweep_commands.py
(train / gcloud commands, time estimate), sweep_collect.py (run status, summaries) and
sweep_analysis.py (fits, table, plot); peer_jax/sweep.py re-exports them all.

A sweep config (configs/isoflop_*.py) is a ConfigDict with
  base:        path (relative to the repository root) of the run config every run starts from
  budgets:     training FLOPs per run, e.g. (6e18, 2e19)
  archs:       any of dense, moe, pkm, peer
  sizes:       pairs: (d_model, num_layers) sizes, smallest first (or a d_model × num_layers
               grid); heads = d_model // head_dim (or a num_heads grid); d_ff = d_ff_ratio ·
               d_model; windows: optional (start, stop) slice of pairs per budget (larger
               budgets may use a window of larger sizes); extend: how many sizes of the
               ladder beyond its window a curve whose minimum is at an edge may add
  arch_overrides: {arch: nested overrides} (per-architecture layer settings)
  overrides:   nested like the base config, {'train': {'batch_size': 8}}, for every run
  tokenizer:   vocab_size (0: keep the base config's tokenizer), train_path: a small
               SentencePiece model the sweep trains itself, cached in its workdir
  lr_sweep:    budget, size (d_model, num_layers), grid (learning rates), chosen ({arch: lr}
               pinned; else the grid's best on select_eval_set is used)
  seeds:       extra (how many more seeds), nearest (for how many sizes nearest each minimum)
  tolerance, min_steps, warmup_fraction, eval_batches, checkpoint_every, log_every
  flops_key:   'total' (full T×T attention, as computed) or 'total_causal'
  fit_x:       the fit's abscissa: params | active_params | non_embedding_params | tokens
  fit_family:  'all' (every size of a curve) or 'depth' (the sizes of its most-populated
               depth only; extensions and seed sizes follow that depth)
  select_eval_set / plot_eval_set: the eval set that picks LRs and seed sizes / the plot shows
  results_dir: where the summaries, table and plot go (relative to the repository)
  timing:      overhead_s (per run), gflops {arch: sustained GFLOP/s} and/or tokens_per_sec
               {arch: training tokens/s} (the slower of the two counts), compile_s (per
               distinct program: arch and size) for the estimate
  launcher:    the default of --launcher (local | inprocess | print | gcloud)
  smoke:       nested overrides of this sweep config applied by --smoke
  gcloud:      tpus (names), zone, project, repo_dir, python, workdir (on the VMs)

The phases: 'lr' (lr_sweep.grid at one budget and size, per arch), 'main' (every budget ×
arch × size at the chosen LR; the LR run at the chosen LR is reused as its main point) and
'seed' (seeds 1..extra for the `nearest` sizes nearest each main curve's minimum).

Every run is a normal `scripts/train.py` run; the planner only chooses its overrides:
  steps = round(budget / (training FLOPs per token × batch_size × seq_len)),
with training FLOPs = 3 × forward (model FLOPs; remat's recomputation is not charged).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from typing import Any

from peer_jax import flops as flops_lib
from peer_jax import kinds
# The config half and the collecting / launching halves live in sweep_config.py,
# sweep_collect.py and sweep_commands.py (the sweep.py façade re-exports them all).
from peer_jax.sweep_config import REPO, SweepError, apply_overrides, load_config_file  # noqa: F401
from peer_jax.sweep_config import flat_keys as _flat
from peer_jax.sweep_config import need as _need
from peer_jax.sweep_config import portable as _portable
from peer_jax.sweep_config import tokenizer_settings

ARCHS = kinds.names()  # every registered FFW kind, in registry order
ARCH_LABELS = {name: kinds.get(name).label for name in ARCHS}
FIT_X = ("params", "active_params", "non_embedding_params", "tokens")
PHASES = ("lr", "main", "seed")


# ----------------------------------------------------------------------------- names


def format_budget(budget: float) -> str:
  """6e18 -> '6e18', 1.5e15 -> '1p5e15', 3e-3 -> '3e-3' (3 significant digits)."""
  mant, exp = f"{float(budget):.2e}".split("e")
  mant = mant.rstrip("0").rstrip(".").replace(".", "p")
  return f"{mant}e{int(exp)}"


def parse_budget(text: str) -> float:
  return float(text.replace("p", "."))


_NUM = r"\d+(?:p\d+)?e-?\d+"
_NAME_RE = re.compile(rf"^b(?P<budget>{_NUM})_(?P<arch>[a-z_]+)_d(?P<d_model>\d+)"
                      rf"_l(?P<num_layers>\d+)(?:_h(?P<num_heads>\d+))?"
                      rf"(?:_lr(?P<lr>{_NUM}))?(?:_s(?P<seed>\d+))?$")


def run_name(budget: float, arch: str, d_model: int, num_layers: int,
             num_heads: int | None = None, lr: float | None = None,
             seed: int | None = None) -> str:
  """'b6e18_peer_d512_l8' (+ '_h8' when the sweep varies the head count, '_lr3e-3' for an
  LR-sweep run, '_s1' for a seed other than 0)."""
  name = f"b{format_budget(budget)}_{arch}_d{d_model}_l{num_layers}"
  name += f"_h{num_heads}" if num_heads is not None else ""
  name += f"_lr{format_budget(lr)}" if lr is not None else ""
  return name + (f"_s{seed}" if seed else "")


def parse_run_name(name: str) -> dict[str, Any]:
  """Inverse of run_name: {'budget', 'arch', 'd_model', 'num_layers', 'num_heads', 'lr',
  'seed'} (num_heads and lr None when absent, seed 0)."""
  m = _NAME_RE.match(name)
  if not m or m["arch"] not in ARCHS:
    raise SweepError(f"not a sweep run name: {name!r} (expected e.g. b6e18_peer_d512_l8)")
  return {"budget": parse_budget(m["budget"]), "arch": m["arch"],
          "d_model": int(m["d_model"]), "num_layers": int(m["num_layers"]),
          "num_heads": int(m["num_heads"]) if m["num_heads"] else None,
          "lr": parse_budget(m["lr"]) if m["lr"] else None,
          "seed": int(m["seed"]) if m["seed"] else 0}


# ----------------------------------------------------------------------------- config


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
  phase: str = "main"
  seed: int = 0
  learning_rate: float = 0.0
  d_ff: int = 0
  batch_size: int = 0
  seq_len: int = 0
  vocab_size: int = 0
  moe_routing: str = ""
  provisional: bool = False  # planned with an LR the LR sweep has not chosen yet
  resolved: dict = dataclasses.field(default_factory=dict)  # model/train/data/seed it runs with

  def plan_record(self) -> dict[str, Any]:
    """The plan fields (plan.jsonl, --dry_run): all but the resolved config."""
    out = dataclasses.asdict(self)
    out.pop("resolved")
    return out

  @property
  def size(self) -> tuple[int, int]:
    return (self.d_model, self.num_layers)


def _positive_number(v) -> bool:
  return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and v > 0)


def validate_sweep(sweep) -> None:
  budgets = _need(sweep, "budgets")
  if not budgets or not all(_positive_number(b) for b in budgets):
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
  windows = sizes.get("windows")
  if windows:
    n = len(size_grid(sizes))
    if len(windows) != len(budgets) or any(
        len(w) != 2 or not 0 <= w[0] < w[1] <= n for w in windows):
      raise SweepError(f"sizes.windows: need one (start, stop) slice of the {n} sizes per "
                       f"budget ({len(budgets)}), got {tuple(windows)!r}")
  ext = sizes.get("extend", 0)
  if isinstance(ext, bool) or not isinstance(ext, int) or ext < 0:
    raise SweepError(f"sizes.extend: must be a non-negative integer, got {ext!r}")
  if not (0 < sweep.get("tolerance", 0.05) < 1):
    raise SweepError(f"tolerance: must be in (0, 1), got {sweep.get('tolerance')!r}")
  if sweep.get("fit_x", "params") not in FIT_X:
    raise SweepError(f"fit_x: expected one of {', '.join(FIT_X)}, got {sweep.get('fit_x')!r}")
  if sweep.get("fit_family", "all") not in ("all", "depth"):
    raise SweepError(f"fit_family: expected all or depth, got {sweep.get('fit_family')!r}")
  if sweep.get("flops_key", "total") not in ("total", "total_causal"):
    raise SweepError(f"flops_key: expected total or total_causal, got {sweep.get('flops_key')!r}")
  unknown = set(sweep.get("arch_overrides", {}) or {}) - set(ARCHS)
  if unknown:
    raise SweepError(f"arch_overrides: unknown architectures {sorted(unknown)}")
  tok = sweep.get("tokenizer") or {}
  vocab = tok.get("vocab_size", 0)
  if vocab and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 16):
    raise SweepError(f"tokenizer.vocab_size: must be a piece count >= 16 (or 0: the base "
                     f"config's tokenizer), got {vocab!r}")
  lr = sweep.get("lr_sweep") or {}
  if lr.get("grid"):
    if not all(_positive_number(v) for v in lr.grid):
      raise SweepError(f"lr_sweep.grid: must be positive learning rates, got {tuple(lr.grid)!r}")
    if not _positive_number(lr.get("budget", 0)):
      raise SweepError(f"lr_sweep.budget: must be a positive FLOP count, got "
                       f"{lr.get('budget')!r}")
    size = tuple(lr.get("size") or ())
    if size not in [(d, l) for d, l, _, _ in size_grid(sizes)]:
      raise SweepError(f"lr_sweep.size: {size!r} is not one of sizes.pairs")
  for arch, value in dict(lr.get("chosen") or {}).items():
    if arch not in ARCHS or not _positive_number(value):
      raise SweepError(f"lr_sweep.chosen: {arch}: expected an architecture and a positive "
                       f"learning rate, got {value!r}")
  seeds = sweep.get("seeds") or {}
  for key in ("extra", "nearest"):
    v = seeds.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise SweepError(f"seeds.{key}: must be a non-negative integer, got {v!r}")


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


def window_indices(sweep, budget_index: int) -> list[int]:
  """Indices into size_grid of the sizes a budget runs (its window; default: all)."""
  n = len(size_grid(sweep.sizes))
  windows = sweep.sizes.get("windows")
  if windows:
    start, stop = windows[budget_index]
    return list(range(start, stop))
  return list(range(n))


def budget_sizes(sweep, budget_index: int) -> list[tuple[int, int, int, int]]:
  grid = size_grid(sweep.sizes)
  return [grid[i] for i in window_indices(sweep, budget_index)]


def _training_flops(model_cfg, seq_len: int, key: str) -> float:
  m = copy.deepcopy(model_cfg)
  m.remat = False  # model FLOPs: remat's recomputation is a cost, not part of the budget
  return flops_lib.flops_per_token(m, seq_len, training=True)[key]


class Planner:
  """Builds the runs of each phase from a validated sweep config."""

  def __init__(self, sweep, workdir: str | None = None):
    validate_sweep(sweep)
    from peer_jax.config_validation import ConfigError, validate_model
    self._ConfigError, self._validate_model = ConfigError, validate_model
    self.sweep = sweep
    base = apply_overrides(load_config_file(_need(sweep, "base")),
                           _flat(sweep.get("overrides", {})))
    self.raw_base = base
    self.common = dict(_flat(sweep.get("overrides", {})))
    self.common.update(tokenizer_settings(sweep, base, workdir))
    self.base = apply_overrides(base, self.common)
    if not str(self.base.data.eval_paths or "").strip():
      raise SweepError("overrides: data.eval_paths is empty: a sweep run needs an eval set "
                       "(its final eval loss is the result)")
    self.batch, self.seq_len = self.base.train.batch_size, self.base.train.seq_len
    self.default_lr = float(self.base.train.learning_rate)
    self.name_heads = len(tuple(sweep.sizes.get("num_heads", ()))) > 1
    self.grid = size_grid(sweep.sizes)
    self.dropped: list[dict[str, Any]] = []

  # -- one run
  def make_run(self, budget: float, arch: str, size: tuple, *, lr: float, seed: int = 0,
               phase: str = "main", lr_in_name: bool = False,
               provisional: bool = False) -> Run | None:
    d, layers, heads, d_ff = size
    sweep = self.sweep
    name = run_name(budget, arch, d, layers, heads if self.name_heads else None,
                    lr if lr_in_name else None, seed)
    model_keys = {"model.ffw": arch, "model.d_model": d, "model.num_layers": layers,
                  "model.num_heads": heads, "model.d_ff": d_ff}
    model_keys.update(_flat((sweep.get("arch_overrides", {}) or {}).get(arch, {})))
    cfg = apply_overrides(self.base, model_keys)
    try:
      self._validate_model(cfg)
    except self._ConfigError as e:
      raise SweepError(f"run {name}: config: {e}") from None
    fpt = _training_flops(cfg.model, self.seq_len, sweep.get("flops_key", "total"))
    tokens_per_step = self.batch * self.seq_len
    steps = int(round(budget / (fpt * tokens_per_step)))
    total = steps * tokens_per_step * fpt
    min_steps = sweep.get("min_steps", 1)
    why = None
    if steps < max(min_steps, 1):
      why = f"{steps} steps < min_steps {min_steps}"
    elif abs(total / budget - 1) > sweep.get("tolerance", 0.05):
      why = f"{total / budget - 1:+.1%} off budget after rounding to {steps} steps"
    if why:
      self.dropped.append({"name": name, "steps": steps, "reason": why})
      return None
    counts = flops_lib.param_counts(cfg.model, self.seq_len)
    run_keys = dict(self.common)
    run_keys.update(model_keys)
    run_keys.update({
        "seed": seed,
        "train.learning_rate": float(lr),
        "train.steps": steps,
        "train.warmup_steps": max(1, int(round(sweep.get("warmup_fraction", 0.05) * steps))),
        # Evaluate once, at the final step (train.py always evaluates the last step).
        "train.eval_every": steps,
    })
    for key, sweep_key in (("checkpoint.every", "checkpoint_every"),
                           ("train.log_every", "log_every"),
                           ("data.eval_batches", "eval_batches")):
      if sweep_key in sweep:
        run_keys[key] = sweep[sweep_key]
    run_cfg = apply_overrides(self.base, run_keys)
    resolved = {"seed": run_cfg.seed}
    for section in ("model", "train", "data"):
      resolved[section] = {k: _portable(v) for k, v in _flat(run_cfg[section].to_dict()).items()}
    return Run(name=name, arch=arch, budget=float(budget), params=counts["total"],
               active_params=counts["active"], non_embedding_params=counts["non_embedding"],
               flops_per_token=fpt, steps=steps, tokens=steps * tokens_per_step,
               total_flops=total, d_model=d, num_layers=layers, num_heads=heads,
               overrides=run_keys, phase=phase, seed=seed, learning_rate=float(lr), d_ff=d_ff,
               batch_size=self.batch, seq_len=self.seq_len,
               vocab_size=int(cfg.model.vocab_size),
               moe_routing=kinds.get(arch).variant(cfg.model),
               provisional=provisional, resolved=resolved)

  def _size(self, d_l) -> tuple:
    return next(s for s in self.grid if s[:2] == tuple(d_l))

  # -- phases
  @property
  def lr_grid(self) -> tuple[float, ...]:
    return tuple(float(v) for v in ((self.sweep.get("lr_sweep") or {}).get("grid") or ()))

  def pinned_lrs(self) -> dict[str, float]:
    return {a: float(v) for a, v in dict(
        (self.sweep.get("lr_sweep") or {}).get("chosen") or {}).items()}

  def lr_runs(self) -> list[Run]:
    """The LR sweep: every grid LR at lr_sweep.budget and lr_sweep.size, per architecture."""
    if not self.lr_grid:
      return []
    ls = self.sweep.lr_sweep
    out = []
    for arch in self.sweep.archs:
      for lr in self.lr_grid:
        run = self.make_run(ls.budget, arch, self._size(ls.size), lr=lr, phase="lr",
                            lr_in_name=True)
        if run is None:
          raise SweepError(f"lr_sweep: the LR run at budget {ls.budget:g}, size "
                           f"{tuple(ls.size)} was dropped ({self.dropped[-1]['reason']})")
        out.append(run)
    return out

  def main_runs(self, lrs: dict[str, float], extra: dict[tuple, list[int]] | None = None
                ) -> list[Run]:
    """Every budget × arch × size at seed 0 and the arch's LR (lrs; missing ones: the base
    LR, marked provisional). The point of the LR sweep at the chosen LR is that LR run.
    extra[(budget, arch)]: indices of further sizes (extensions of an unbracketed curve)."""
    out = []
    ls = self.sweep.get("lr_sweep") or {}
    extra = extra or {}
    for bi, budget in enumerate(self.sweep.budgets):
      for arch in self.sweep.archs:
        lr = lrs.get(arch)
        provisional = lr is None and bool(self.lr_grid)
        lr = self.default_lr if lr is None else lr
        idx = window_indices(self.sweep, bi)
        idx = sorted(set(idx) | set(extra.get((float(budget), arch), ())))
        for size in (self.grid[i] for i in idx):
          at_lr_point = (bool(self.lr_grid) and float(budget) == float(ls.budget)
                         and tuple(size[:2]) == tuple(ls.size))
          if at_lr_point and provisional:
            continue  # this point will be the LR run of the LR the sweep chooses
          reuse = at_lr_point and any(math.isclose(lr, g, rel_tol=1e-9) for g in self.lr_grid)
          run = self.make_run(budget, arch, size, lr=lr, phase="lr" if reuse else "main",
                              lr_in_name=bool(reuse), provisional=provisional)
          if run is not None:
            out.append(run)
    return out

  def seed_runs(self, main_runs: list[Run], picks: dict[tuple, list[tuple]]) -> list[Run]:
    """Seeds 1..seeds.extra of the sizes picks[(budget, arch)] (from the main curves' fits)."""
    extra = (self.sweep.get("seeds") or {}).get("extra", 0)
    out = []
    by_key = {(r.budget, r.arch, r.size): r for r in main_runs}
    for (budget, arch), sizes in sorted(picks.items(), key=lambda kv: (kv[0][0],
                                                                         ARCHS.index(kv[0][1]))):
      for d_l in sizes:
        main = by_key[(budget, arch, tuple(d_l))]
        for seed in range(1, extra + 1):
          run = self.make_run(budget, arch, self._size(d_l), lr=main.learning_rate, seed=seed,
                              phase="seed", provisional=main.provisional)
          if run is not None:
            out.append(run)
    return out

  def expected_seed_runs(self) -> int:
    s = self.sweep.get("seeds") or {}
    return (s.get("extra", 0) * s.get("nearest", 0) * len(self.sweep.archs)
            * len(self.sweep.budgets))


def plan_sweep(sweep, workdir: str | None = None) -> tuple[list[Run], list[dict[str, Any]]]:
  """The runs that can be planned before anything has run (the LR sweep and the main grid
  at the pinned or, provisionally, the base LR), and the dropped candidates (why)."""
  p = Planner(sweep, workdir)
  lr = p.lr_runs()
  names = {r.name for r in lr}
  main = [r for r in p.main_runs(p.pinned_lrs()) if r.name not in names]
  return lr + main, p.dropped
