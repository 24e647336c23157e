"""grain pipeline: documents -> lanes -> tokens -> packed rows -> batches.

Training (`make_train_iterator`) is organised in *lanes*: lane r produces row r of every
global batch (batch_size lanes in all), and process p of P computes lanes
[p B/P, (p+1) B/P), i.e. exactly its rows of the global batch. What a lane reads depends on
the seed and the sources only, never on the number of processes, so global batch b holds the
same records for 1, 2 or 64 processes, and a run can resume on another process count.

* A random-access source (local files read into memory, prepared ArrayRecord / TFDS
  datasets) is shuffled globally with the seed (a new permutation every epoch), repeated,
  and lane r takes elements r, r+B, r+2B, ... of that stream.
* A streaming source (`peer_jax/data/streaming.py`) is read sequentially: whole shards per
  lane (records split within a shard when there are fewer shards than lanes), the shard
  order shuffled per epoch, records mixed by a window shuffle of `data.shuffle_buffer`.
* Sources are mixed per lane by weight (`grain.IterDataset.mix`, weights are fractions of
  documents).

Each lane tokenizes its documents and packs them with `ConcatThenSplitIterDataset`:
documents are concatenated and split every `seq_len + 1` tokens, the remainder carried into
the lane's next row, so no token is dropped or repeated; each row carries segment ids and
positions, so attention never crosses documents and RoPE restarts per document piece. The
rows of a process's lanes are stacked into its local batch (in `data.num_threads` threads
when > 0); a background thread keeps `data.prefetch` batches ready. The iterator's position
is a small JSON dict (`get_state`/`set_state`, one entry per lane): after `set_state` the
stream continues exactly where it was. `merge_process_states` joins the states saved by
every process, so any process count can pick up its lanes.

Evaluation batches (`make_eval_iterator`, eval_batches.py) and the batch layout shared with
training (batches.py) are re-exported here.
"""

import atexit
import concurrent.futures
import dataclasses
import json
import weakref
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from peer_jax.data import sources as sources_lib
from peer_jax.data.batches import (BATCH_KEYS, global_batch, lane_range,  # noqa: F401
                                   local_batch, resolve_shard, to_model_batch)
from peer_jax.data.eval_batches import (EvalIterator, eval_rows, eval_sources,  # noqa: F401
                                        eval_windows, make_eval_iterator)
from peer_jax.data.sources import DataError, SourceSpec
from peer_jax.data.sources import config_value as _cfg
from peer_jax.data.streaming import StreamLaneDataset, StreamSource
from peer_jax.data.tokenizer import Tokenizer

STATE_FORMAT = "peer_jax.data/2"


# ----------------------------------------------------------------------------- helpers


def _seed32(seed: int, i: int) -> int:
  return (int(seed) * 1_000_003 + 7919 * i) % (2**32)


