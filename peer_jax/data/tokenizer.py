"""SentencePiece tokenizer with explicit BOS/EOS handling.

Documents are encoded as [BOS] pieces [EOS] (each optional, `data.add_bos`/`data.add_eos`):
BOS gives the first real token a context to be predicted from, EOS lets the model learn
where documents end.
"""

import sentencepiece as spm


class Tokenizer:

  def __init__(self, model_path: str, add_bos: bool = True, add_eos: bool = True):
    with open(model_path, "rb") as f:  # open() so that a bad path names the file
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())
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

  def encode(self, text: str) -> list[int]:
    ids = self._sp.encode(text)
    if self.add_bos and self.bos_id >= 0:
      ids = [self.bos_id] + ids
    if self.add_eos and self.eos_id >= 0:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])
