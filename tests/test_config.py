"""Config validation: every impossible value names its key; the CLI turns it into one line."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import base
from peer_jax.config_validation import ConfigError, validate_config
from tests.conftest import REPO, tiny_config

CONFIG_FILES = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                      if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_configs_are_valid(name):
  import importlib
  module = importlib.import_module(f"configs.{name[:-3]}")
  cfg = module.get_config()
  if "model" in cfg:  # sweep configs hold lists of these, not one
    validate_config(cfg, num_devices=1)


BAD_VALUES = [
    ("train.steps", -5, "train.steps"),
    ("train.steps", 0, "train.steps"),
    ("model.num_heads", 3, "model.num_heads"),
    ("model.ffw", "mlp", "model.ffw"),
    ("model.ffw_activation", "tanh", "model.ffw_activation"),
    ("model.ffw_layers", "middle,2", "model.ffw_layers"),
    ("model.ffw_layers", "7", "model.ffw_layers"),
    ("model.dtype", "float8", "model.dtype"),
    ("train.learning_rate", -1.0, "train.learning_rate"),
    ("train.grad_accum_steps", 3, "train.batch_size"),
    ("train.warmup_steps", -1, "train.warmup_steps"),
    ("train.b2", 1.0, "train.b2"),
    ("mesh.data", 3, "mesh"),
    ("mesh.tensor", -1, "mesh"),  # two axes set to -1
    ("data.train_path", "/nonexistent/train.txt", "data.train_path"),
    ("data.tokenizer", "/nonexistent/spm.model", "data.tokenizer"),
    ("data.text_format", "csv", "data.text_format"),
    ("data.eval_paths", "valid=/nonexistent/valid.txt", "data.eval_paths"),
    ("data.train_path", "a=/nonexistent/x.txt@0.5", "data.train_path"),
    ("data.num_threads", -1, "data.num_threads"),
]


@pytest.mark.parametrize("key,value,named", BAD_VALUES)
def test_bad_value_names_its_key(cfg, key, value, named):
  section, _, leaf = key.rpartition(".")
  node = cfg
  for part in section.split("."):
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError) as info:
    validate_config(cfg, num_devices=1)
  message = str(info.value)
  assert message.startswith(named), message
  assert "\n" not in message


PEER_BAD = [
    ("num_experts", 1000, "not a perfect square"),
    ("query_dim", 15, "even"),
    ("top_k", 17, "exceeds"),
    ("heads", 0, ">= 1"),
    ("activation", "tanh", "unknown"),
    ("query_norm", "groupnorm", "unknown"),
    ("router", "argmax", "unknown"),
    ("placement", "before", "unknown"),
]


@pytest.mark.parametrize("key,value,words", PEER_BAD)
def test_bad_peer_value(cfg, key, value, words):
  cfg.model.ffw = "peer"
  cfg.model.peer[key] = value
  with pytest.raises(ConfigError, match=rf"^model\.peer\.{key}: .*{words}"):
    validate_config(cfg, num_devices=1)


def test_peer_section_ignored_when_unused(cfg):
  cfg.model.peer.num_experts = 1000  # not square, but model.ffw is dense
  validate_config(cfg, num_devices=1)


def test_batch_not_divisible_by_data_parallel_axis(cfg):
  cfg.train.batch_size = 12
  with pytest.raises(ConfigError, match=r"^train\.batch_size: .*data-parallel mesh size 8"):
    validate_config(cfg, num_devices=8)
  cfg.mesh.data, cfg.mesh.tensor = 4, 2  # dp 4 divides 12
  validate_config(cfg, num_devices=8)


def _train_cli(tmp_path, *overrides):
  cmd = [sys.executable, os.path.join(REPO, "scripts", "train.py"),
         "--config=" + os.path.join(REPO, "configs", "default.py"),
         f"--workdir={tmp_path / 'run'}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize("override,key", [
    ("--config.train.steps=-1", "train.steps"),
    ("--config.model.num_heads=3", "model.num_heads"),
    ("--config.model.ffw=mlp", "model.ffw"),
    ("--config.model.ffw=peer --config.model.peer.num_experts=1000", "model.peer.num_experts"),
])
def test_cli_bad_value_one_line_no_traceback(tmp_path, override, key):
  result = _train_cli(tmp_path, *override.split())
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and key in errors[0], result.stderr[-2000:]
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_overrides_reach_the_run(tmp_path):
  result = _train_cli(
      tmp_path, "--config.train.steps=3", "--config.train.log_every=1",
      "--config.train.eval_every=0", "--config.model.ffw=dense", "--config.model.d_model=32",
      "--config.model.num_heads=2", "--config.model.num_layers=1", "--config.model.d_ff=64",
      "--config.train.batch_size=2", "--config.train.seq_len=16", "--config.train.warmup_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  run = tmp_path / "run"
  saved = json.loads((run / "config.json").read_text())
  assert saved["train"]["steps"] == 3 and saved["model"]["d_model"] == 32
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert "step 3/3" in result.stdout and "eta" in result.stdout
  assert str(run / "metrics.jsonl") in result.stdout


def test_configuration_doc_lists_every_key():
  """docs/configuration.md documents each key of configs/base.py, and no stale ones."""
  def flatten(node, prefix=""):
    for key, value in node.items():
      if hasattr(value, "items"):
        yield from flatten(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"

  keys = set(flatten(base.get_config()))  # includes the sections kinds declare defaults for
  doc = open(os.path.join(REPO, "docs", "configuration.md")).read()
  documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", doc, flags=re.M))
  assert keys - documented == set(), f"undocumented keys: {sorted(keys - documented)}"
  assert documented - keys == set(), f"documented keys that do not exist: {sorted(documented - keys)}"
