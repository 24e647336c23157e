"""The ablation runner: equal-FLOP planning, summaries, tables regenerated from the repo."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from peer_jax import ablation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "docs", "results", "ablations")


def tiny_ablation():
  return ablation.load_config_file("configs/ablations.py")


def test_every_run_spends_the_same_training_flops():
  cfg = tiny_ablation()
  runs = ablation.plan(cfg, tokenizer_path="/tmp/spm_4096.model")  # vocab_size 4096
  assert {r.variant for r in runs} == set(cfg.variants)
  for r in runs:
    assert abs(r.train_flops / cfg.budget - 1) < 0.02, r.name
  # Variants of different cost get different step counts for the same compute.
  steps = {r.variant: r.steps for r in runs}
  assert steps["peer_n32"] > steps["peer_n256"] and steps["dense"] != steps["moe_token_choice"]
  # The seed-noise variant's seeds first, then every first seed before any second seed.
  assert [(r.variant, r.seed) for r in runs[:3]] == [("peer_ref", 0), ("peer_ref", 1),
                                                     ("peer_ref", 2)]
  seeds = [r.seed for r in runs[3:]]
  assert seeds == sorted(seeds)


def test_overrides_reach_the_command_and_bad_keys_are_refused():
  cfg = tiny_ablation()
  run = next(r for r in ablation.plan(cfg) if r.variant == "peer_table_lr4")
  cmd = ablation.train_command(run, cfg.base, "/tmp/x")
  assert "--config.train.table_lr_scale=4.0" in cmd
  assert "--config.train.table_lr_schedule=decay_to_base" in cmd
  assert f"--config.train.steps={run.steps}" in cmd
  bad = tiny_ablation()
  bad.variants = {"oops": (("model.peer.num_expertz", 4),)}
  with pytest.raises(ablation.AblationError, match="model.peer.num_expertz: unknown config key"):
    ablation.plan(bad)


def fake_summary(variant, seed, loss, usage=None, steps=100):
  final = {"eval/wikitext2_valid/loss": loss, "eval/wikitext2_valid/ppl": 2.718 ** loss,
           "eval/wikitext2_valid/bpb": loss / 3}
  if usage is not None:
    final["eval/wikitext2_valid/experts/block_1/usage"] = usage
    final["eval/wikitext2_valid/experts/block_1/unevenness"] = 0.5
  return {"name": f"{variant}_s{seed}", "variant": variant, "seed": seed, "steps": steps,
          "train_flops": 1e12, "overrides": {"model.peer.num_experts": 1024}, "command": "x",
          "final": final}


def test_report_states_means_spreads_noise_and_missing_runs(tmp_path):
  cfg = tiny_ablation()
  results = tmp_path / "results"
  results.mkdir()
  for s in (fake_summary("peer_ref", 0, 4.0, 1.0), fake_summary("peer_ref", 1, 4.2, 0.9),
            fake_summary("peer_ref", 2, 4.1, 1.0), fake_summary("peer_n32", 0, 4.5, 1.0)):
    (results / f"{s['name']}.json").write_text(json.dumps(s))
  report = ablation.write_report(cfg, str(results), str(tmp_path / "out"), str(tmp_path / "out"))
  assert "Seed noise: wikitext2_valid loss std 0.1000 over 3 seeds of `peer_ref`" in report
  assert "| peer_ref | 3 | 100 | 4.100 ± 0.100 |" in report
  assert "| peer_n32 | 1 | 100 | 4.500 |" in report
  assert "| peer_n256 | 0 | not run |" in report
  assert (tmp_path / "out" / "tables.md").read_text() == report
  assert (tmp_path / "out" / "ablation_a_num_experts.png").exists()


@pytest.mark.skipif(not os.path.exists(os.path.join(RESULTS, "tables.md")),
                    reason="no committed ablation results")
def test_committed_tables_regenerate_from_the_committed_summaries(tmp_path):
  """docs/results/ablations/tables.md is exactly what the committed summaries give."""
  cfg = tiny_ablation()
  report = ablation.write_report(cfg, RESULTS, str(tmp_path), str(tmp_path))
  with open(os.path.join(RESULTS, "tables.md")) as f:
    assert f.read() == report


def test_cli_errors_are_one_line(tmp_path):
  script = os.path.join(REPO, "scripts", "ablate.py")
  out = subprocess.run([sys.executable, script, "--config=configs/ablations.py"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "error: flags: --workdir is required (or pass --collect_only)")
  out = subprocess.run([sys.executable, script, "--config=configs/ablations.py",
                        f"--workdir={tmp_path}", "--study=z_nothing", "--dry_run"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: ablation: --study: unknown")
