"""Config checks shared by config_validation and the kinds' `validate` (one line per error).

Each raises ConfigError whose str() starts with the key.
"""

import math


class ConfigError(ValueError):
  """An impossible config value; str() is one line starting with the key."""


def fail(key: str, msg: str):
  raise ConfigError(f"{key}: {msg}")


def get(cfg, key: str):
  node = cfg
  for part in key.split("."):
    if part not in node:
      fail(key, "missing from the config (start configs from configs/base.py)")
    node = node[part]
  return node


def positive_int(cfg, key: str, allow_zero: bool = False):
  value = get(cfg, key)
  low = 0 if allow_zero else 1
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    fail(key, f"must be an integer >= {low}, got {value!r}")
  return value


def positive_float(cfg, key: str, allow_zero: bool = False):
  value = get(cfg, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value < 0 or (value == 0 and not allow_zero):
    fail(key, f"must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
  return value


def choice(cfg, key: str, choices):
  value = get(cfg, key)
  if value not in choices:
    fail(key, f"unknown value {value!r}; expected one of {', '.join(map(str, choices))}")
  return value


def square_root(cfg, key: str) -> int:
  """√N of a product-key table size N (the one perfect-square check, layers.peer.exact_sqrt)."""
  from peer_jax.layers.peer import exact_sqrt
  n_sq = positive_int(cfg, key)
  try:
    return exact_sqrt(n_sq, key)
  except ValueError:
    fail(key, f"{n_sq} is not a perfect square (product keys need N = n*n)")


def product_keys(cfg, prefix: str, rows_key: str, dim_key: str) -> int:
  """The checks every product-key kind shares: N square, heads, 1 <= top_k <= √N, even dim."""
  n = square_root(cfg, f"{prefix}.{rows_key}")
  positive_int(cfg, f"{prefix}.heads")
  k = positive_int(cfg, f"{prefix}.top_k")
  if k > n:
    fail(f"{prefix}.top_k", f"{k} exceeds sqrt({prefix}.{rows_key})={n}")
  qd = positive_int(cfg, f"{prefix}.{dim_key}")
  if qd % 2:
    fail(f"{prefix}.{dim_key}", f"must be even (two product-key halves), got {qd}")
  return n


def kernel(cfg, key: str):
  """key (e.g. model.peer.kernel), when present, names a known kernel."""
  from peer_jax.ops.kernels import KERNELS
  section, leaf = key.rsplit(".", 1)
  if leaf in get(cfg, section):
    choice(cfg, key, KERNELS)
