"""isoFLOP sweeps, the config half: reading the base run config, applying flat overrides and
a sweep's `smoke` form, the sweep's own small tokenizer, and portable config values.

Shared by the planner (sweep_plan.py) and the summaries (sweep_collect.py); depends on no
other sweep module.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(ValueError):
  """A bad sweep config or sweep directory; str() is one line."""


def load_config_file(path: str):
  """get_config() of a Python config file (path absolute or relative to the repository)."""
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(full):
    raise SweepError(f"base: config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_sweep_base_{abs(hash(full))}", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def flat_keys(d, prefix: str = "") -> dict[str, Any]:
  """Nested dicts/ConfigDicts -> {'a.b.c': value} (config override keys)."""
  out = {}
  for key, value in (d or {}).items():
    if hasattr(value, "items"):
      out.update(flat_keys(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


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


def apply_smoke(sweep):
  """The sweep config with its `smoke` overrides (nested like the sweep config) applied."""
  smoke = sweep.get("smoke")
  if not smoke:
    raise SweepError("smoke: this sweep config has no smoke form (add a 'smoke' section)")
  out = copy.deepcopy(sweep)
  with out.unlocked():
    for key, value in flat_keys(smoke).items():
      *parents, leaf = key.split(".")
      node = out
      for i, part in enumerate(parents):
        if part not in node:
          if parents[0] not in ("overrides", "arch_overrides") or i == 0:
            raise SweepError(f"smoke: {key}: not a key of the sweep config")
          node[part] = {}  # free-form override sections may grow
        node = node[part]
      if leaf not in node and parents[:1] not in (["overrides"], ["arch_overrides"]):
        raise SweepError(f"smoke: {key}: not a key of the sweep config")
      node[leaf] = value
  return out


def need(sweep, key: str):
  if key not in sweep:
    raise SweepError(f"{key}: missing from the sweep config")
  return sweep[key]


def portable(value):
  """Machine-specific paths made portable: the data directory -> $DATA, a sweep tokenizer ->
  its file name."""
  if isinstance(value, str):
    from configs.base import SHARED_DATA
    value = value.replace(os.path.normpath(SHARED_DATA), "$DATA")
    if "/tokenizer/spm_" in value:  # its file name holds a digest of the local data path
      value = "$WORKDIR/tokenizer/" + re.sub(r"^(spm_\d+)_[0-9a-f]+", r"\1",
                                             os.path.basename(value))
  return value




def tokenizer_settings(sweep, base, workdir: str | None) -> dict[str, Any]:
  """Overrides that point every run at the sweep's own small tokenizer ({} if none)."""
  tok = sweep.get("tokenizer") or {}
  vocab = tok.get("vocab_size", 0)
  if not vocab:
    return {}
  from peer_jax.small_tokenizer import tokenizer_path
  train_path = tok.get("train_path") or base.data.train_path
  path = tokenizer_path(workdir or os.path.join(REPO, "runs", "_sweep"), train_path, vocab)
  return {"data.tokenizer": path, "model.vocab_size": vocab}


def ensure_sweep_tokenizer(sweep, base, workdir: str, log=print) -> str | None:
  """Train (once) and return the sweep's small tokenizer, or None when it uses the base one."""
  tok = sweep.get("tokenizer") or {}
  if not tok.get("vocab_size"):
    return None
  from peer_jax.small_tokenizer import ensure_tokenizer
  return ensure_tokenizer(workdir, tok.get("train_path") or base.data.train_path,
                          tok.vocab_size, log=log)
