"""Eval batches: one source's documents, in file order, as finite deterministic batches.

`make_eval_iterator`: documents in file order, no shuffle, no repeat, no
document continued from one row into the next as in training. Each document is cut into
windows of `seq_len + 1` tokens overlapping by one token, so every token but the
document's first is a target exactly once; windows are placed whole, each as its own
segment, into rows filled first-fit in order, then padded. The last batch is padded with
empty rows (mask 0), so all data counts and every host yields the same number of batches.
"""

from typing import Iterator, Sequence

import numpy as np

from peer_jax.data import sources as sources_lib
from peer_jax.data.batches import local_batch, resolve_shard, to_model_batch
from peer_jax.data.sources import SourceSpec
from peer_jax.data.sources import config_value as _cfg
from peer_jax.data.tokenizer import Tokenizer


def eval_windows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
  """Windows of <= seq_len+1 tokens overlapping by one: each token but the first is a target once."""
  n = len(tokens)
  if n < 2:
    return []
  return [tokens[s:s + seq_len + 1] for s in range(0, n - 1, seq_len)]


def eval_rows(docs, tokenizer: Tokenizer, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
  """Rows {tokens, tokens_segment_ids, tokens_positions} of seq_len+1, in document order."""
  width = seq_len + 1

  def new_row():
    return {"tokens": np.zeros(width, np.int32), "tokens_segment_ids": np.zeros(width, np.int32),
            "tokens_positions": np.zeros(width, np.int32)}

  row, used, seg = new_row(), 0, 0
  for text in docs:
    for window in eval_windows(np.asarray(tokenizer.encode(text), np.int32), seq_len):
      if used + len(window) > width:
        yield row
        row, used, seg = new_row(), 0, 0
      seg += 1
      row["tokens"][used:used + len(window)] = window
      row["tokens_segment_ids"][used:used + len(window)] = seg
      row["tokens_positions"][used:used + len(window)] = np.arange(len(window))
      used += len(window)
  if used:
    yield row


class EvalIterator:
  """Finite, deterministic local batches over one eval source (see module doc).

  Every host computes the same global sequence of rows and keeps its own slice of each
  global batch, so all hosts yield the same number of batches (the last one padded).
  """

  def __init__(self, docs: Sequence[str], tokenizer: Tokenizer, *, batch_size: int,
               seq_len: int, max_batches: int | None = None, shard_index: int | None = None,
               shard_count: int | None = None, name: str = "eval"):
    self.shard_index, self.shard_count = resolve_shard(shard_index, shard_count)
    self.local_batch_size = local_batch(batch_size, self.shard_count)
    self.batch_size, self.seq_len, self.max_batches = batch_size, seq_len, max_batches
    self._docs, self._tokenizer, self.name = docs, tokenizer, name

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    width = self.seq_len + 1
    empty = {"tokens": np.zeros(width, np.int32), "tokens_segment_ids": np.zeros(width, np.int32),
             "tokens_positions": np.zeros(width, np.int32)}
    lo = self.shard_index * self.local_batch_size
    rows = eval_rows(self._docs, self._tokenizer, self.seq_len)
    produced = 0
    while self.max_batches is None or produced < self.max_batches:
      batch = []
      for row in rows:
        batch.append(row)
        if len(batch) == self.batch_size:
          break
      if not batch:
        return
      batch += [empty] * (self.batch_size - len(batch))
      mine = batch[lo:lo + self.local_batch_size]
      yield to_model_batch({k: np.stack([r[k] for r in mine]) for k in empty})
      produced += 1


def make_eval_iterator(data_cfg, tokenizer: Tokenizer, source: str | SourceSpec, *,
                       batch_size: int, seq_len: int, max_batches: int | None = None,
                       shard_index: int | None = None, shard_count: int | None = None,
                       ) -> EvalIterator:
  """Eval batches of one source (a single-source spec; default split `validation`)."""
  spec = sources_lib.single_source(source)
  docs = sources_lib.open_source(spec, text_format=_cfg(data_cfg, "text_format", "lines"),
                                 tfds_data_dir=_cfg(data_cfg, "tfds_data_dir", "") or None,
                                 bad_records=_cfg(data_cfg, "bad_records", "error"))
  return EvalIterator(docs, tokenizer, batch_size=batch_size, seq_len=seq_len,
                      max_batches=max_batches, shard_index=shard_index,
                      shard_count=shard_count, name=spec.name)


def eval_sources(eval_paths: str) -> dict[str, SourceSpec]:
  """`data.eval_paths` ('name=SOURCE,name2=SOURCE2') -> {name: SourceSpec}."""
  if not str(eval_paths or "").strip():
    return {}
  return {s.name: s for s in sources_lib.parse_sources(eval_paths, default_split="validation")}
