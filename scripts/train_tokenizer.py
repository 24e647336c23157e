#!/usr/bin/env python
"""Train a SentencePiece tokenizer on local text / JSON-lines files.

  python scripts/train_tokenizer.py --input=../shared/data/tiny_shakespeare/input.txt \\
      --vocab_size=8000 --output=tokenizers/shakespeare_8k

writes PREFIX.model and PREFIX.vocab; train with --config.data.tokenizer=PREFIX.model and
--config.model.vocab_size=8000 (at least the number of pieces). Ids: 0 <unk>, 1 <s> (BOS),
2 </s> (EOS), no pad piece (like the bundled C4 32k model). Inputs may be .txt, .jsonl/.json
(`text` field), optionally .gz/.zst; documents are split on newlines into sentences.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

_INPUT = flags.DEFINE_multi_string("input", None, "Training text files or globs.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Number of pieces.")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model, PREFIX.vocab.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe", "char", "word"],
                                "SentencePiece model type.")
_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995, "Fraction of characters covered.")
_SENTENCES = flags.DEFINE_integer("input_sentence_size", 1_000_000,
                                  "Sample at most this many sentences (lines) for training.")
_FORMAT = flags.DEFINE_enum("text_format", "lines", ["lines", "paragraphs", "jsonl"],
                            "Documents of .txt files (.jsonl/.json are always JSON lines).")
flags.mark_flags_as_required(["input", "output"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from peer_jax.data.sources import DataError
  from peer_jax.data.tokenizer import Tokenizer, train_tokenizer
  t0 = time.time()
  try:
    path = train_tokenizer(_INPUT.value, _OUTPUT.value, _VOCAB.value,
                           model_type=_MODEL_TYPE.value, character_coverage=_COVERAGE.value,
                           input_sentence_size=_SENTENCES.value, text_format=_FORMAT.value)
    tok = Tokenizer(path)
  except DataError as e:
    print(f"error: data: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path} ({tok.vocab_size} pieces, bos={tok.bos_id}, eos={tok.eos_id}) in "
        f"{time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
