"""isoFLOP sweeps: plan arithmetic, run names, CLI output, launch/resume, fit, table and plot."""

import csv
import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from peer_jax import flops as flops_lib
from peer_jax import sweep
from peer_jax.train import train_and_evaluate
from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "sweep_isoflop.py")
PLAN_KEYS = {"name", "arch", "budget", "params", "active_params", "flops_per_token", "steps",
             "tokens", "total_flops"}


def tiny_sweep(budgets=(4e9,), archs=("dense", "peer"), pairs=((32, 1), (32, 2))):
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
  c.tolerance = 0.05
  c.min_steps = 2
  c.checkpoint_every = 2
  c.fit_x = "params"
  c.gcloud = g = ml_collections.ConfigDict()
  g.tpus = ("tpu-a", "tpu-b")
  g.zone = "us-east5-a"
  g.project = "proj"
  g.repo_dir = "peer_jax"
  g.python = "python3"
  g.workdir = "runs/sw"
  return c


def write_sweep_file(path, budgets="(4e9,)", archs="('dense', 'peer')",
                     pairs="((32, 1), (32, 2))"):
  path.write_text(f"""
from tests.test_sweep import tiny_sweep

def get_config():
  return tiny_sweep(budgets={budgets}, archs={archs}, pairs={pairs})
""")
  return str(path)


def cli(*args, cwd=REPO, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd, env=env)


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
    assert r.flops_per_token == flops_lib.flops_per_token(run_cfg.model, 32, training=True)["total"]
    counts = flops_lib.param_counts(run_cfg.model, 32)
    assert (r.params, r.active_params) == (counts["total"], counts["active"])
  peer = [r for r in runs if r.arch == "peer"]
  assert all(r.active_params < r.params for r in peer)


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


@pytest.mark.parametrize("budget,arch,d,l,h", [(6e18, "peer", 512, 8, None),
                                               (2e19, "dense", 1024, 16, 16),
                                               (1.5e15, "moe", 96, 3, None),
                                               (2.25e13, "pkm", 64, 2, 4)])
def test_names_parse_back(budget, arch, d, l, h):
  name = sweep.run_name(budget, arch, d, l, h)
  assert sweep.parse_run_name(name) == {"budget": budget, "arch": arch, "d_model": d,
                                        "num_layers": l, "num_heads": h}
  assert sweep.run_name(6e18, "peer", 512, 8) == "b6e18_peer_d512_l8"
  assert sweep.run_name(1.5e15, "moe", 96, 3) == "b1p5e15_moe_d96_l3"


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


# ----------------------------------------------------------------------------- CLI


def test_dry_run_prints_plan_json_lines(tmp_path):
  cfg_path = write_sweep_file(tmp_path / "sw.py")
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert out.returncode == 0, out.stderr
  lines = [json.loads(l) for l in out.stdout.splitlines()]
  assert len(lines) == 4 and all(PLAN_KEYS <= set(l) for l in lines)
  assert {l["name"] for l in lines} == {"b4e9_dense_d32_l1", "b4e9_dense_d32_l2",
                                        "b4e9_peer_d32_l1", "b4e9_peer_d32_l2"}
  assert not (tmp_path / "w" / "runs").exists()
  assert len((tmp_path / "w" / "plan.jsonl").read_text().splitlines()) == 4


def test_bad_sweep_config_exits_2_with_one_line(tmp_path):
  cfg_path = write_sweep_file(tmp_path / "sw.py", archs="('dense', 'mlp')")
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and "archs" in out.stderr, out.stderr
  cfg_path = write_sweep_file(tmp_path / "ok.py")
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--config.budgets=(1.0,)")
  assert out.returncode == 2 and "dropped" in out.stderr and out.stderr.strip().count("\n") == 0


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
    assert f"--config.model.ffw={run.arch} " in cmd
  out = cli(f"--config={cfg_path}", f"--workdir={tmp_path / 'w'}", "--launcher=gcloud",
            "--dry_run")
  assert out.returncode == 0, out.stderr
  subs = out.stdout.splitlines()
  assert len(subs) == 4
  head = ("gcloud compute tpus tpu-vm ssh tpu-a --zone=us-east5-a --project=proj --worker=all "
          "'--command=cd peer_jax && ")
  assert sum(s.startswith(head) for s in subs) == 2
  assert sum(" tpu-b " in s for s in subs) == 2
  for s in subs:
    assert "'--command=cd peer_jax && python3 scripts/train.py --config=configs/default.py " \
           "--workdir=runs/sw/runs/b4e9_" in s
  assert not (tmp_path / "w" / "runs").exists()


