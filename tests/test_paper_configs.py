"""The paper-scale configs: configs/c4_*.py (single runs) agree with configs/isoflop_paper.py
(the paper's Table 1 procedure); their eval sets; no undocumented MoE capacity factor.

Fast: configs and the sweep planner only (no model is run, nothing is downloaded)."""

import os
import re

import pytest

from configs import _c4, base, isoflop_paper
from peer_jax import evaluate, sweep_plan
from peer_jax.config_validation import validate_config
from peer_jax.data import pipeline
from tests.conftest import REPO

KINDS = ("dense", "moe", "pkm", "peer")
BUDGETS = tuple(_c4.BUDGETS)  # "6e18", "2e19", in the sweep's order


def _c4_config(kind, budget_name, monkeypatch, eval_data=None):
  if eval_data is None:
    monkeypatch.delenv(_c4.EVAL_DATA_ENV, raising=False)
  else:
    monkeypatch.setenv(_c4.EVAL_DATA_ENV, str(eval_data))
  return _c4.get_config(kind, budget_name)


@pytest.fixture(scope="module")
def planner():
  saved = os.environ.pop(_c4.EVAL_DATA_ENV, None)
  try:
    return sweep_plan.Planner(isoflop_paper.get_config())
  finally:
    if saved is not None:
      os.environ[_c4.EVAL_DATA_ENV] = saved


# ----------------------------------------------------------------------------- one family


def test_sweep_config_uses_the_c4_family():
  sweep = isoflop_paper.get_config()
  assert tuple(map(tuple, sweep.sizes.pairs)) == _c4.FAMILY
  assert sweep.sizes.head_dim == _c4.HEAD_DIM and sweep.sizes.d_ff_ratio == _c4.D_FF_RATIO
  assert tuple(sweep.budgets) == tuple(_c4.BUDGETS.values())
  assert len(sweep.sizes.windows) == len(sweep.budgets)


