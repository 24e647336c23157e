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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _MAX_NEW.value < 1:
    print("error: --max_new_tokens must be >= 1", file=sys.stderr)
    return 2
  if _TEMPERATURE.value < 0 or not 0 < _TOP_P.value <= 1:
    print("error: --temperature must be >= 0 and --top_p in (0, 1]", file=sys.stderr)
    return 2
  from peer_jax.checkpoint import CheckpointError, load_run
  from peer_jax.data import DataError, Tokenizer
  from peer_jax.sampling import cut_at_eos, generate
  try:
    cfg, trainer, state = load_run(_WORKDIR.value, _STEP.value)
    tokenizer = Tokenizer(cfg.data.tokenizer, add_bos=cfg.data.add_bos, add_eos=False)
  except (CheckpointError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for i, prompt in enumerate(_PROMPT.value):
    ids = tokenizer.encode(prompt)
    out = generate(trainer.graphdef, (state.params, state.model_state), [ids], _MAX_NEW.value,
                   temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value + i)
    continuation = cut_at_eos([int(t) for t in out[0]], tokenizer.eos_id)
    # Decoding prompt and continuation together keeps SentencePiece's word boundaries.
    print(tokenizer.decode([t for t in ids if t != tokenizer.bos_id] + continuation), flush=True)
  return 0


if __name__ == "__main__":
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
