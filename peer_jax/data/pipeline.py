"""grain pipeline: shuffle documents, tokenize, pack into fixed-length rows, batch.

Packing concatenates documents and splits at `seq_len + 1` tokens, carrying the remainder
into the next row, so no token is dropped between batches. Each row comes with segment
ids and positions, so attention never crosses documents and RoPE restarts per document.
The iterator's position is a small dict (`get_state`/`set_state`) that a checkpoint saves.
"""

from typing import Iterator

import grain
import jax
import numpy as np

from peer_jax.data.text import read_documents
from peer_jax.data.tokenizer import Tokenizer


def _packed_dataset(docs: list[str], tokenizer: Tokenizer, seq_len: int, *, seed: int,
                    shuffle: bool, repeat: bool) -> grain.IterDataset:
  ds = grain.MapDataset.source(docs)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # a fresh permutation every epoch when repeated
  if repeat:
    ds = ds.repeat()
  ds = ds.map(lambda text: {"tokens": np.asarray(tokenizer.encode(text), np.int32)})
  return grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": seq_len + 1})


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows of seq_len+1 tokens -> inputs, targets, positions, segments, loss mask.

  A target counts only when it continues the input's document (same segment, not
  padding): the first token of the next document is not predicted from the last one.
  """
  tokens, segs, pos = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
  mask = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] > 0)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "positions": pos[:, :-1].astype(np.int32),
      "segment_ids": segs[:, :-1].astype(np.int32),
      "mask": mask.astype(np.float32),
  }


class TextDataIterator:
  """Endless stream of global batches {inputs, targets, positions, segment_ids, mask}.

  Each process reads its own 1/process_count share of every batch; `global_batch`
  turns a local batch into one jax.Array sharded over the mesh.
  """

  def __init__(self, path: str, text_format: str, tokenizer: Tokenizer, *, batch_size: int,
               seq_len: int, seed: int, shuffle: bool = True, repeat: bool = True):
    nproc, pid = jax.process_count(), jax.process_index()
    if batch_size % nproc:
      raise ValueError(f"train.batch_size {batch_size} is not divisible by {nproc} processes")
    docs = read_documents(path, text_format)
    if not docs:
      raise ValueError(f"{path}: no documents found (data.text_format={text_format!r})")
    # Shard documents across processes so every host reads a disjoint share.
    docs = docs[pid::nproc]
    self.local_batch_size = batch_size // nproc
    self._dataset = _packed_dataset(docs, tokenizer, seq_len, seed=seed, shuffle=shuffle,
                                    repeat=repeat).batch(self.local_batch_size,
                                                         drop_remainder=True)
    self._it = iter(self._dataset)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return to_model_batch(next(self._it))

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)


def global_batch(local: dict[str, np.ndarray], sharding_for) -> dict[str, jax.Array]:
  """Assemble per-process batches into global arrays (`sharding_for(ndim)` gives sharding)."""
  return {k: jax.make_array_from_process_local_data(sharding_for(v.ndim), v)
          for k, v in local.items()}
