"""The FFW-kind registry: every kind builds, validates, and counts FLOPs and parameters
consistently with the module it builds; nothing outside peer_jax/kinds branches on a kind."""

import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from peer_jax.sweep_config import apply_overrides
from peer_jax import expert_stats, flops, kinds, optim
from peer_jax.config_validation import ConfigError, validate_config
from peer_jax.model import Transformer, is_causal
from tests.conftest import REPO, tiny_config

KINDS = kinds.names()


def kind_config(name: str, **model_overrides):
  """conftest's tiny config with model.ffw = name and the given model keys set."""
  c = tiny_config(name)
  c.model = apply_overrides(c.model, model_overrides)
  return c


def _params(model):
  return nnx.state(model, nnx.Param)


def _leaves_with_names(state):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)]


def test_registry_names_and_lookup():
  assert KINDS[:4] == ("dense", "moe", "pkm", "peer")  # sweep table order
  assert "memory_plus" in KINDS
  for name in KINDS:
    assert kinds.get(name).name == name
  with pytest.raises(ValueError, match="model.ffw: unknown kind 'mlp'"):
    kinds.get("mlp")


@pytest.mark.parametrize("name", KINDS)
def test_kind_builds_validates_and_counts(name):
  c = kind_config(name)
  kind = kinds.get(name)
  validate_config(c, num_devices=1, check_files=False)
  m = c.model
  model = Transformer(m, rngs=nnx.Rngs(0))
  params = _params(model)
  actual = sum(x.size for x in jax.tree.leaves(params))
  counts = flops.param_counts(m)
  assert counts["total"] == actual
  # Expert tables: the leaves the kind names (the table optimizer's), whose size the count
  # reports; MoE's expert weights are counted as tables but optimised like the rest.
  tables = [x for path, x in _leaves_with_names(params)
            if any(f"['{t}']" in path for t in kind.table_names)]
  assert all(optim.is_table(p, x) for p, x in jax.tree_util.tree_leaves_with_path(params)
             if any(f"['{t}']" in jax.tree_util.keystr(p) for t in kind.table_names))
  shape = kind.table_shape(m, 1)
  if kind.table_names:
    assert counts["expert_tables"] == sum(x.size for x in tables) > 0
    assert shape is not None and all(x.shape[0] == shape[0] for x in tables)
  else:
    assert shape is None and not tables
  # FLOPs: the kind's terms are the expert-layer terms of flops_per_token.
  f = flops.flops_per_token(m, c.train.seq_len)
  terms = kind.flop_terms(m, 1, c.train.seq_len)
  for key, value in terms.items():
    assert f[key] == value
  assert f["expert_layer"] == sum(v for k, v in terms.items() if not k.endswith("_ops"))
  # Forward: the aux carries expert indices inside the pool the usage statistics use.
  logits, aux = model(jnp.zeros((2, 8), jnp.int32))
  assert logits.shape == (2, 8, m.vocab_size)
  pools = expert_stats.expert_pools(m)
  for block, n in pools.items():
    assert int(jnp.max(aux[block]["expert_indices"])) < n
  assert is_causal(m) == kind.causal(m)
  assert isinstance(kind.display_label(kind.variant(m)), str)


@pytest.mark.parametrize("name", [n for n in KINDS if kinds.get(n).kernel_key])
def test_kernel_key_is_validated(name):
  kind = kinds.get(name)
  c = kind_config(name, **{kind.kernel_key[len("model."):]: "no_such_kernel"})
  with pytest.raises(ConfigError, match=re.escape(kind.kernel_key)):
    validate_config(c, num_devices=1, check_files=False)


def test_moe_label_and_causality_come_from_the_kind():
  moe = kinds.get("moe")
  assert moe.display_label("") == "MoE (expert choice, non-causal)"
  assert moe.display_label("token_choice") == "MoE (token choice)"
  c = kind_config("moe")
  assert not is_causal(c.model)
  c.model.moe.routing = "token_choice"
  assert is_causal(c.model)


# Comparisons of a kind-valued name with a kind's name: `ffw == "peer"`, `kind in ("moe",
# ...)`, `arch != "pkm"`, and dicts keyed by kind names (`{"peer": ..., "pkm": ...}`).
_NAMES = "|".join(re.escape(n) for n in KINDS)
_BRANCH = re.compile(
    rf"""\b(ffw|kind|arch)\b\s*(==|!=|\bin\b|\bnot in\b)\s*[(\[{{]?\s*["']({_NAMES})["']"""
    rf"""|["']({_NAMES})["']\s*(==|!=)\s*\S*\b(ffw|kind|arch)\b"""
    rf"""|[{{,]\s*["']({_NAMES})["']\s*:\s*\S*\.(peer|pkm|moe|{re.escape("memory_plus")})\b""")


def per_kind_branches():
  """(file, line number, line) of every per-kind branch in the library outside kinds/."""
  root = os.path.join(REPO, "peer_jax")
  found = []
  for folder, _, files in os.walk(root):
    if os.path.relpath(folder, root).split(os.sep)[0] == "kinds":
      continue
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      path = os.path.join(folder, f)
      for i, line in enumerate(open(path, encoding="utf-8"), 1):
        code = line.split("#", 1)[0]
        if _BRANCH.search(code):
          found.append((os.path.relpath(path, REPO), i, line.strip()))
  return found


def test_branch_pattern_catches_the_old_spellings():
  for line in ('if cfg.ffw == "moe" and x:', 'if kind == "peer":', 'm.ffw in ("peer", "pkm")',
               'parallel = kind == "peer" and p', 'if arch == "moe":',
               'sizes = {"peer": model_cfg.peer.num_experts, "pkm": m.pkm.num_memories}'):
    assert _BRANCH.search(line), line
  for line in ('kind = kinds.get(cfg.ffw)', 'm.ffw = "peer"', 'label = arch_label(arch, r)'):
    assert not _BRANCH.search(line), line


# Known, deliberate exceptions (file, code): not behaviour of a kind.
ALLOWED = {
    # Every architecture's loss relative to the dense baseline's: the comparison is with
    # the baseline, whatever the kinds are.
    ("peer_jax/sweep_analysis.py", 'if arch == "dense" or d is None:'),
}


def test_no_per_kind_branches_outside_the_registry():
  found = [(path, line) for path, _, line in per_kind_branches()]
  assert [f for f in found if f not in ALLOWED] == []


def test_every_kind_is_a_sweep_architecture():
  from peer_jax import sweep_analysis, sweep_plan
  assert sweep_plan.ARCHS == KINDS
  for name in KINDS:
    run = sweep_plan.run_name(6e18, name, 512, 8)
    assert sweep_plan.parse_run_name(run)["arch"] == name
    assert sweep_analysis.arch_label(name) == kinds.get(name).label or name == "moe"
    assert name in sweep_analysis.COLORS
