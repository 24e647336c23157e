"""isoFLOP sweeps: plan arithmetic, names, phases (LR sweep, main grid, seeds), CLI output,
launch/resume, summaries, bracketing, fits with seed spread, regeneration of table and plot
from summaries alone, and (slow) the GPU config's --smoke form end to end."""

import copy
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from peer_jax import flops as flops_lib
from peer_jax import sweep
from peer_jax.train import train_and_evaluate
from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "sweep_isoflop.py")
PLAN_KEYS = {"name", "arch", "budget", "params", "active_params", "flops_per_token", "steps",
             "tokens", "total_flops", "phase", "seed", "learning_rate"}


def tiny_sweep(budgets=(4e9,), archs=("dense", "peer"), pairs=((32, 1), (32, 2)), lr_grid=(),
               seeds=0, nearest=0, lr_size=None):
  c = ml_collections.ConfigDict()
  c.base = "configs/default.py"
  c.budgets = budgets
  c.archs = archs
  c.sizes = s = ml_collections.ConfigDict()
  s.pairs = pairs
  s.head_dim = 16
  s.d_ff_ratio = 2
  c.arch_overrides = {"peer": {"model": {"peer": {"num_experts": 16**2, "heads": 2, "top_k": 4,
                                                  "query_dim": 16}}},
                      "moe": {"model": {"moe": {"num_experts": 4}}},
                      "pkm": {"model": {"pkm": {"num_memories": 16**2, "heads": 2, "top_k": 4,
                                                "key_dim": 16}}}}
  c.overrides = {"train": {"batch_size": 4, "seq_len": 32, "log_every": 1},
                 "data": {"eval_batches": 1}}
  c.lr_sweep = lr = ml_collections.ConfigDict()
  lr.budget = float(budgets[len(budgets) // 2])
  lr.size = lr_size or tuple(pairs[len(pairs) // 2])
  lr.grid = lr_grid
  lr.chosen = {}
  c.seeds = sd = ml_collections.ConfigDict()
  sd.extra = seeds
  sd.nearest = nearest
  c.tolerance = 0.05
  c.min_steps = 2
  c.checkpoint_every = 2
  c.fit_x = "params"
  c.select_eval_set = "wikitext2_valid"
  c.results_dir = ""
  c.gcloud = g = ml_collections.ConfigDict()
  g.tpus = ("tpu-a", "tpu-b")
  g.zone = "us-east5-a"
  g.project = "proj"
  g.repo_dir = "peer_jax"
  g.python = "python3"
  g.workdir = "runs/sw"
  return c


def write_sweep_file(path, **kw):
  args = ", ".join(f"{k}={v}" for k, v in kw.items())
  path.write_text(f"""
from tests.test_sweep import tiny_sweep

def get_config():
  return tiny_sweep({args})
""")
  return str(path)


def cli(*args, cwd=REPO, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd, env=env)


def fake_summary(run, losses, bpb_per_nat=0.5, experts=None):
  """A summary as make_summary writes it, with the given eval losses {set: loss}."""
  rec = {k: v for k, v in run.plan_record().items() if k not in ("overrides", "provisional")}
  rec.update(summary_version=1, plan_digest=sweep.plan_digest(run), config={},
             eval={s: {"loss": l, "ppl": math.exp(l), "bpb": l * bpb_per_nat}
                   for s, l in losses.items()},
             experts=experts or {}, train={})
  return rec


# ----------------------------------------------------------------------------- planning


def test_plan_totals_within_tolerance_and_match_flops_py():
  cfg = tiny_sweep(budgets=(4e9, 2e10), archs=("dense", "moe", "pkm", "peer"))
  runs, dropped = sweep.plan_sweep(cfg)
  assert len(runs) == 16 and not dropped
  base = sweep.load_config_file("configs/default.py")
  for r in runs:
    assert set(r.plan_record()) >= PLAN_KEYS
    assert r.tokens == r.steps * 4 * 32
    assert r.total_flops == pytest.approx(r.steps * 4 * 32 * r.flops_per_token)
    assert abs(r.total_flops / r.budget - 1) <= 0.05, r.name
    run_cfg = sweep.apply_overrides(base, r.overrides)
    assert run_cfg.train.steps == r.steps and run_cfg.model.ffw == r.arch
    assert run_cfg.seed == 0 and run_cfg.train.learning_rate == base.train.learning_rate
    assert r.flops_per_token == flops_lib.flops_per_token(run_cfg.model, 32, training=True)["total"]
    counts = flops_lib.param_counts(run_cfg.model, 32)
    assert (r.params, r.active_params) == (counts["total"], counts["active"])
  assert all(r.active_params < r.params for r in runs if r.arch == "peer")
  moe = [r for r in runs if r.arch == "moe"]
  assert moe and all(r.moe_routing for r in moe)  # the MoE's routing is recorded


def test_candidates_off_budget_after_rounding_are_dropped():
  cfg = tiny_sweep()
  runs, _ = sweep.plan_sweep(cfg)
  fpt_tokens = runs[0].flops_per_token * 4 * 32
  # 3.4 steps of the first candidate: rounds to 3, 12% under budget -> dropped.
  cfg.budgets = (3.4 * fpt_tokens,)
  runs, dropped = sweep.plan_sweep(cfg)
  first = sweep.run_name(cfg.budgets[0], "dense", 32, 1)
  assert first in {d["name"] for d in dropped}
  assert "off budget" in next(d["reason"] for d in dropped if d["name"] == first)
  assert all(abs(r.total_flops / r.budget - 1) <= 0.05 for r in runs)
  cfg.budgets = (1.0 * fpt_tokens,)  # one step < min_steps 2
  runs, dropped = sweep.plan_sweep(cfg)
  assert not runs and all("min_steps" in d["reason"] for d in dropped)


@pytest.mark.parametrize("budget,arch,d,l,h,lr,seed", [
    (6e18, "peer", 512, 8, None, None, 0), (2e19, "dense", 1024, 16, 16, None, 1),
    (1.5e15, "moe", 96, 3, None, 3e-3, 0), (2.25e13, "pkm", 64, 2, 4, 1.2e-2, 2)])
def test_names_parse_back(budget, arch, d, l, h, lr, seed):
  name = sweep.run_name(budget, arch, d, l, h, lr, seed)
  assert sweep.parse_run_name(name) == {"budget": budget, "arch": arch, "d_model": d,
                                        "num_layers": l, "num_heads": h, "lr": lr,
                                        "seed": seed}
  assert sweep.run_name(6e18, "peer", 512, 8) == "b6e18_peer_d512_l8"
  assert sweep.run_name(1.5e15, "moe", 96, 3) == "b1p5e15_moe_d96_l3"
  assert sweep.run_name(1.9e11, "pkm", 48, 2, lr=1.2e-2, seed=1) == "b1p9e11_pkm_d48_l2_lr1p2e-2_s1"


def test_bad_names_and_configs_raise_one_line():
  with pytest.raises(sweep.SweepError, match="not a sweep run name"):
    sweep.parse_run_name("b6e18_mlp_d512_l8")
  for key, value, match in (("archs", ("dense", "mlp"), "archs"), ("budgets", (), "budgets"),
                            ("tolerance", 2.0, "tolerance")):
    cfg = tiny_sweep()
    cfg[key] = value
    with pytest.raises(sweep.SweepError, match=match):
      sweep.plan_sweep(cfg)
  cfg = tiny_sweep()
  cfg.overrides = {"train": {"no_such_key": 1}}
  with pytest.raises(sweep.SweepError, match="no_such_key"):
    sweep.plan_sweep(cfg)
  cfg = tiny_sweep(lr_grid=(1e-3, 2e-3), lr_size=(64, 5))
  with pytest.raises(sweep.SweepError, match="lr_sweep.size"):
    sweep.plan_sweep(cfg)
  cfg = tiny_sweep(lr_grid=(1e-3, -2e-3))
  with pytest.raises(sweep.SweepError, match="lr_sweep.grid"):
    sweep.plan_sweep(cfg)
  cfg = tiny_sweep()
  cfg.sizes.windows = ((0, 1), (0, 2))  # two windows, one budget
  with pytest.raises(sweep.SweepError, match="sizes.windows"):
    sweep.plan_sweep(cfg)
  cfg = tiny_sweep(seeds=-1)
  with pytest.raises(sweep.SweepError, match="seeds.extra"):
    sweep.plan_sweep(cfg)
  with pytest.raises(sweep.SweepError, match="smoke"):
    sweep.apply_smoke(tiny_sweep())


def test_size_windows_per_budget():
  cfg = tiny_sweep(budgets=(4e9, 4e10), pairs=((32, 1), (32, 2), (48, 2)))
  cfg.sizes.windows = ((0, 2), (1, 3))
  runs, _ = sweep.plan_sweep(cfg)
  sizes = {(r.budget, r.size) for r in runs if r.arch == "dense"}
  assert sizes == {(4e9, (32, 1)), (4e9, (32, 2)), (4e10, (32, 2)), (4e10, (48, 2))}


def test_tokenizer_setting_points_every_run_at_the_sweep_tokenizer(tmp_path):
  cfg = tiny_sweep()
  cfg.tokenizer = {"vocab_size": 512, "train_path": ""}
  runs, _ = sweep.plan_sweep(cfg, str(tmp_path))
  for r in runs:
    assert r.overrides["model.vocab_size"] == 512 and r.vocab_size == 512
    assert r.overrides["data.tokenizer"].startswith(str(tmp_path / "tokenizer" / "spm_512_"))
  # The digest does not depend on where the workdir or the data are.
  other, _ = sweep.plan_sweep(cfg, str(tmp_path / "elsewhere"))
  assert [sweep.plan_digest(r) for r in runs] == [sweep.plan_digest(r) for r in other]


# ----------------------------------------------------------------------------- phases


def _finish(results_dir, runs, loss_of):
  for r in runs:
    sweep.write_summary(results_dir, fake_summary(r, {"wikitext2_valid": loss_of(r)}))


def test_lr_sweep_choice_main_grid_reuse_and_seed_picks(tmp_path):
  rd = str(tmp_path / "res")
  cfg = tiny_sweep(budgets=(4e10,), pairs=((32, 1), (32, 2), (48, 2), (64, 2)),
                   lr_grid=(1e-3, 3e-3, 1e-2), seeds=1, nearest=2, lr_size=(32, 2))
  planner = sweep.Planner(cfg, str(tmp_path))
  state = sweep.sweep_state(planner, sweep.read_summaries(rd))
  assert [r.phase for r in state.lr_runs] == ["lr"] * 6 and not state.lrs
  assert all(r.provisional for r in state.main_runs)
  assert [r.name for r in state.todo()] == [r.name for r in state.lr_runs]
  assert state.seed_pending == 2 * 2
  # The LR sweep finishes: dense is best at 3e-3, PEER at 1e-2.
  best = {"dense": 3e-3, "peer": 1e-2}
  _finish(rd, state.lr_runs, lambda r: 5.0 + abs(math.log(r.learning_rate / best[r.arch])))
  state = sweep.sweep_state(planner, sweep.read_summaries(rd))
  assert state.lrs == best and state.lr_source == {"dense": "lr_sweep", "peer": "lr_sweep"}
  main = state.main_runs
  assert len(main) == 8 and not any(r.provisional for r in main)
  reused = [r for r in main if r.phase == "lr"]
  assert {r.name for r in reused} == {"b4e10_dense_d32_l2_lr3e-3", "b4e10_peer_d32_l2_lr1e-2"}
  assert all(r.learning_rate == best[r.arch] for r in main)
  assert {r.name for r in state.todo()} == {r.name for r in main} - {r.name for r in reused}
  # The main grid finishes with a minimum at d48 (params between d32_l2 and d64).
  target = {a: math.log(next(r.params for r in main if r.arch == a and r.size == (48, 2)))
            for a in ("dense", "peer")}
  _finish(rd, [r for r in main if r.phase == "main"],
          lambda r: 4.0 + 0.1 * (math.log(r.params) - target[r.arch]) ** 2)
  state = sweep.sweep_state(planner, sweep.read_summaries(rd))
  assert state.seed_pending == 0 and len(state.seed_runs) == 4
  for arch in ("dense", "peer"):
    picked = {r.size for r in state.seed_runs if r.arch == arch}
    assert (48, 2) in picked and len(picked) == 2
  assert all(r.seed == 1 and r.name.endswith("_s1") for r in state.seed_runs)
  assert [r.name for r in state.todo()] == [r.name for r in state.seed_runs]
  # A pinned LR replaces the measured one, and the runs planned with it change.
  cfg.lr_sweep.chosen = {"dense": 1e-2}
  state2 = sweep.sweep_state(sweep.Planner(cfg, str(tmp_path)), sweep.read_summaries(rd))
  assert state2.lrs["dense"] == 1e-2 and state2.lr_source["dense"] == "config"
  assert any(r.arch == "dense" and r.phase == "main" for r in state2.todo())


def test_unbracketed_curve_grows_by_a_ladder_size_then_gets_its_seeds(tmp_path):
  rd = str(tmp_path / "res")
  cfg = tiny_sweep(budgets=(4e10,), archs=("dense",),
                   pairs=((32, 1), (32, 2), (48, 2), (64, 2), (64, 3)), seeds=1, nearest=3)
  cfg.sizes.windows = ((0, 3),)
  cfg.sizes.extend = 1
  planner = sweep.Planner(cfg, None)
  state = sweep.sweep_state(planner, {})
  assert [r.size for r in state.main_runs] == [(32, 1), (32, 2), (48, 2)]
  # Loss falls to the largest size of the window: not bracketed, so 64×2 is added ...
  ln = {r.size: math.log(r.params) for r in sweep.Planner(
      tiny_sweep(budgets=(4e10,), archs=("dense",),
                 pairs=((32, 1), (32, 2), (48, 2), (64, 2), (64, 3))), None).main_runs({})}
  loss = lambda r: 4.0 + 0.1 * (math.log(r.params) - ln[(64, 2)] + 0.3) ** 2
  _finish(rd, state.main_runs, loss)
  state = sweep.sweep_state(planner, sweep.read_summaries(rd))
  assert [r.size for r in state.todo()] == [(64, 2)] and state.seed_pending == 3
  # ... and once it has run, the curve is bracketed and its seeds are planned.
  _finish(rd, state.todo(), loss)
  state = sweep.sweep_state(planner, sweep.read_summaries(rd))
  assert len(state.main_runs) == 4 and state.seed_pending == 0
  assert {r.size for r in state.seed_runs} == {(32, 2), (48, 2), (64, 2)}
  # With extend = 0 the same curve stays as it is, and is reported unbracketed.
  cfg.sizes.extend = 0
  state = sweep.sweep_state(sweep.Planner(cfg, None), sweep.read_summaries(rd))
  assert len(state.main_runs) == 3 and len(state.seed_runs) == 3


def test_summary_of_another_plan_is_not_a_result(tmp_path):
  rd = str(tmp_path / "res")
  cfg = tiny_sweep()
  planner = sweep.Planner(cfg, None)
  state = sweep.sweep_state(planner, {})
  _finish(rd, state.main_runs, lambda r: 5.0)
  assert len(sweep.sweep_state(planner, sweep.read_summaries(rd)).done) == 4
  # Another base config that resolves to the same runs (dense.py = default.py but model.ffw,
  # which every run sets) leaves the results valid ...
  cfg.base = "configs/dense.py"
  assert len(sweep.sweep_state(sweep.Planner(cfg, None), sweep.read_summaries(rd)).done) == 4
  # ... a setting that changes what the runs train with does not (same names).
  cfg.overrides.train.weight_decay = 0.0
  state = sweep.sweep_state(sweep.Planner(cfg, None), sweep.read_summaries(rd))
  assert not state.done and len(state.todo()) == 4
  cfg.overrides.train.weight_decay = 0.1
  cfg.overrides.model = {"rope_theta": 500.0}  # a base-config default changing
  assert not sweep.sweep_state(sweep.Planner(cfg, None), sweep.read_summaries(rd)).done


# ----------------------------------------------------------------------------- bracketing


X = np.log(np.geomspace(1e5, 1e7, 5))


@pytest.mark.parametrize("y,status", [
    (0.1 * (X - X[2] - 0.2) ** 2 + 4.0, "inside"),          # minimum between sizes 3 and 4
    (0.1 * (X - X[-1] - 1.0) ** 2 + 4.0, "edge"),           # falling: best at the largest size
    (0.1 * (X - X[0] + 0.5) ** 2 + 4.0, "edge"),            # rising: best at the smallest size
    (0.1 * (X - X[-1] + 0.1) ** 2 + 4.0 + [0, 0, 0, 0, .02], "edge"),  # min inside, best at end
    (-0.1 * (X - X[2]) ** 2 + 4.0, "no_minimum"),           # concave
    (np.full(5, 4.0), "no_minimum"),                         # flat
])
def test_bracket_status_on_synthetic_curves(y, status):
  coeffs, x_min, _ = sweep.fit_parabola(X, y)
  assert sweep.bracket_status(X, y, coeffs, x_min) == status
  pts = [{"name": f"r{i}", "params": float(np.exp(x)), "d_model": 16 * (i + 1), "num_layers": 1,
          "eval": {"v": {"loss": float(v)}}} for i, (x, v) in enumerate(zip(X, y))]
  fit = sweep.fit_curve(pts, "params", "v")
  assert fit["status"] == status and fit["bracketed"] == (status == "inside")
  assert (fit["opt_loss"] is None) == (status != "inside")
  coeffs, x_min, _ = sweep.fit_parabola(X[:2], y[:2])
  assert sweep.bracket_status(X[:2], y[:2], coeffs, x_min) == "too_few"


def test_parabola_fit_recovers_known_minimum():
  rng = np.random.default_rng(0)
  x = np.log(np.geomspace(1e7, 1e9, 7))
  x0, y0 = math.log(1e8), 3.2
  y = 0.05 * (x - x0) ** 2 + y0 + rng.normal(0, 1e-4, x.size)
  _, x_min, y_min = sweep.fit_parabola(x, y)
  assert x_min == pytest.approx(x0, abs=0.02) and y_min == pytest.approx(y0, abs=1e-3)
  _, x_min, _ = sweep.fit_parabola(x, -(x - x0) ** 2)
  assert math.isnan(x_min)


# ----------------------------------------------------------------------------- analysis


TRUTH = {"dense": (3e6, 4.0), "moe": (4e6, 3.9), "pkm": (4e6, 3.95), "peer": (5e6, 3.8)}


def synthetic_summaries(seed_shift=0.01, unbracketed=("pkm",)):
  """Main curves loss = 0.08·(ln N − ln N*)² + L* per (budget, arch), 5 sizes; seed 1 at the
  3 middle sizes, `seed_shift` higher. Archs in `unbracketed` fall monotonically."""
  out = []
  for budget, shift in ((1e12, 0.0), (1e13, -0.3)):
    for arch, (n_opt, l_opt) in TRUTH.items():
      for i, n in enumerate(np.geomspace(1e6, 2e7, 5)):
        if arch in unbracketed:
          loss = 5.0 - 0.05 * math.log(n) + shift
        else:
          loss = 0.08 * (math.log(n) - math.log(n_opt)) ** 2 + l_opt + shift
        for seed in ((0, 1) if 1 <= i <= 3 else (0,)):
          l = loss + seed_shift * seed
          out.append({"name": sweep.run_name(budget, arch, 16 * (i + 1), 2, seed=seed),
                      "arch": arch, "budget": budget, "seed": seed, "phase": "main",
                      "role": "main" if seed == 0 else "seed", "d_model": 16 * (i + 1),
                      "num_layers": 2, "params": int(n), "active_params": int(n),
                      "non_embedding_params": int(n), "tokens": int(budget / (6 * n)),
                      "moe_routing": "expert_choice" if arch == "moe" else "",
                      "eval": {"wikitext2_valid": {"loss": l, "ppl": math.exp(l),
                                                   "bpb": 0.4 * l},
                               "c4_sample": {"loss": l + 0.1, "ppl": math.exp(l + 0.1),
                                             "bpb": 0.45 * (l + 0.1)}},
                      "experts": ({"wikitext2_valid": {"block_1": {"usage": 0.9,
                                                                   "unevenness": 0.3}}}
                                  if arch in ("peer", "pkm") else {})})
  return out


def test_analysis_compute_optimal_spread_ratios_and_table(tmp_path):
  summaries = synthetic_summaries()
  a = sweep.analyze(summaries, "params")
  curves = {(c["budget"], c["arch"], c["eval_set"]): c for c in a["curves"]}
  assert len(curves) == 2 * 4 * 2
  for (budget, arch, s), c in curves.items():
    if arch == "pkm":  # never called compute-optimal
      assert not c["compute_optimal"] and c["opt_ppl"] is None and c["status"] == "edge"
      continue
    n_opt, l_opt = TRUTH[arch]
    l_opt += (-0.3 if budget == 1e13 else 0.0) + (0.1 if s == "c4_sample" else 0.0)
    assert c["compute_optimal"] and c["n_replicates"] == 2
    assert c["opt_x"] == pytest.approx(n_opt, rel=1e-3)
    # Replicate 2 is 0.01 higher at the 3 middle sizes: its minimum ~0.01 higher.
    assert c["opt_loss"] == pytest.approx(l_opt + 0.005, abs=2e-3)
    assert c["opt_loss_spread"] == pytest.approx(0.005, abs=2e-3)
    assert c["opt_ppl_spread"] > 0 and c["seed_noise_loss"] == pytest.approx(0.01 / math.sqrt(2))
    if s == "wikitext2_valid":  # bpb is proportional to the loss on one eval set
      assert c["opt_bpb"] == pytest.approx(0.4 * c["opt_loss"])
  ratios = {(r["budget"], r["arch"], r["eval_set"]): r for r in a["ratios"]}
  r = ratios[(1e12, "peer", "wikitext2_valid")]
  assert r["kind"] == "compute_optimal"
  assert r["ratio"] == pytest.approx(math.exp(3.8 - 4.0), rel=1e-3) and r["spread"] is not None
  assert ratios[(1e12, "pkm", "wikitext2_valid")]["kind"] == "best_measured"
  md, csv_path = sweep.write_table(a, str(tmp_path))
  text = open(md).read()
  assert "| model | WikiText-2 valid ppl | WikiText-2 valid bpb | WikiText-2 valid curve |" in text
  assert "MoE (expert choice, non-causal) 1e12" in text
  assert "| PKM 1e12 | (" in text and "NOT bracketed" in text
  peer = next(l for l in text.splitlines() if l.startswith("| PEER 1e12 |"))
  c = curves[(1e12, "peer", "wikitext2_valid")]
  assert c["opt_ppl"] == pytest.approx(math.exp(3.805), rel=2e-3)
  assert f"| {c['opt_ppl']:.2f} ± {c['opt_ppl_spread']:.2f} |" in peer and "bracketed" in peer
  assert "PEER / Dense" in text and "best runs; not bracketed)" in text
  assert "| PEER 1e12 | WikiText-2 valid | block_1 | 90.0% | 0.300 |" in text
  rows = list(csv.DictReader(open(csv_path)))
  assert len(rows) == 16 and {"status", "compute_optimal", "opt_ppl_spread"} <= set(rows[0])
  png = sweep.plot_isoflop(summaries, a, str(tmp_path / "isoflop.png"), "wikitext2_valid")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unbracketed_replicate_withholds_the_compute_optimal_value():
  summaries = synthetic_summaries(unbracketed=())
  # Seed 1 makes dense's 1e12 curve concave at its middle sizes: no longer bracketed.
  for s in summaries:
    if s["arch"] == "dense" and s["budget"] == 1e12 and s["seed"] == 1:
      s["eval"]["wikitext2_valid"]["loss"] = 20.0 if s["d_model"] == 48 else 10.0
  a = sweep.analyze(summaries, "params")
  c = next(c for c in a["curves"] if (c["budget"], c["arch"], c["eval_set"])
           == (1e12, "dense", "wikitext2_valid"))
  assert c["status"] == "inside" and c["replicate_status"][1] != "inside"
  assert not c["compute_optimal"] and c["opt_ppl"] is None
  assert "NOT bracketed" in sweep.table_markdown(a)


# ----------------------------------------------------------------------------- CLI


def test_dry_run_prints_plan_json_lines_and_estimate(tmp_path):
  cfg_path = write_sweep_file(tmp_path / "sw.py", lr_grid=(1e-3, 3e-3), seeds=1, nearest=1)
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert out.returncode == 0, out.stderr
  lines = [json.loads(l) for l in out.stdout.splitlines()]
  assert all(PLAN_KEYS <= set(l) for l in lines)
  names = {l["name"] for l in lines}
  assert {"b4e9_dense_d32_l2_lr1e-3", "b4e9_dense_d32_l2_lr3e-3", "b4e9_dense_d32_l1",
          "b4e9_peer_d32_l1"} <= names and len(lines) == 6
  assert "2 seed runs planned once their curves finish" in out.stderr
  assert "No time estimate" in out.stderr  # tiny_sweep has no timing section
  assert not (tmp_path / "w" / "runs").exists()


def test_bad_sweep_config_exits_2_with_one_line(tmp_path):
  cfg_path = write_sweep_file(tmp_path / "sw.py", archs="('dense', 'mlp')")
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and "error: sweep config: archs" in out.stderr
  cfg_path = write_sweep_file(tmp_path / "ok.py")
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--config.budgets=(1.0,)")
  assert out.returncode == 2 and "dropped" in out.stderr and out.stderr.strip().count("\n") == 0
  out = cli(f"--config={cfg_path}", "--dry_run")
  assert out.returncode == 2 and "error: sweep config: --workdir" in out.stderr


def test_print_and_gcloud_launchers_command_text(tmp_path):
  cfg_path = write_sweep_file(tmp_path / "sw.py")
  out = cli(f"--config={cfg_path}", "--workdir=sweepdir", "--launcher=print", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  cmds = out.stdout.splitlines()
  runs, _ = sweep.plan_sweep(tiny_sweep())
  assert len(cmds) == 4
  for cmd, run in zip(cmds, runs):
    assert cmd.startswith("python scripts/train.py --config=configs/default.py "
                          f"--workdir=sweepdir/runs/{run.name} ")
    assert f"--config.train.steps={run.steps} " in cmd
    assert f"--config.model.ffw={run.arch} " in cmd and "--config.seed=0 " in cmd
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--launcher=gcloud",
            "--dry_run")
  assert out.returncode == 0, out.stderr
  subs = out.stdout.splitlines()
  assert len(subs) == 4
  head = ("gcloud compute tpus tpu-vm ssh tpu-a --zone=us-east5-a --project=proj --worker=all "
          "'--command=cd peer_jax && ")
  assert sum(s.startswith(head) for s in subs) == 2
  assert sum(" tpu-b " in s for s in subs) == 2
  assert not (tmp_path / "w" / "runs").exists()
  # With an LR sweep, only the LR runs can run first; the rest wait for their results.
  cfg_path = write_sweep_file(tmp_path / "lr.py", lr_grid=(1e-3, 3e-3))
  out = cli(f"--config={cfg_path}", "--workdir=sweepdir", "--launcher=print", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert len(out.stdout.splitlines()) == 4 and all("_lr" in l for l in out.stdout.splitlines())
  assert "run this again for the next ones" in out.stderr


def test_local_launcher_skips_finished_resumes_unfinished_and_writes_summaries(tmp_path):
  cfg_path = write_sweep_file(tmp_path / "sw.py", budgets=(5e9,), archs=("dense",),
                              pairs=((32, 1), (48, 1)))
  workdir, rd = tmp_path / "w", tmp_path / "res"
  runs, _ = sweep.plan_sweep(tiny_sweep(budgets=(5e9,), archs=("dense",),
                                        pairs=((32, 1), (48, 1))))
  partial, done = runs
  assert partial.steps >= 3
  # A finished run: its summary is there; the launcher must not touch it.
  sweep.write_summary(str(rd), fake_summary(done, {"wikitext2_valid": 6.5}))
  done_dir = workdir / "runs" / done.name
  # An interrupted run: 2 of its steps done, with a checkpoint (as a killed sweep leaves it).
  part_dir = workdir / "runs" / partial.name
  cfg = sweep.apply_overrides(sweep.load_config_file("configs/default.py"), partial.overrides)
  cfg.train.steps, cfg.train.eval_every = 2, 0
  train_and_evaluate(cfg, str(part_dir))
  assert sweep.run_status(str(part_dir), partial.steps) == ("partial", 2)

  out = cli(f"--config={cfg_path}", f"--workdir={workdir}", f"--results_dir={rd}")
  assert out.returncode == 0, out.stderr
  assert "1 finished" in out.stderr and "ETA" in out.stderr
  assert not done_dir.exists()
  assert "resumed from checkpoint 2" in (part_dir / "train.log").read_text()
  steps = [r["step"] for r in sweep.read_metrics(str(part_dir / "metrics.jsonl"))]
  assert steps == list(range(1, partial.steps + 1))
  summary = json.loads((rd / "runs" / f"{partial.name}.json").read_text())
  assert summary["steps"] == partial.steps and summary["tokens"] == partial.tokens
  assert summary["total_flops"] == pytest.approx(partial.total_flops)
  assert {"loss", "ppl", "bpb"} <= set(summary["eval"]["wikitext2_valid"])
  assert summary["config"]["overrides"]["train.steps"] == partial.steps
  assert os.path.getsize(rd / "runs" / f"{partial.name}.json") < 8000
  assert (rd / "table.md").exists() and (rd / "isoflop.png").exists()
  # Started again, nothing is left to train.
  out = cli(f"--config={cfg_path}", f"--workdir={workdir}", f"--results_dir={rd}")
  assert out.returncode == 0 and "2 finished" in out.stderr, out.stderr


def test_collect_only_regenerates_table_and_plot_from_summaries_alone(tmp_path):
  """A fresh clone has only the committed summaries: no workdir, no tokenizer, no runs."""
  cfg = tiny_sweep(budgets=(4e10, 1.2e11), archs=("dense", "peer"),
                   pairs=((32, 1), (32, 2), (48, 2), (64, 2), (64, 3)), seeds=1, nearest=3)
  cfg.tokenizer = {"vocab_size": 512, "train_path": ""}
  planner = sweep.Planner(cfg, str(tmp_path / "gone"))
  rd = tmp_path / "committed"
  state = sweep.sweep_state(planner, {})
  mid = {(b, a): math.log(next(r.params for r in state.main_runs if r.budget == b
                               and r.arch == a and r.size == (48, 2)))
         for b in cfg.budgets for a in cfg.archs}
  loss = lambda r: 4.0 + 0.1 * (math.log(r.params) - mid[(r.budget, r.arch)]) ** 2 + 0.01 * r.seed
  _finish(str(rd), state.main_runs, loss)
  state = sweep.sweep_state(planner, sweep.read_summaries(str(rd)))
  assert len(state.seed_runs) == 12
  _finish(str(rd), state.seed_runs, loss)
  cfg_path = write_sweep_file(tmp_path / "sw.py", budgets=(4e10, 1.2e11),
                              pairs=((32, 1), (32, 2), (48, 2), (64, 2), (64, 3)), seeds=1,
                              nearest=3)
  with open(cfg_path, "a") as f:
    f.write("\n_g = get_config\ndef get_config():\n  c = _g()\n"
            "  c.tokenizer = {'vocab_size': 512, 'train_path': ''}\n  return c\n")
  clone = tmp_path / "clone_results"
  shutil.copytree(rd, clone)
  out = cli(f"--config={cfg_path}", "--collect_only", f"--results_dir={clone}", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert "32 of this plan's 32 planned runs" in out.stderr
  text = (clone / "table.md").read_text()
  assert "| Dense 4e10 |" in text and "| PEER 1.2e11 |" in text and "bracketed" in text
  assert "NOT bracketed" not in text
  with open(clone / "isoflop.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  fits = json.loads((clone / "fits.json").read_text())
  assert all(c["compute_optimal"] and c["n_replicates"] == 2 for c in fits["curves"])
  assert not (tmp_path / "gone").exists()
  first = text
  out = cli(f"--config={cfg_path}", "--collect_only", f"--results_dir={clone}", cwd=tmp_path)
  assert out.returncode == 0 and (clone / "table.md").read_text() == first  # deterministic


@pytest.mark.parametrize("name", ["isoflop_cpu", "isoflop_cpu_small", "isoflop_gpu"])
def test_shipped_sweep_configs_plan_the_full_design(name):
  cfg = sweep.load_config_file(f"configs/{name}.py")
  planner = sweep.Planner(cfg, None)
  state = sweep.sweep_state(planner, {})
  assert len(cfg.budgets) >= 3 and max(cfg.budgets) / min(cfg.budgets) >= 10
  assert len(planner.lr_grid) >= 3 and cfg.seeds.extra >= 1 and cfg.seeds.nearest == 3
  assert all(r.vocab_size == cfg.tokenizer.vocab_size for r in state.all_runs())
  assert 4096 <= cfg.tokenizer.vocab_size <= 8192
  planned = len(state.all_runs()) + state.seed_pending
  # LR runs + main grid (the LR-point of each curve is its LR run) + seeds, before extensions
  expected = len(cfg.lr_sweep.grid) * 4 + (4 * 3 * 5 - 4) + 4 * 3 * 3
  assert planned == expected
  # Each design's time at its measured rates: the small one fits 100 minutes on 2 cores but
  # cannot bracket most minima; the bracketing one takes hours (docs/reproduction.md).
  if name == "isoflop_cpu_small":
    assert sweep.remaining_seconds(state, cfg.timing) <= 100 * 60
  if name == "isoflop_cpu":
    assert 100 * 60 < sweep.remaining_seconds(state, cfg.timing) <= 8 * 3600
  # Once the LRs are known, every curve has its 5 sizes (one of them an LR-sweep run).
  cfg.lr_sweep.chosen = {a: cfg.lr_sweep.grid[1] for a in cfg.archs}
  state = sweep.sweep_state(sweep.Planner(cfg, None), {})
  assert len(state.all_runs()) + state.seed_pending == expected
  for b in cfg.budgets:
    for a in cfg.archs:
      assert len([r for r in state.main_runs if r.budget == float(b) and r.arch == a]) >= 5
  smoke = sweep.apply_smoke(cfg)
  assert not smoke.results_dir and len(sweep.plan_sweep(smoke)[0]) < 12


def test_committed_results_regenerate(tmp_path):
  """If docs/results/isoflop_cpu holds summaries, --collect_only rebuilds its table from them."""
  committed = os.path.join(REPO, "docs", "results", "isoflop_cpu")
  if not os.path.isdir(os.path.join(committed, "runs")) or not os.listdir(
      os.path.join(committed, "runs")):
    pytest.skip("the new CPU sweep has not produced summaries yet")
  clone = tmp_path / "res"
  shutil.copytree(committed, clone)
  out = cli("--config=configs/isoflop_cpu.py", "--collect_only", f"--results_dir={clone}")
  assert out.returncode == 0, out.stderr
  if os.path.exists(os.path.join(committed, "table.md")):
    assert (clone / "table.md").read_text() == open(os.path.join(committed, "table.md")).read()


@pytest.mark.slow
def test_gpu_config_smoke_end_to_end(tmp_path):
  """The GPU sweep's tiny --smoke form on CPU: tokenizer, LR sweep, main grid, seed runs,
  summaries, table and plot; a second invocation finds everything done."""
  workdir = tmp_path / "w"
  out = cli("--config=configs/isoflop_gpu.py", f"--workdir={workdir}", "--smoke", timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  rd = workdir / "results"
  names = sorted(os.listdir(rd / "runs"))
  assert sum("_lr" in n for n in names) == 4 and sum(n.endswith("_s1.json") for n in names) == 2
  assert len(names) == 10
  assert (workdir / "tokenizer").is_dir() and (rd / "table.md").exists()
  assert os.listdir(workdir / "jax_cache")  # the runs shared one compilation cache
  assert (rd / "isoflop.png").exists() and "ETA" in out.stderr
  summary = json.loads((rd / "runs" / names[0]).read_text())
  assert summary["vocab_size"] == 256 and "bpb" in summary["eval"]["wikitext2_valid"]
  out = cli("--config=configs/isoflop_gpu.py", f"--workdir={workdir}", "--smoke")
  assert out.returncode == 0 and "10 finished" in out.stderr, out.stderr[-2000:]


def test_lr_table_marks_a_best_lr_at_the_grid_edge():
  """An LR sweep whose best LR is an end of its grid is flagged, in the table and by lr_edge;
  one with an interior best is not."""
  from peer_jax import sweep_analysis
  grid = [3e-3, 6e-3, 1.2e-2]

  def row(arch, losses):
    best = grid[int(np.argmin(losses))]
    return {"arch": arch, "eval_set": "wikitext2_valid", "grid": grid, "chosen": best,
            "measured_best": best, "losses": {repr(lr): l for lr, l in zip(grid, losses)},
            "moe_routing": ""}

  edge, inside = row("dense", [5.6, 5.4, 5.2]), row("peer", [5.6, 5.1, 5.3])
  assert sweep_analysis.lr_edge(edge) and not sweep_analysis.lr_edge(inside)
  md = sweep_analysis.table_markdown({"curves": [], "ratios": []}, [edge, inside])
  flagged = [l for l in md.splitlines() if l.startswith("**LR not bracketed**")]
  assert len(flagged) == 1 and "Dense" in flagged[0] and "PEER" not in flagged[0]
  assert "LR not bracketed" not in sweep_analysis.table_markdown({"curves": [], "ratios": []},
                                                                 [inside])


def test_plan_digest_ignores_default_sections_of_kinds_the_run_does_not_use():
  """configs/base.py adds the sections of kinds that declare defaults (Memory+) to every
  config; a dense run's digest must not change with them (earlier summaries stay valid),
  while a change to the run's own settings does change it."""
  from peer_jax.sweep_collect import plan_digest
  from peer_jax.sweep_plan import Run
  import dataclasses as dc
  plain = {"seed": 0, "model": {"ffw": "dense", "d_model": 32}, "train": {"steps": 5},
           "data": {}}
  with_mp = copy.deepcopy(plain)
  with_mp["model"].update({"memory_plus.heads": 4, "memory_plus.top_k": 32})
  fields = {f.name: None for f in dc.fields(Run) if f.default is dc.MISSING
            and f.default_factory is dc.MISSING}
  run = lambda resolved: dc.replace(Run(**fields), resolved=resolved)  # noqa: E731
  assert plan_digest(run(plain)) == plan_digest(run(with_mp))
  mp_run = copy.deepcopy(with_mp)
  mp_run["model"]["ffw"] = "memory_plus"
  changed = copy.deepcopy(mp_run)
  changed["model"]["memory_plus.heads"] = 8
  assert plan_digest(run(mp_run)) != plan_digest(run(changed))
  wider = copy.deepcopy(plain)
  wider["model"]["d_model"] = 64
  assert plan_digest(run(plain)) != plan_digest(run(wider))


def test_in_process_launcher_trains_what_subprocesses_train(tmp_path):
  """--launcher=inprocess: every run in the sweep's own process gives the same metrics, step
  by step, and the same summaries as a train.py subprocess per run."""
  cfg_path = write_sweep_file(tmp_path / "sw.py", budgets=(4e9, 8e9), archs=("dense",),
                              pairs=((32, 1),))
  outs = {}
  for launcher in ("local", "inprocess"):
    workdir, rd = tmp_path / launcher, tmp_path / f"res_{launcher}"
    out = cli(f"--config={cfg_path}", f"--workdir={workdir}", f"--results_dir={rd}",
              f"--launcher={launcher}")
    assert out.returncode == 0, out.stderr[-3000:]
    outs[launcher] = (workdir, rd)
  names = sorted(os.listdir(outs["local"][1] / "runs"))
  assert len(names) == 2 and names == sorted(os.listdir(outs["inprocess"][1] / "runs"))
  for name in names:
    run = name[:-len(".json")]
    a, b = (json.loads((rd / "runs" / name).read_text()) for _, rd in outs.values())
    assert a["eval"] == b["eval"] and a["steps"] == b["steps"]
    ma, mb = (sweep.read_metrics(str(w / "runs" / run / "metrics.jsonl")) for w, _ in outs.values())
    assert [m["train/loss"] for m in ma if "train/loss" in m] == \
        [m["train/loss"] for m in mb if "train/loss" in m]
    assert "(in process)" in (outs["inprocess"][0] / "runs" / run / "train.log").read_text()


@pytest.mark.slow
def test_in_process_sweep_stops_on_sigterm_and_resumes(tmp_path):
  """SIGTERM to an in-process sweep mid-run: the run saves, the sweep exits 130 with one line,
  and the same command resumes the run from its checkpoint to the end."""
  cfg_path = write_sweep_file(tmp_path / "sw.py", budgets=(6e10,), archs=("dense",),
                              pairs=((32, 1),))
  workdir, rd = tmp_path / "w", tmp_path / "res"
  args = [sys.executable, SCRIPT, f"--config={cfg_path}", f"--workdir={workdir}",
          f"--results_dir={rd}", "--launcher=inprocess"]
  proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          stderr=subprocess.PIPE, text=True)
  (run,), _ = sweep.plan_sweep(tiny_sweep(budgets=(6e10,), archs=("dense",), pairs=((32, 1),)))
  metrics = workdir / "runs" / run.name / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 130, err[-2000:]
  assert "run the same command again to resume" in err
  status, last = sweep.run_status(str(workdir / "runs" / run.name), run.steps)
  assert status == "partial" and 0 < last < run.steps
  out = cli(*args[2:], timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  steps = [r["step"] for r in sweep.read_metrics(str(metrics))]
  assert steps == list(range(1, run.steps + 1))
  assert (rd / "runs" / f"{run.name}.json").exists()


def test_in_process_run_that_crashes_fails_alone(tmp_path, monkeypatch):
  """An unexpected exception in an in-process run is that run's failure (exit 1, traceback
  in its train.log), as a crashed subprocess would be, not the sweep's end; a config error
  is the one line and exit code train.py gives."""
  import peer_jax.train
  (run,), _ = sweep.plan_sweep(tiny_sweep(budgets=(5e9,), archs=("dense",), pairs=((32, 1),)))

  def crash(cfg, workdir):
    raise RuntimeError("boom in step 3")

  monkeypatch.setattr(peer_jax.train, "train_and_evaluate", crash)
  log = tmp_path / "train.log"
  assert sweep.run_in_process(run, "configs/default.py", str(tmp_path / "r"), str(log)) == 1
  text = log.read_text()
  assert "(in process)" in text and "RuntimeError: boom in step 3" in text
  from peer_jax.config_validation import ConfigError

  def bad(cfg, workdir):
    raise ConfigError("train.steps: must be positive")

  monkeypatch.setattr(peer_jax.train, "train_and_evaluate", bad)
  assert sweep.run_in_process(run, "configs/default.py", str(tmp_path / "r"), str(log)) == 2
  assert "error: config: train.steps: must be positive" in log.read_text()


def _pt(name, d, layers, params, loss):
  return {"name": name, "d_model": d, "num_layers": layers, "params": params,
          "eval": {"v": {"loss": loss, "ppl": math.exp(loss), "bpb": loss}}}


def test_fit_family_depth_drops_the_one_block_step():
  # A two-block U-shaped curve, with one-block points far above it: fitted over every size
  # the step spoils the fit; over the two-block family the minimum is inside and exact.
  two = [_pt(f"d{d}_l2", d, 2, p, 4.0 + 0.5 * (math.log(p) - math.log(4e5)) ** 2)
         for d, p in ((16, 1e5), (32, 2e5), (48, 4e5), (64, 8e5), (96, 1.6e6))]
  one = [_pt("d32_l1", 32, 1, 1.9e5, 4.3), _pt("d64_l1", 64, 1, 7.6e5, 4.4)]
  fit = sweep.fit_curve(two + one, "params", "v", "depth")
  assert fit["family_depth"] == 2 and fit["excluded_runs"] == ["d32_l1", "d64_l1"]
  assert fit["status"] == "inside" and fit["opt_x"] == pytest.approx(4e5, rel=1e-6)
  everything = sweep.fit_curve(two + one, "params", "v", "all")
  assert everything["family_depth"] is None and everything["excluded_runs"] == []
  assert abs(everything["opt_loss"] - 4.0) > 1e-3  # the step biases the all-sizes fit
  # Seed sizes come from the family only.
  picks = sweep.pick_seed_sizes(two + one, fit, 3, "params")
  assert all(layers == 2 for _, layers in picks) and (48, 2) in picks
  # The family is chosen by its size count (ties: deeper), never by losses.
  tie = [_pt("a", 16, 1, 1e5, 9.0), _pt("b", 32, 1, 2e5, 9.0), _pt("c", 16, 2, 1.1e5, 1.0),
         _pt("d", 32, 2, 2.1e5, 1.0)]
  assert sweep.family_points(tie, "params", "depth")[1] == 2
  with pytest.raises(ValueError, match="fit_family"):
    sweep.family_points(tie, "params", "width")
