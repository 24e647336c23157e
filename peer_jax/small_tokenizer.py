"""A small SentencePiece tokenizer made on first use and cached in an experiment's workdir.

CPU-scale experiments (ablations, the isoFLOP reproduction) train models of a few million
parameters. With the bundled 32k-piece C4 tokenizer the (un)embedding would hold most of
their parameters and FLOPs, and the comparison of FFW layers would drown in it. A 4k–8k
piece model trained on the training split keeps the non-embedding parameters in charge.

    path = ensure_tokenizer(workdir, train_path, vocab_size=8192)

The model is written under `workdir/tokenizer/` once (atomically: a half-written model
is never picked up) and reused by every later run and every resume; the training input
and vocabulary size are part of its file name, so a different choice makes a new one.
"""

import hashlib
import os
import tempfile

from peer_jax.data.tokenizer import Tokenizer, train_tokenizer


def tokenizer_path(workdir: str, train_path: str, vocab_size: int) -> str:
  digest = hashlib.sha1(os.path.abspath(train_path).encode()).hexdigest()[:8]
  return os.path.join(os.path.abspath(workdir), "tokenizer",
                      f"spm_{vocab_size}_{digest}.model")


def ensure_tokenizer(workdir: str, train_path: str, vocab_size: int = 8192,
                     log=print) -> str:
  """Path of the cached tokenizer for (train_path, vocab_size), training it if absent."""
  path = tokenizer_path(workdir, train_path, vocab_size)
  if os.path.exists(path):
    Tokenizer(path)  # a damaged cache fails here, naming the file
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  log(f"training a {vocab_size}-piece tokenizer on {train_path} (once; cached as {path})")
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
    # Unigram on one sentence sample: deterministic for a given input and size.
    made = train_tokenizer([train_path], os.path.join(tmp, "spm"), vocab_size,
                           input_sentence_size=200_000, num_threads=1,
                           extra_options={"seed_sentencepiece_size": 200_000})
    os.replace(made, path)
  return path
