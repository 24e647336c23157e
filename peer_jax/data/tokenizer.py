"""SentencePiece tokenizer with explicit BOS/EOS handling, and tokenizer training.

Documents are encoded as [BOS] pieces [EOS] (each optional, `data.add_bos`/`data.add_eos`):
BOS gives the first real token a context to be predicted from, EOS lets the model learn
where documents end. A model without a BOS (or EOS) piece (id -1) simply gets none.
"""

import os

import sentencepiece as spm

from peer_jax.data.sources import DataError


class Tokenizer:

  def __init__(self, model_path: str, add_bos: bool = True, add_eos: bool = True):
    try:
      with open(model_path, "rb") as f:  # open() so that a bad path names the file
        proto = f.read()
    except OSError as e:
      raise DataError(f"data.tokenizer: cannot read {model_path} ({e.strerror or e})") from None
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError, TypeError) as e:
      raise DataError(f"data.tokenizer: {model_path} is not a SentencePiece model "
                      f"(train one with scripts/train_tokenizer.py)") from None
    if self._sp.get_piece_size() == 0:
      raise DataError(f"data.tokenizer: {model_path} is a SentencePiece model without pieces")
    self.path = model_path
    self.add_bos, self.add_eos = add_bos, add_eos

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  def encode(self, text: str) -> list[int]:
    ids = self._sp.encode(text)
    if self.add_bos and self.bos_id >= 0:
      ids = [self.bos_id] + ids
    if self.add_eos and self.eos_id >= 0:
      ids = ids + [self.eos_id]
    return ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def train_tokenizer(input_paths: list[str], output_prefix: str, vocab_size: int, *,
                    model_type: str = "unigram", character_coverage: float = 0.9995,
                    input_sentence_size: int = 1_000_000, text_format: str = "lines",
                    num_threads: int = os.cpu_count() or 1, extra_options: dict | None = None,
                    ) -> str:
  """Train a SentencePiece model on local text/jsonl files; returns PREFIX.model.

  Ids as in the bundled C4 32k model: 0 = <unk>, 1 = <s> (BOS), 2 = </s> (EOS), no pad
  piece (packing marks padding with segment id 0, not with a token).
  Documents are streamed from `sources.iter_file_documents`, so .jsonl/.gz/.zst inputs
  work and bad input raises the same `DataError` as training does.
  """
  from peer_jax.data.sources import expand_files, iter_file_documents

  files = [f for p in input_paths for f in expand_files(p)]

  def sentences():
    for path in files:
      for doc in iter_file_documents(path, text_format):
        # SentencePiece sees one "sentence" per line; long documents are split on newlines.
        for line in doc.split("\n"):
          if line.strip():
            yield line

  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  options = dict(
      model_prefix=output_prefix, vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage, input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True, num_threads=num_threads, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, max_sentence_length=1 << 16, minloglevel=2)
  options.update(extra_options or {})
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=sentences(), **options)
  except RuntimeError as e:
    raise DataError(f"SentencePiece training on {', '.join(files)} failed: {e}") from None
  return output_prefix + ".model"