def test_local_launcher_skips_finished_and_resumes_unfinished(tmp_path):
  cfg_path = write_sweep_file(tmp_path / "sw.py", budgets="(5e9,)", archs="('dense',)",
                              pairs="((32, 1), (48, 1))")
  workdir = tmp_path / "w"
  runs, _ = sweep.plan_sweep(tiny_sweep(budgets=(5e9,), archs=("dense",),
                                        pairs=((32, 1), (48, 1))))
  partial, done = runs
  assert partial.steps >= 3
  # A finished run: its final eval record is there; the launcher must not touch it.
  done_dir = workdir / "runs" / done.name
  done_dir.mkdir(parents=True)
  record = {"step": done.steps, "train/loss": 5.0, "eval/wikitext2_valid/loss": 6.5,
            "eval/wikitext2_valid/ppl": math.exp(6.5)}
  (done_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 9.0}) + "\n"
                                          + json.dumps(record) + "\n")
  # An interrupted run: 2 of its steps done, with a checkpoint (as a killed sweep leaves it).
  part_dir = workdir / "runs" / partial.name
  cfg = sweep.apply_overrides(sweep.load_config_file("configs/default.py"), partial.overrides)
  cfg.train.steps, cfg.train.eval_every = 2, 0
  train_and_evaluate(cfg, str(part_dir))
  assert sweep.run_status(str(part_dir), partial.steps) == ("partial", 2)

  out = cli(f"--config={cfg_path}", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr
  assert "2 runs, 1 finished, 1 to train" in out.stderr and "ETA" in out.stderr
  assert not (done_dir / "train.log").exists()
  assert "resumed from checkpoint 2" in (part_dir / "train.log").read_text()
  steps = [r["step"] for r in sweep.read_metrics(str(part_dir / "metrics.jsonl"))]
  assert steps == list(range(1, partial.steps + 1))
  assert sweep.run_status(str(part_dir), partial.steps)[0] == "done"
  results = [json.loads(l) for l in (workdir / "results.jsonl").read_text().splitlines()]
  assert [r["name"] for r in results] == [partial.name, done.name]
  assert results[1]["eval"]["wikitext2_valid"]["loss"] == 6.5
  assert (workdir / "table.md").exists() and (workdir / "isoflop.png").exists()
  # Started again, nothing is left to train.
  assert all(sweep.run_status(str(workdir / "runs" / r.name), r.steps)[0] == "done"
             for r in runs)


# ----------------------------------------------------------------------------- fitting


def test_parabola_fit_recovers_known_minimum():
  rng = np.random.default_rng(0)
  x = np.log(np.geomspace(1e7, 1e9, 7))
  x0, y0 = math.log(1e8), 3.2
  y = 0.05 * (x - x0) ** 2 + y0 + rng.normal(0, 1e-4, x.size)
  _, x_min, y_min = sweep.fit_parabola(x, y)
  assert x_min == pytest.approx(x0, abs=0.02) and y_min == pytest.approx(y0, abs=1e-3)
  _, x_min, _ = sweep.fit_parabola(x, -(x - x0) ** 2)  # no minimum
  assert math.isnan(x_min)
  _, x_min, _ = sweep.fit_parabola(x[:2], y[:2])
  assert math.isnan(x_min)


def fake_results():
  """Synthetic runs: loss = a·(ln N − ln N*)² + L*, a known minimum per (budget, arch)."""
  out = []
  truth = {}
  for budget, shift in ((1e15, 0.0), (3e15, -0.3)):
    for arch, (n_opt, l_opt) in {"dense": (3e6, 4.0), "moe": (4e6, 3.9), "pkm": (4e6, 3.95),
                                 "peer": (5e6, 3.8)}.items():
      truth[(budget, arch)] = (n_opt * (1 + (budget > 1e15)), l_opt + shift)
      for n in np.geomspace(1e6, 2e7, 5):
        loss = 0.08 * (math.log(n) - math.log(truth[(budget, arch)][0])) ** 2 + l_opt + shift
        out.append({"name": sweep.run_name(budget, arch, int(n // 1e4), 2), "arch": arch,
                    "budget": budget, "params": int(n), "active_params": int(n),
                    "non_embedding_params": int(n), "tokens": int(budget / (6 * n)),
                    "eval": {"wikitext2_valid": {"loss": loss, "ppl": math.exp(loss)},
                             "c4": {"loss": loss + 0.1, "ppl": math.exp(loss + 0.1)}}})
  return out, truth


def test_fit_table_csv_and_plot_from_fake_results(tmp_path):
  results, truth = fake_results()
  fits = sweep.fit_sweep(results, "params")
  assert len(fits) == 2 * 4 * 2
  for f in fits:
    n_opt, l_opt = truth[(f["budget"], f["arch"])]
    l_opt += 0.1 if f["eval_set"] == "c4" else 0.0
    assert f["method"] == "fit"
    assert f["opt_x"] == pytest.approx(n_opt, rel=1e-3)
    assert f["opt_ppl"] == pytest.approx(math.exp(l_opt), rel=1e-6)
  md, csv_path = sweep.write_table(fits, str(tmp_path))
  text = open(md).read()
  assert "| model | c4 | wikitext2_valid |" in text
  assert f"| PEER 1e15 | {math.exp(3.9):.2f} | {math.exp(3.8):.2f} |" in text
  assert "| Dense 3e15 |" in text
  rows = list(csv.DictReader(open(csv_path)))
  assert len(rows) == 16 and {"budget", "arch", "eval_set", "opt_ppl"} <= set(rows[0])
  png = sweep.plot_isoflop(results, fits, str(tmp_path / "isoflop.png"), "wikitext2_valid")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 10_000


def test_fit_falls_back_to_best_point_outside_range():
  results, _ = fake_results()
  mono = [dict(r, eval={"v": {"loss": 5.0 - 0.1 * math.log(r["params"])}})
          for r in results if r["budget"] == 1e15 and r["arch"] == "dense"]
  mono[2]["eval"]["v"]["loss"] += 1e-3  # a slight curvature with its minimum out of range
  (fit,) = sweep.fit_sweep(mono, "params")
  assert fit["method"] == "best_point"
  assert fit["best_run"] == max(mono, key=lambda r: r["params"])["name"]
  assert fit["opt_loss"] == pytest.approx(min(r["eval"]["v"]["loss"] for r in mono))