class _Tokenize:
  """str document -> {"tokens": int32 array}; picklable, so grain may run it anywhere."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(self.tokenizer.encode(text), np.int32)}


def _to_json(state):
  return json.loads(json.dumps(state))


def _from_json(state):
  """Undo JSON's tuple -> list for grain's packing state (its slices compare to tuples)."""
  if isinstance(state, dict):
    return {k: (({kk: tuple(vv) for kk, vv in v.items()} if k == "remainder_slices" else
                 _from_json(v))) for k, v in state.items()}
  if isinstance(state, list):
    return [_from_json(v) for v in state]
  return state


# ----------------------------------------------------------------------------- opening sources


@dataclasses.dataclass
class OpenedSource:
  spec: SourceSpec
  docs: Sequence[str]  # random access, str; or a StreamSource

  @property
  def streaming(self) -> bool:
    return isinstance(self.docs, StreamSource)

  def fingerprint(self) -> list:
    size = self.docs.fingerprint() if self.streaming else len(self.docs)
    return [self.spec.name, size, self.spec.weight]


def open_sources(spec: str | Sequence[SourceSpec], *, text_format: str = "lines",
                 tfds_data_dir: str | None = None, default_split: str = "train",
                 bad_records: str = "error") -> list[OpenedSource]:
  """Parse a source spec and open every source (reads local files into memory; lists the
  shards of streaming sources)."""
  specs = sources_lib.parse_sources(spec, default_split) if isinstance(spec, str) else spec
  return [OpenedSource(s, sources_lib.open_source(s, text_format=text_format,
                                                  tfds_data_dir=tfds_data_dir,
                                                  bad_records=bad_records))
          for s in specs]


def document_dataset(opened: Sequence[OpenedSource], *, seed: int, shuffle: bool,
                     shard_index: int, shard_count: int, num_epochs: int | None = None,
                     shuffle_buffer: int = 256) -> grain.IterDataset:
  """The documents (str) of lane `shard_index` of `shard_count`, mixed over the sources.

  A random-access source is shuffled globally (a new permutation every epoch), repeated,
  and the lane takes every `shard_count`-th element; a streaming source gives the lane its
  shards (see streaming.py). The lanes of one epoch are disjoint and cover every document.
  """
  parts = []
  for i, src in enumerate(opened):
    if src.streaming:
      ds = StreamLaneDataset(src.docs, lane=shard_index, num_lanes=shard_count, seed=seed,
                             shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                             num_epochs=num_epochs, source_index=i)
    else:
      ds = grain.MapDataset.source(src.docs)
      if shuffle:
        ds = ds.shuffle(seed=_seed32(seed, i))  # reseeded every epoch by repeat()
      ds = ds.repeat(num_epochs)[shard_index::shard_count].to_iter_dataset(
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # lanes read in turn
    parts.append(ds)
  if len(parts) == 1:
    return parts[0]
  return grain.IterDataset.mix(parts, weights=[s.spec.weight for s in opened])


# ----------------------------------------------------------------------------- lanes -> batches


_END = object()


def _next_or_end(it):
  try:
    return next(it)
  except StopIteration:
    return _END


class _LaneBatchIterator(grain.DatasetIterator):
  """Stacks one packed row of every lane into a model batch; state = every lane's state."""

  def __init__(self, parents, lanes: Sequence[int], num_threads: int):
    super().__init__(parents)
    self._lanes = [str(l) for l in lanes]
    self._pool = (concurrent.futures.ThreadPoolExecutor(min(num_threads, len(parents)),
                                                        thread_name_prefix="peer_jax-lanes")
                  if num_threads > 0 and len(parents) > 1 else None)

  def __next__(self):
    if self._pool is not None:
      rows = list(self._pool.map(_next_or_end, self._parents))
    else:
      rows = [_next_or_end(p) for p in self._parents]
    if any(r is _END for r in rows):
      raise StopIteration
    return to_model_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})

  def get_state(self) -> dict[str, Any]:
    return {"lanes": {l: p.get_state() for l, p in zip(self._lanes, self._parents)}}

  def set_state(self, state: dict[str, Any]) -> None:
    jobs = [(p, state["lanes"][l]) for l, p in zip(self._lanes, self._parents)]
    if self._pool is not None:  # lanes restore independently (re-reading their windows)
      list(self._pool.map(lambda job: job[0].set_state(job[1]), jobs))
    else:
      for parent, lane_state in jobs:
        parent.set_state(lane_state)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
    super().close()


class _LaneBatchDataset(grain.IterDataset):

  def __init__(self, parents: Sequence[grain.IterDataset], lanes: Sequence[int],
               num_threads: int):
    super().__init__(list(parents))
    self._lanes, self._num_threads = list(lanes), num_threads

  def __iter__(self):
    return _LaneBatchIterator([iter(p) for p in self._parents], self._lanes, self._num_threads)

  def __str__(self):
    return f"LaneBatchDataset(lanes={self._lanes[0]}..{self._lanes[-1]})"


# ----------------------------------------------------------------------------- training

# Iterators still alive at exit: their prefetch threads are stopped before the interpreter
# tears down modules (grain's own __del__ then prints tracebacks).
_LIVE: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  for it in list(_LIVE):
    it.close()
    it._it = None  # collected now, while grain's modules still exist
  import gc
  gc.collect()


_REFUSAL = None


def _refusal(message: str) -> DataError:
  """A saved state this pipeline will not resume from (another format, pipeline or lane
  layout): a DataError that is also a ConfigError, so a checkpoint restore takes it for a
  refusal to name, never for damage."""
  global _REFUSAL
  if _REFUSAL is None:
    from peer_jax.config_validation import ConfigError

    class DataStateRefused(DataError, ConfigError):
      """The saved data state belongs to another pipeline: refused, not damaged."""

    _REFUSAL = DataStateRefused
  return _REFUSAL(message)


