"""isoFLOP sweeps, the collecting half: a run directory's status and final eval, the small
committed summary of a finished run (with the digest of the plan it belongs to), reading
and writing summaries and plan files."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from peer_jax.sweep_config import REPO, SweepError
from peer_jax.sweep_config import portable as _portable
from peer_jax.sweep_plan import Run

SUMMARY_VERSION = 1


# ----------------------------------------------------------------------------- run status


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def final_eval(records: list[dict], steps: int) -> dict[str, float] | None:
  """The eval metrics logged at `steps` (the final step), or None if not there yet."""
  for r in reversed(records):
    if r.get("step") == steps and any(k.startswith("eval/") for k in r):
      return {k: v for k, v in r.items() if k.startswith("eval/")}
  return None


def run_status(run_dir: str, steps: int) -> tuple[str, int]:
  """('done' | 'partial' | 'missing', last logged step) of a run directory."""
  records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  if final_eval(records, steps) is not None:
    return "done", steps
  if records or os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return "partial", max((r.get("step", 0) for r in records), default=0)
  return "missing", 0


# ----------------------------------------------------------------------------- summaries


# Logging and input threading: they do not change what a run trains or its result.
_NOT_DIGESTED = ("train.log_every", "train.eval_every", "train.expert_stats", "data.prefetch",
                 "data.num_threads")


def _unused_kind_sections(model: dict) -> set[str]:
  """Config sections of kinds that declare their own defaults (configs/base.py adds them
  to every config) other than the run's `model.ffw`: they cannot change the run, and
  leaving them out keeps a new kind from turning every earlier summary into "another
  plan's"."""
  from peer_jax import kinds
  ffw = model.get("ffw")
  return {k.section for k in kinds.all_kinds()
          if k.defaults is not None and k.section and k.name != ffw}


def plan_digest(run: Run) -> str:
  """A digest of the model, train and data settings the run trains with (the base config's
  included; paths made portable; logging and input-pipeline threading left out): a summary
  whose digest differs was made by another plan or another base config, and is not a
  result of this one."""
  if run.resolved:
    keys = {"seed": run.resolved["seed"]}
    unused = _unused_kind_sections(run.resolved["model"])
    for section in ("model", "train", "data"):
      keys.update({f"{section}.{k}": v for k, v in run.resolved[section].items()
                   if f"{section}.{k}" not in _NOT_DIGESTED
                   and not (section == "model" and k.split(".")[0] in unused)})
  else:
    keys = {k: _portable(v) for k, v in run.overrides.items()
            if k not in _NOT_DIGESTED and not k.startswith("checkpoint.")}
  return hashlib.sha1(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def split_eval(ev: dict[str, float]) -> tuple[dict, dict]:
  """{'eval/SET/loss': ..} -> ({SET: {loss, ppl, bpb, tokens}}, {SET: {BLOCK: {usage, ..}}})."""
  evals, experts = {}, {}
  for key, value in ev.items():
    _, set_name, metric = key.split("/", 2)
    if metric.startswith("experts/"):
      _, block, stat = metric.split("/", 2)
      experts.setdefault(set_name, {}).setdefault(block, {})[stat] = value
    else:
      evals.setdefault(set_name, {})[metric] = value
  return evals, experts


def make_summary(run: Run, run_dir: str, base: str) -> dict[str, Any] | None:
  """The small committed record of a finished run (None if it has not finished)."""
  records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  ev = final_eval(records, run.steps)
  if ev is None:
    return None
  evals, experts = split_eval(ev)
  last = next(r for r in reversed(records) if r.get("step") == run.steps)
  train = {k.split("/", 1)[1]: v for k, v in last.items()
           if k in ("train/loss", "train/tokens_per_sec")}
  rec = {k: v for k, v in run.plan_record().items() if k not in ("overrides", "provisional")}
  rec.update({
      "summary_version": SUMMARY_VERSION, "plan_digest": plan_digest(run),
      "config": {"base": base, "overrides": {k: _portable(v) for k, v in run.overrides.items()},
                 "resolved": run.resolved},
      "eval": evals, "experts": experts, "train": train,
  })
  return rec


def summary_path(results_dir: str, name: str) -> str:
  return os.path.join(results_dir, "runs", f"{name}.json")


def write_summary(results_dir: str, summary: dict) -> str:
  path = summary_path(results_dir, summary["name"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(path + ".tmp", path)
  return path


def read_summaries(results_dir: str) -> dict[str, dict]:
  """{name: summary} of every results_dir/runs/*.json (a damaged file raises SweepError)."""
  out = {}
  folder = os.path.join(results_dir, "runs")
  if not os.path.isdir(folder):
    return out
  for fn in sorted(os.listdir(folder)):
    if not fn.endswith(".json"):
      continue
    try:
      with open(os.path.join(folder, fn)) as f:
        rec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise SweepError(f"results_dir: damaged summary {os.path.join(folder, fn)} ({e})") \
          from None
    out[rec.get("name", fn[:-5])] = rec
  return out


def summary_matches(summary: dict | None, run: Run) -> bool:
  return bool(summary) and summary.get("plan_digest") == plan_digest(run)


def results_dir_of(sweep, workdir: str | None, override: str | None = None) -> str:
  """--results_dir, else the config's results_dir (relative to the repository), else
  WORKDIR/results."""
  if override:
    return os.path.abspath(override)
  if sweep.get("results_dir"):
    rd = sweep.results_dir
    return rd if os.path.isabs(rd) else os.path.join(REPO, rd)
  if not workdir:
    raise SweepError("results_dir: not set in the sweep config; give --results_dir or --workdir")
  return os.path.join(os.path.abspath(workdir), "results")


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(path + ".tmp", path)
