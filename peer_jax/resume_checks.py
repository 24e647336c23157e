"""What may change between a checkpoint and the config that resumes it (pure functions).

Every config key is in one of three groups (`key_group`): frozen (refused on resume),
optimizer-structure keys (applied while the optimizer state keeps its structure) and
applied. `tree_differences` compares the saved state's tree with the one the current
config builds; `structure_message` names the config change behind a difference.
peer_jax.checkpoint re-exports these names.
"""

import json
from typing import Any

import jax

# Keys whose change makes a checkpoint mean something else: refused on resume.
FROZEN_PREFIXES = ("model.", "seed", "data.train_path", "data.tokenizer", "data.text_format",
                   "train.batch_size", "train.seq_len", "data.add_bos", "data.add_eos")
# Keys that can change the optimizer-state pytree (a table branch, clipping, decay masks):
# applied when the state keeps its structure, refused (naming them) when it does not. Any
# new `train.table_*` key is in this group by its prefix.
OPTIMIZER_STRUCTURE_PREFIXES = ("train.table_", "train.grad_clip", "train.weight_decay",
                                "train.optimizer")


def flatten_config(node, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in node.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value))  # tuples -> lists, as saved
  return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every key that differs.

  A key the saved config does not have (added to configs/base.py since) counts as changed
  only if its value is not the default; a key the current config no longer has (removed
  from the code) is not a change: it no longer means anything.
  """
  a, b = flatten_config(saved), flatten_config(current)
  defaults = _base_defaults()
  out = []
  for k in sorted(set(a) | set(b)):
    if k not in b:
      continue
    if k not in a and k in defaults and defaults[k] == b[k]:
      continue
    if a.get(k) != b.get(k):
      out.append((k, a.get(k), b.get(k)))
  return out


def _base_defaults() -> dict[str, Any]:
  """Flat defaults of configs/base.py, when it can be imported (scripts and tests can)."""
  try:
    from configs import base
    return flatten_config(json.loads(base.get_config().to_json_best_effort()))
  except Exception:  # noqa: BLE001  (no configs package on the path: compare as is)
    return {}


def _matches(key: str, prefixes) -> bool:
  """`key` is one of `prefixes`, or below one: 'model.' and 'train.table_' match by prefix,
  'seed' matches 'seed' and 'seed.*' only."""
  return any(key.startswith(p) if p.endswith((".", "_")) else (key == p or key.startswith(p + "."))
             for p in prefixes)


def key_group(key: str) -> str:
  """'frozen', 'optimizer' (may change the optimizer-state structure) or 'applied'."""
  if _matches(key, FROZEN_PREFIXES):
    return "frozen"
  if _matches(key, OPTIMIZER_STRUCTURE_PREFIXES):
    return "optimizer"
  return "applied"


def is_frozen(key: str) -> bool:
  return key_group(key) == "frozen"


def describe_changes(changes) -> str:
  return "; ".join(f"{k}: changed from {a!r} to {b!r}" for k, a, b in changes)


def _leaf_sig(leaf):
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  return (tuple(shape) if shape is not None else None,
          str(jax.numpy.dtype(dtype)) if dtype is not None else None)


def tree_differences(saved: dict[tuple, Any], current: dict[tuple, Any], *, only=None
                     ) -> list[str]:
  """Readable differences between two flat trees of arrays (missing, extra, shape, dtype)."""
  def keep(k):
    return only is None or (k and k[0] in only)
  name = lambda k: ".".join(str(p) for p in k)
  out = []
  for k in sorted(set(current) - set(saved), key=name):
    if keep(k) and _leaf_sig(current[k])[0] is not None:
      out.append(f"{name(k)}: in this model {_leaf_sig(current[k])[0]} but not in the checkpoint")
  for k in sorted(set(saved) - set(current), key=name):
    if keep(k) and _leaf_sig(saved[k])[0] is not None:
      out.append(f"{name(k)}: in the checkpoint {_leaf_sig(saved[k])[0]} but not in this model")
  for k in sorted(set(saved) & set(current), key=name):
    if not keep(k):
      continue
    (s_shape, s_dtype), (c_shape, c_dtype) = _leaf_sig(saved[k]), _leaf_sig(current[k])
    if s_shape is None or c_shape is None:
      continue
    if s_shape != c_shape:
      out.append(f"{name(k)}: shape {s_shape} in the checkpoint, {c_shape} in this model")
    elif s_dtype and c_dtype and s_dtype != c_dtype:
      out.append(f"{name(k)}: dtype {s_dtype} in the checkpoint, {c_dtype} in this model")
  return out



def structure_message(differences, saved_cfg, current_cfg, step, directory) -> str:
  changed = config_changes(saved_cfg, current_cfg) if current_cfg is not None else []
  suspects = [c for c in changed if key_group(c[0]) == "optimizer"] or \
      [c for c in changed if key_group(c[0]) != "applied"]
  what = "optimizer state" if all(d.startswith("opt_state") for d in differences) else "state"
  more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
  cause = (describe_changes(suspects) + "; with this change, " if suspects else
           "no config key that shapes it changed (was the code changed?), but ")
  return (f"{cause}the {what} saved in checkpoint {step} in {directory} does not match the "
          f"one this config builds ({differences[0]}{more}); change it back to resume, "
          "or start a new --workdir with checkpoint.init_from to keep the parameters")