def _sum_skipped(state) -> int:
  if isinstance(state, dict):
    own = state.get("skipped", 0) if isinstance(state.get("skipped", 0), int) else 0
    return own + sum(_sum_skipped(v) for k, v in state.items() if k != "skipped")
  if isinstance(state, list):
    return sum(_sum_skipped(v) for v in state)
  return 0


def _lane_span(lanes) -> str:
  lanes = sorted(int(l) for l in lanes)
  if not lanes:
    return "none"
  return f"{lanes[0]}..{lanes[-1]}" if lanes == list(range(lanes[0], lanes[-1] + 1)) else \
      ",".join(map(str, lanes))


class DataIterator:
  """Endless stream of local batches {inputs, targets, positions, segment_ids, mask}.

  Each batch is this host's (batch_size / shard_count, seq_len) share of the global batch
  (its lanes); `global_batch` turns it into jax.Arrays sharded over the mesh.
  """

  def __init__(self, dataset: grain.IterDataset, *, local_batch_size: int, seq_len: int,
               fingerprint: dict, lanes: Sequence[int] = (), shard: tuple[int, int] = (0, 1)):
    self.local_batch_size, self.seq_len = local_batch_size, seq_len
    self._fingerprint = _to_json(fingerprint)
    self.lanes = [int(l) for l in lanes]
    self.shard = tuple(shard)
    self._dataset = dataset
    self._it = iter(dataset)
    _LIVE.add(self)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    """The position after the last batch returned, as a JSON-serialisable dict."""
    return {"format": STATE_FORMAT, "fingerprint": self._fingerprint,
            "processes": self.shard[1], "lanes": _to_json(self._it.get_state())["lanes"]}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continue exactly after the batch at which `state` was taken.

    `state` is this process's own state or the merge of every process's states
    (`merge_process_states`), which lets a run resume on another number of processes.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      found = state.get("format") if isinstance(state, dict) else type(state).__name__
      hint = (f" ({state['message']})" if isinstance(state, dict) and state.get("message")
              else "")
      raise _refusal(f"not a peer_jax data iterator state of format {STATE_FORMAT!r} "
                     f"(found format {found!r}{hint}); it cannot resume exactly")
    saved = state["fingerprint"]
    if saved != self._fingerprint:
      diff = {k: (saved.get(k), self._fingerprint.get(k))
              for k in set(saved) | set(self._fingerprint) if saved.get(k) != self._fingerprint.get(k)}
      raise _refusal(f"the saved data iterator state belongs to a different pipeline "
                     f"(saved vs now: {diff}); it cannot resume exactly")
    lanes = state.get("lanes") or {}
    missing = [l for l in self.lanes if str(l) not in lanes]
    if missing:
      raise _refusal(
          f"the saved data iterator state holds rows {_lane_span(lanes)} of the global batch "
          f"(saved by {state.get('processes', '?')} processes); process {self.shard[0]} of "
          f"{self.shard[1]} now needs rows {_lane_span(self.lanes)}. A resume on another "
          f"process count needs every process's state (merge_process_states)")
    self._it.set_state(_from_json({"lanes": {str(l): lanes[str(l)] for l in self.lanes}}))

  def skipped_records(self) -> int:
    """Bad records skipped so far by this process's lanes (`data.bad_records=skip`), as of
    the last batch returned; 0 in the default `error` mode."""
    return _sum_skipped(self.get_state()["lanes"])

  def close(self) -> None:
    """Stop the prefetch thread; the iterator cannot be used afterwards."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def merge_process_states(saved: dict[str, Any] | None, process_index: int,
                         process_count: int) -> dict[str, Any] | None:
  """The state for process `process_index` of `process_count` from the states every process
  saved (`{"data_0": state_0, "data_1": ...}`, as peer_jax.checkpoint stores them).

  States of this format are joined (every lane of every process), so the process picks up
  its lanes whatever the process count was; other states are passed on as they are and
  `set_state` refuses them, naming both process counts when they differ.
  """
  if not saved:
    return None
  states = [v for k, v in sorted(saved.items()) if k.startswith("data_") and isinstance(v, dict)]
  mine = saved.get(f"data_{process_index}")
  if states and all(s.get("format") == STATE_FORMAT for s in states):
    lanes = {}
    for s in states:
      lanes.update(s.get("lanes") or {})
    base = mine if mine is not None else states[0]
    return {**base, "lanes": lanes, "processes": base.get("processes", len(states))}
  if mine is None or len(states) != process_count:
    return {"format": (mine or (states[0] if states else {})).get("format"),
            "message": f"saved by {len(states)} processes, now {process_count}"}
  return mine


def build_train_iterator(opened: Sequence[OpenedSource], tokenizer: Tokenizer, *,
                         batch_size: int, seq_len: int, seed: int, shuffle: bool = True,
                         shard_index: int | None = None, shard_count: int | None = None,
                         num_epochs: int | None = None, num_threads: int = 0,
                         prefetch: int = 2, shuffle_buffer: int = 256) -> DataIterator:
  """The packed, batched training stream over already opened sources (see module doc)."""
  shard_index, shard_count = resolve_shard(shard_index, shard_count)
  local = local_batch(batch_size, shard_count)
  if seq_len < 1:
    raise DataError(f"seq_len must be >= 1, got {seq_len}")
  lanes = lane_range(batch_size, shard_index, shard_count)
  rows = []
  for lane in lanes:
    docs = document_dataset(opened, seed=seed, shuffle=shuffle, shard_index=lane,
                            shard_count=batch_size, num_epochs=num_epochs,
                            shuffle_buffer=shuffle_buffer)
    tokens = docs.map(_Tokenize(tokenizer)).filter(lambda x: x["tokens"].size > 0)
    rows.append(grain.experimental.ConcatThenSplitIterDataset(
        tokens, length_struct={"tokens": seq_len + 1}))
  ds = _LaneBatchDataset(rows, lanes, num_threads)
  if prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  fingerprint = {
      "sources": [s.fingerprint() for s in opened],
      "seed": int(seed), "shuffle": bool(shuffle), "seq_len": seq_len, "lanes": batch_size,
      "num_epochs": num_epochs,
      "tokenizer": [tokenizer.vocab_size, tokenizer.add_bos, tokenizer.add_eos],
  }
  if any(s.streaming for s in opened):
    fingerprint["shuffle_buffer"] = int(shuffle_buffer)
  return DataIterator(ds, local_batch_size=local, seq_len=seq_len, fingerprint=fingerprint,
                      lanes=lanes, shard=(shard_index, shard_count))


def make_train_iterator(data_cfg, tokenizer: Tokenizer, *, batch_size: int, seq_len: int,
                        seed: int, shard_index: int | None = None,
                        shard_count: int | None = None, num_epochs: int | None = None,
                        ) -> DataIterator:
  """The training stream described by the `data` config section.

  Reads `data.train_path` (source spec, see peer_jax/data/sources.py), `data.text_format`,
  `data.tfds_data_dir`, `data.shuffle`, `data.shuffle_buffer`, `data.bad_records`,
  `data.num_threads`, `data.prefetch`. `batch_size` is the global batch; this host yields
  its batch_size / shard_count rows of every global batch.
  """
  opened = open_sources(_cfg(data_cfg, "train_path", ""),
                        text_format=_cfg(data_cfg, "text_format", "lines"),
                        tfds_data_dir=_cfg(data_cfg, "tfds_data_dir", "") or None,
                        default_split="train",
                        bad_records=_cfg(data_cfg, "bad_records", "error"))
  return build_train_iterator(
      opened, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed,
      shuffle=_cfg(data_cfg, "shuffle", True), shard_index=shard_index,
      shard_count=shard_count, num_epochs=num_epochs,
      num_threads=_cfg(data_cfg, "num_threads", 0), prefetch=_cfg(data_cfg, "prefetch", 2),
      shuffle_buffer=_cfg(data_cfg, "shuffle_buffer", 256))


class TextDataIterator(DataIterator):
  """Backward-compatible constructor: one local file, as train.py used it before."""

  def __init__(self, path: str, text_format: str, tokenizer: Tokenizer, *, batch_size: int,
               seq_len: int, seed: int, shuffle: bool = True, repeat: bool = True):
    opened = open_sources(path, text_format=text_format)
    it = build_train_iterator(opened, tokenizer, batch_size=batch_size, seq_len=seq_len,
                              seed=seed, shuffle=shuffle, num_epochs=None if repeat else 1)
    self.__dict__.update(it.__dict__)
    _LIVE.add(self)
