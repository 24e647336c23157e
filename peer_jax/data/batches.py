"""The batch layout shared by training and evaluation: each host's share of the global
batch (its lanes), packed rows -> model batches, and local batches -> global arrays."""

import jax
import numpy as np

from peer_jax.data.sources import DataError

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask")


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(index, count) of this host's share; defaults to (jax.process_index(), process_count())."""
  count = jax.process_count() if shard_count is None else int(shard_count)
  index = jax.process_index() if shard_index is None else int(shard_index)
  if count < 1 or not 0 <= index < count:
    raise DataError(f"shard_index {index} is not in [0, shard_count={count})")
  return index, count


def local_batch(batch_size: int, shard_count: int) -> int:
  if batch_size < 1 or batch_size % shard_count:
    raise DataError(f"train.batch_size {batch_size} is not divisible by {shard_count} "
                    f"processes (data shards)")
  return batch_size // shard_count


def lane_range(batch_size: int, shard_index: int, shard_count: int) -> range:
  """The lanes (rows of the global batch) process `shard_index` of `shard_count` computes."""
  local = local_batch(batch_size, shard_count)
  return range(shard_index * local, (shard_index + 1) * local)


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows of seq_len+1 tokens -> inputs, targets, positions, segments, loss mask.

  A target counts only when it continues the input's document (same segment, not
  padding): the first token of the next document is not predicted from the last one.
  """
  tokens, segs, pos = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
  mask = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] > 0)
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "positions": pos[:, :-1].astype(np.int32),
      "segment_ids": segs[:, :-1].astype(np.int32),
      "mask": mask.astype(np.float32),
  }


def global_batch(local: dict[str, np.ndarray], sharding_for) -> dict[str, jax.Array]:
  """Assemble per-process batches into global arrays (`sharding_for(ndim)` gives sharding)."""
  return {k: jax.make_array_from_process_local_data(sharding_for(v.ndim), v)
          for k, v in local.items()}