@pytest.mark.parametrize("budget_name", BUDGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_c4_single_run_is_a_point_of_the_paper_sweep(planner, kind, budget_name, monkeypatch):
  """Same backbone (d_model, layers, heads, d_ff), in the budget's window; the planner's run of
  that size has the c4 config's whole model section, steps, warmup, LR, batch and data."""
  cfg = _c4_config(kind, budget_name, monkeypatch)
  m = cfg.model
  size = (m.d_model, m.num_layers, m.num_heads, m.d_ff)
  bi = BUDGETS.index(budget_name)
  window = sweep_plan.budget_sizes(planner.sweep, bi)
  assert size in window, f"{kind} {budget_name}: backbone {size} not in the sweep's {window}"
  budget = _c4.BUDGETS[budget_name]
  run = planner.make_run(budget, kind, size, lr=planner.default_lr)
  assert run is not None, planner.dropped[-1]
  flat = lambda section: {k: sweep_plan._portable(v)
                          for k, v in sweep_plan._flat(section.to_dict()).items()}
  assert run.resolved["model"] == flat(cfg.model)
  for key in ("steps", "warmup_steps", "learning_rate", "batch_size", "seq_len"):
    assert run.resolved["train"][key] == cfg.train[key], key
  assert run.resolved["data"]["train_path"] == cfg.data.train_path
  assert run.resolved["data"]["eval_paths"] == cfg.data.eval_paths


@pytest.mark.parametrize("budget_name", BUDGETS)
def test_dense_optimum_lies_inside_its_sweep_window(budget_name):
  """The sweep brackets the dense compute-optimal backbone: sizes on both sides of it."""
  window = [s[:2] for s in sweep_plan.budget_sizes(isoflop_paper.get_config(),
                                                    BUDGETS.index(budget_name))]
  best = _c4.compute_optimal_backbone(_c4.BUDGETS[budget_name])
  assert best in window and 0 < window.index(best) < len(window) - 1, (best, window)


def test_heads_follow_one_head_dim_and_allow_tensor_4():
  for d, _ in _c4.FAMILY:
    c = base.get_config()
    _c4.set_backbone(c, d, _c4.num_layers_for(d))
    assert c.model.num_heads * _c4.HEAD_DIM == d
  for name in BUDGETS:
    d, _ = _c4.compute_optimal_backbone(_c4.BUDGETS[name])
    assert (d // _c4.HEAD_DIM) % 4 == 0  # docs/scaling.md compiles with mesh.tensor=4


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("budget_name", BUDGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_c4_configs_validate(kind, budget_name, monkeypatch):
  cfg = _c4_config(kind, budget_name, monkeypatch)
  validate_config(cfg, num_devices=1, check_files=False)
  cfg.mesh.tensor = 4  # the pod meshes of docs/scaling.md: 16 devices, data 4 × tensor 4
  validate_config(cfg, num_devices=16, check_files=False)


def test_moe_settings_are_the_documented_ones(monkeypatch):
  cfg = _c4_config("moe", "6e18", monkeypatch)
  assert cfg.model.moe.routing == "expert_choice"  # the paper's baseline, not causal
  assert cfg.model.moe.capacity_factor == base.get_config().model.moe.capacity_factor == 2.0
  assert cfg.model.moe.num_experts == 128 and cfg.model.moe.d_ff == 0
  for text in (_c4.__doc__, isoflop_paper.__doc__,
               open(os.path.join(REPO, "configs", "c4_moe.py")).read()):
    assert "NOT causal" in text


_SETS_CAPACITY = re.compile(r"""capacity_factor\s*=[^=]|capacity_factor["']\s*:""")


def test_no_config_sets_capacity_factor_without_a_comment():
  """A capacity factor set in configs/ carries a comment on its line or the two above."""
  bad = []
  folder = os.path.join(REPO, "configs")
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py"):
      continue
    lines = open(os.path.join(folder, name)).read().splitlines()
    for i, line in enumerate(lines):
      if _SETS_CAPACITY.search(line.split("#")[0]):
        if not any("#" in l for l in lines[max(0, i - 2):i + 1]):
          bad.append(f"configs/{name}:{i + 1}: {line.strip()}")
  assert not bad, "capacity_factor set without a comment saying why:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- eval sets

ALL_LOCAL = {"wikitext103": "wikitext-103-raw/wiki.valid.raw", "pile": "pile/val.jsonl",
             "curation": "curation_corpus/valid.jsonl", "lambada": "lambada/lambada_test.jsonl"}


def _write(root, rel, text='{"text": "a passage whose last word is here"}\n'):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


@pytest.mark.parametrize("kind", KINDS)
def test_c4_eval_sets_without_local_data(kind, monkeypatch):
  for budget_name in BUDGETS:
    sets = pipeline.eval_sources(_c4_config(kind, budget_name, monkeypatch).data.eval_paths)
    assert list(sets) == ["c4_valid"]
    assert sets["c4_valid"].source == "tfds:c4/en:3.1.0" and sets["c4_valid"].split == "validation"


def test_local_eval_sets_both_lambada_modes(tmp_path, monkeypatch):
  for rel in ALL_LOCAL.values():
    _write(tmp_path, rel)
  cfg = _c4_config("peer", "6e18", monkeypatch, eval_data=tmp_path)
  sets = pipeline.eval_sources(cfg.data.eval_paths)
  assert list(sets) == ["c4_valid", "wikitext103", "pile", "curation", "lambada",
                        _c4.LAMBADA_LM_NAME]
  for name, rel in ALL_LOCAL.items():
    assert sets[name].source == os.path.join(str(tmp_path), rel) and sets[name].kind == "files"
  assert sets[_c4.LAMBADA_LM_NAME].source == sets["lambada"].source
  assert evaluate.task_of("lambada") == "lambada"
  assert evaluate.task_of(_c4.LAMBADA_LM_NAME) == "lm"  # the same passages, plain perplexity
  assert {evaluate.task_of(n) for n in sets if n != "lambada"} == {"lm"}
  validate_config(cfg, num_devices=1)  # the local files are checked, and exist
  sweep = isoflop_paper.get_config()  # the sweep evaluates every run on the same sets
  assert sweep.overrides["data"]["eval_paths"] == cfg.data.eval_paths


@pytest.mark.parametrize("present", [(), ("pile",), ("lambada",), ("wikitext103", "curation")])
def test_local_eval_sets_appear_exactly_when_present(tmp_path, monkeypatch, present):
  for name in present:
    _write(tmp_path, ALL_LOCAL[name])
  _write(tmp_path, "unrelated/valid.jsonl")
  names = list(pipeline.eval_sources(
      _c4_config("dense", "2e19", monkeypatch, eval_data=tmp_path).data.eval_paths))
  expected = ["c4_valid"] + [n for n in ALL_LOCAL if n in present]
  if "lambada" in present:
    expected.append(_c4.LAMBADA_LM_NAME)
  assert names == expected


def test_eval_data_env_not_a_directory_adds_nothing(tmp_path, monkeypatch):
  for value in ("", str(tmp_path / "missing"), _write(tmp_path, "a_file.txt", "x\n")):
    assert _c4_config("pkm", "6e18", monkeypatch, eval_data=value).data.eval_paths == \
        _c4.C4_VALID


def test_first_existing_candidate_is_used(tmp_path, monkeypatch):
  _write(tmp_path, "pile/val.jsonl.zst", "")
  _write(tmp_path, "wikitext-103-raw/wiki.valid.raw", " = Title = \n")
  monkeypatch.setenv(_c4.EVAL_DATA_ENV, str(tmp_path))
  sets = pipeline.eval_sources(_c4.eval_paths())
  assert sets["pile"].source.endswith("pile/val.jsonl.zst")
  _write(tmp_path, "pile/val.jsonl")
  _write(tmp_path, "wikitext-103/valid.jsonl")
  sets = pipeline.eval_sources(_c4.eval_paths())
  assert sets["pile"].source.endswith("pile/val.jsonl")
  assert sets["wikitext103"].source.endswith("wikitext-103/valid.jsonl")


def test_eval_data_path_the_spec_cannot_hold_is_refused(tmp_path):
  bad = tmp_path / "a,b"
  bad.mkdir()
  with pytest.raises(ValueError, match=_c4.EVAL_DATA_ENV):
    _c4.eval_paths({_c4.EVAL_DATA_ENV: str(bad)})
