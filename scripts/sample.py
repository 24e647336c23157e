#!/usr/bin/env python
"""Generate text from a trained run's checkpoint.

  python scripts/sample.py --workdir=runs/default --prompt="The history of" \\
      [--max_new_tokens=64] [--temperature=0.8] [--top_p=0.9] [--seed=0] [--step=N]

Temperature 0 (the default) is greedy decoding. The continuation stops at the tokenizer's
end-of-document token.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (holds config.json and checkpoints/).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for several.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; higher = more random.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "prompt"])


class UsageError(ValueError):
  """A bad flag: `error: command line: --FLAG: ...`, exit 2."""


def check_flags() -> None:
  """Flag values that cannot work, named by their flag, before anything is loaded."""
  import math
  if _MAX_NEW.value < 1:
    raise UsageError(f"--max_new_tokens: must be >= 1, got {_MAX_NEW.value}")
  t = _TEMPERATURE.value
  if not math.isfinite(t) or t < 0:
    raise UsageError(f"--temperature: must be a finite number >= 0 (0: greedy), got {t}")
  p = _TOP_P.value
  if not math.isfinite(p) or not 0 < p <= 1:
    raise UsageError(f"--top_p: must be in (0, 1] (1: off), got {p}")
  if _STEP.value is not None and _STEP.value < 0:
    raise UsageError(f"--step: must be a checkpoint step >= 0, got {_STEP.value}")
  if not 0 <= _SEED.value < 2**32:
    raise UsageError(f"--seed: must be in [0, 2**32), got {_SEED.value}")
  if not _WORKDIR.value:
    raise UsageError("--workdir: must name a run's workdir")


def check_fits(cfg, prompt_ids: list[list[int]], max_new: int) -> None:
  """Refuse a --max_new_tokens whose KV cache cannot fit in this machine's memory."""
  length = max(len(ids) for ids in prompt_ids) + max_new
  itemsize = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
  cache_bytes = cfg.model.num_layers * 2 * length * cfg.model.d_model * itemsize
  try:
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    free = None
  if length >= 2**31 or (free is not None and cache_bytes > free // 2):
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    raise UsageError(
        f"--max_new_tokens: {max_new} new tokens after a {length - max_new}-token prompt need "
        f"a KV cache of {gib(cache_bytes)} (model.num_layers x 2 x model.d_model x length)"
        + (f", more than half of the {gib(free)} free here" if free is not None else "")
        + "; ask for fewer")


def sample() -> None:
  check_flags()
  from peer_jax.data import Tokenizer
  from peer_jax.run import DATA_PARALLEL, load_run
  from peer_jax.sampling import cut_at_eos, generate
  # Parameters only (no optimizer state), read-only, on all of this host's devices.
  run = load_run(_WORKDIR.value, _STEP.value, mesh=DATA_PARALLEL)
  cfg, state = run.cfg, run.state
  tokenizer = Tokenizer(cfg.data.tokenizer, add_bos=cfg.data.add_bos, add_eos=False)
  prompts = [tokenizer.encode(prompt) for prompt in _PROMPT.value]
  for n, ids in enumerate(prompts):
    if not ids:
      raise UsageError(f"--prompt: prompt {n + 1} is empty (no tokens); give some text")
  check_fits(cfg, prompts, _MAX_NEW.value)
  for i, ids in enumerate(prompts):
    out = generate(run.model.graphdef, (state.params, state.model_state), [ids], _MAX_NEW.value,
                   temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value + i)
    continuation = cut_at_eos([int(t) for t in out[0]], tokenizer.eos_id)
    # Decoding prompt and continuation together keeps SentencePiece's word boundaries.
    print(tokenizer.decode([t for t in ids if t != tokenizer.bos_id] + continuation), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  from peer_jax.cli import exit_now, run_or_explain
  code = run_or_explain(sample, usage_errors=(UsageError,))
  if code:
    exit_now(code)
  return code


if __name__ == "__main__":
  from peer_jax.cli import run_main
  run_main(main)
