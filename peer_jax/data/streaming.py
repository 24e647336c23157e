"""Streaming sources: directories or globs of sharded JSON-lines / text files (plain, .gz,
.zst), local or remote (`gs://...`, through `etils.epath`), read sequentially with bounded
memory and an exactly resumable position.

The training stream is organised in *lanes*: lane r produces row r of every global batch
(`peer_jax/data/pipeline.py`), so the records of global batch b never depend on how many
processes read them. This module decides which records each lane reads:

* every epoch e the shard list is permuted (seeded by the seed, the source and e);
* with at least as many shards as lanes, lane r reads whole shards: positions r, r + L,
  r + 2L, ... of the permuted list (L lanes);
* with fewer shards than lanes, lane r reads shard position r mod N and, of that shard,
  every c-th record starting at r div N (c = number of lanes on that shard), so records
  are split within a shard and still each read exactly once per epoch;
* each lane mixes its records with a *window shuffle*: it reads `shuffle_buffer` records
  ahead, emits them in a seeded random order, then reads the next window. Memory is one
  window per lane, whatever the corpus size.

A lane's state is a few integers: the window's start (epoch, piece, line, byte offset,
record index), the window counter and how many of its records were emitted. Restoring
re-reads the window from its start (plain files seek to the byte offset, compressed ones
are decompressed up to that line), so the next record is exactly the one an uninterrupted
run would have produced.

Bad data: a truncated `.gz`/`.zst`, broken JSON, a line without `text`, undecodable bytes
or an unreadable shard raise one `DataError` naming the shard and the line. With
`bad_records="skip"` bad records (and the unreadable rest of a corrupt shard) are skipped
and counted instead, with one warning per shard. A shard that disappears mid-run is always
an error, never retried.
"""

import dataclasses
import gzip
import hashlib
import io
import logging
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from peer_jax.data.shard_records import BadRecord, Position, decode_record, read_records
from peer_jax.data.sources import (COMPRESSED_SUFFIXES, JSONL_SUFFIXES, DataError, ZstdReader,
                                   file_format)

STREAM_PREFIX = "stream:"
SHARD_SUFFIXES = tuple(s + c for s in JSONL_SUFFIXES + (".txt",) for c in ("",) + COMPRESSED_SUFFIXES)
BAD_RECORDS = ("error", "skip")
_WILDCARDS = "*?["
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- file system


def _epath(path: str):
  from etils import epath
  return epath.Path(path)


def is_remote(path: str) -> bool:
  return "://" in path


def strip_prefix(source: str) -> str:
  return source[len(STREAM_PREFIX):] if source.startswith(STREAM_PREFIX) else source


def list_shards(source: str) -> list[str]:
  """Sorted shard files of a streaming source: a directory (its shard files), a glob or one
  file, local or remote; DataError when nothing matches."""
  pattern = strip_prefix(source)
  try:
    if any(c in pattern for c in _WILDCARDS):
      parts = pattern.split("/")
      first = next(i for i, p in enumerate(parts) if any(c in p for c in _WILDCARDS))
      root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
      rest = "/".join(parts[first:])
      files = [str(p) for p in _epath(root).glob(rest) if not p.is_dir()]
      if not files:
        raise DataError(f"no file matches {pattern}")
    else:
      path = _epath(pattern)
      if not path.exists():
        raise DataError(f"file not found: {pattern}")
      if path.is_dir():
        files = [str(p) for p in path.iterdir() if str(p).endswith(SHARD_SUFFIXES)
                 and not p.is_dir()]
        if not files:
          raise DataError(f"{pattern}: no shard files in this directory (expected "
                          f"{', '.join(SHARD_SUFFIXES[:3])}..., optionally .gz or .zst)")
      else:
        files = [pattern]
  except DataError:
    raise
  except Exception as e:  # a remote file system without its backend, permissions, ...
    raise DataError(f"{pattern}: cannot list shards ({type(e).__name__}: {e})") from None
  return sorted(files)


def open_shard(path: str) -> io.BufferedIOBase:
  """Open a shard for reading (decompressed) bytes through etils.epath."""
  try:
    raw = _epath(path).open("rb")
  except FileNotFoundError:
    raise DataError(f"{path}: shard not found (it was listed when the iterator was built; "
                    f"did it vanish?)") from None
  except Exception as e:
    raise DataError(f"{path}: cannot open shard ({type(e).__name__}: {e})") from None
  if path.endswith(".gz"):
    return gzip.GzipFile(fileobj=raw, mode="rb")
  if path.endswith(".zst"):
    try:
      import zstandard
    except ImportError:
      raw.close()
      raise DataError(f"{path}: reading .zst files needs the zstandard package "
                      f"(pip install zstandard)") from None
    return io.BufferedReader(ZstdReader(raw, zstandard), buffer_size=1 << 16)
  return raw


# ----------------------------------------------------------------------------- lanes


@dataclasses.dataclass(frozen=True)
class Piece:
  """What a lane reads of one shard in one epoch: records k with k % stride == offset."""
  shard: int
  stride: int = 1
  offset: int = 0


class StreamSource:
  """A streaming source: its shards (listed once) and which lane reads what in each epoch."""

  def __init__(self, source: str, *, name: str = "", text_format: str = "lines",
               text_field: str = "text", bad_records: str = "error"):
    if bad_records not in BAD_RECORDS:
      raise DataError(f"bad_records must be one of {', '.join(BAD_RECORDS)}, got {bad_records!r}")
    self.source, self.name = strip_prefix(source), name or "stream"
    self.shards = list_shards(source)
    self.text_format, self.text_field, self.bad_records = text_format, text_field, bad_records
    self.formats = [file_format(p, text_format) for p in self.shards]
    digest = hashlib.sha1("\n".join(os.path.basename(p) for p in self.shards).encode())
    self.digest = digest.hexdigest()[:12]

  def __len__(self) -> int:
    return len(self.shards)

  def fingerprint(self) -> list:
    return [len(self.shards), self.digest, self.text_format]  # bad_records may change on resume

  def plan(self, lane: int, num_lanes: int, epoch: int, seed: int, shuffle: bool,
           source_index: int = 0) -> list[Piece]:
    """The pieces lane `lane` of `num_lanes` reads in `epoch`, in order."""
    n = len(self.shards)
    if shuffle:
      rng = np.random.default_rng([int(seed) % 2**32, 0x5EED, source_index, epoch])
      order = rng.permutation(n)
    else:
      order = np.arange(n)
    if n >= num_lanes:
      return [Piece(int(order[j])) for j in range(lane, n, num_lanes)]
    p = lane % n
    stride = (num_lanes - 1 - p) // n + 1  # lanes sharing shard position p
    return [Piece(int(order[p]), stride, lane // n)]

  def documents(self) -> Iterator[str]:
    """Every document of every shard, in shard order (for evaluation)."""
    for i in range(len(self.shards)):
      yield from _shard_documents(self, i)

  __iter__ = documents


def _shard_documents(src: StreamSource, shard: int) -> Iterator[str]:
  path, fmt = src.shards[shard], src.formats[shard]
  skipped, records = 0, 0
  with open_shard(path) as f:
    try:
      for raw, first, _, _, _ in read_records(f, path, fmt, 0, 0, 0):
        records += 1
        try:
          text = decode_record(raw, path, first, fmt, src.text_field)
        except BadRecord as e:
          if src.bad_records == "error":
            raise DataError(str(e)) from None
          skipped += 1
          continue
        if text.strip():
          yield text
    except BadRecord as e:
      if src.bad_records == "error":
        raise DataError(str(e)) from None
      _log.warning("skipping the rest of a shard: %s", e)
      return
  if records == 0:
    if src.bad_records == "error":
      raise DataError(f"{path}: no documents found (empty shard?)")
    _log.warning("data: skipping an empty shard: %s", path)


class LaneReader:
  """The records of one lane, epoch after epoch, from a resumable Position."""

  def __init__(self, src: StreamSource, *, lane: int, num_lanes: int, seed: int,
               shuffle: bool, num_epochs: int | None, source_index: int = 0):
    self.src, self.lane, self.num_lanes = src, lane, num_lanes
    self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
    self.source_index = source_index
    self.skipped = 0
    self._plans: dict[int, list[Piece]] = {}
    self._gen = None
    self.position = Position()

  def _plan(self, epoch: int) -> list[Piece]:
    if epoch not in self._plans:
      self._plans = {epoch: self.src.plan(self.lane, self.num_lanes, epoch, self.seed,
                                          self.shuffle, self.source_index)}
    return self._plans[epoch]

  def seek(self, position: Position, skipped: int = 0) -> None:
    self.close()
    self.position, self.skipped = position, skipped

  def close(self) -> None:
    if self._gen is not None:
      self._gen.close()
      self._gen = None

  def read(self, n: int) -> list[str]:
    """Up to n documents (fewer only at the end of the last epoch)."""
    out = []
    if self._gen is None:
      self._gen = self._documents()
    for text in self._gen:
      out.append(text)
      if len(out) == n:
        break
    return out

  def _skip(self, message: str, path: str) -> None:
    if self.src.bad_records == "error":
      raise DataError(message)
    self.skipped += 1
    if self.skipped <= 20:
      _log.warning("data: skipping a bad record (%d so far in lane %d of %s): %s",
                   self.skipped, self.lane, self.src.name, message)

  def _documents(self) -> Iterator[str]:
    pos = self.position
    empty_epochs = 0
    while self.num_epochs is None or pos.epoch < self.num_epochs:
      plan = self._plan(pos.epoch)
      found = False
      while pos.piece < len(plan):
        piece = plan[pos.piece]
        for text, after in self._piece_documents(piece, pos):
          found = True
          self.position = after
          yield text
        pos = Position(pos.epoch, pos.piece + 1)
        self.position = pos
      empty_epochs = 0 if found else empty_epochs + 1
      if empty_epochs >= 3:
        raise DataError(f"source {self.src.name} ({self.src.source}): lane {self.lane} of "
                        f"{self.num_lanes} found no document in 3 epochs; the source has "
                        f"too few records for {self.num_lanes} rows per batch")
      pos = Position(pos.epoch + 1, 0)
      self.position = pos

  def _piece_documents(self, piece: Piece, pos: Position):
    path, fmt = self.src.shards[piece.shard], self.src.formats[piece.shard]
    with open_shard(path) as f:
      line, byte = pos.line, pos.byte
      if byte:
        if not any(path.endswith(s) for s in COMPRESSED_SUFFIXES) and f.seekable():
          f.seek(byte)
        else:  # compressed: decompress up to the line
          try:
            for _ in range(line):
              if not f.readline():
                raise DataError(f"{path}: shard is shorter than the saved position (line "
                                f"{line}); did it change since the checkpoint?")
          except DataError:
            raise
          except Exception as e:
            raise DataError(f"{path}: cannot read shard up to the saved position (line "
                            f"{line}): {type(e).__name__}: {e}") from None
      records = read_records(f, path, fmt, line, byte, pos.record)
      total = pos.record
      try:
        for raw, first, n, offset, k in records:
          total = k + 1
          if k % piece.stride != piece.offset:
            continue
          after = Position(pos.epoch, pos.piece, n, offset, k + 1)
          try:
            text = decode_record(raw, path, first, fmt, self.src.text_field)
          except BadRecord as e:
            self.position = after
            self._skip(str(e), path)
            continue
          if text.strip():
            yield text, after
          else:
            self.position = after
      except BadRecord as e:
        self._skip(f"{e} (the rest of the shard is skipped)", path)
        return
      if total == 0:
        self._skip(f"{path}: no documents found (empty shard?)", path)


# ----------------------------------------------------------------------------- grain dataset


def _window_order(seed: int, source_index: int, lane: int, window: int, n: int) -> np.ndarray:
  rng = np.random.default_rng([int(seed) % 2**32, 0xB0F, source_index, lane, window])
  return rng.permutation(n)


class StreamLaneIterator(grain.DatasetIterator):
  """Documents (str) of one lane of a StreamSource, window-shuffled, resumable."""

  def __init__(self, src: StreamSource, *, lane: int, num_lanes: int, seed: int,
               shuffle: bool, shuffle_buffer: int, num_epochs: int | None, source_index: int):
    super().__init__()
    self._reader = LaneReader(src, lane=lane, num_lanes=num_lanes, seed=seed, shuffle=shuffle,
                              num_epochs=num_epochs, source_index=source_index)
    self._seed, self._shuffle, self._lane, self._si = seed, shuffle, lane, source_index
    self._size = max(1, int(shuffle_buffer)) if shuffle else 1
    self._start, self._skipped0 = Position(), 0
    self._window_index, self._emitted = 0, 0
    self._window: list[str] | None = None
    self._order = None

  def _fill(self) -> None:
    self._start, self._skipped0 = self._reader.position, self._reader.skipped
    self._window = self._reader.read(self._size)
    n = len(self._window)
    self._order = (_window_order(self._seed, self._si, self._lane, self._window_index, n)
                   if self._shuffle and n > 1 else np.arange(n))

  def __next__(self) -> str:
    if self._window is None or self._emitted == len(self._window):
      if self._window is not None:
        self._window_index += 1
        self._emitted = 0
      self._fill()
      if not self._window:
        raise StopIteration
    text = self._window[self._order[self._emitted]]
    self._emitted += 1
    return text

  def get_state(self) -> dict[str, Any]:
    if self._window is not None and self._emitted == len(self._window):
      # The whole window is out: the next one starts where the reader is now.
      return {"start": self._reader.position.to_json(), "window": self._window_index + 1,
              "emitted": 0, "skipped": self._reader.skipped}
    return {"start": self._start.to_json(), "window": self._window_index,
            "emitted": self._emitted, "skipped": self._skipped0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._reader.seek(Position.from_json(state["start"]), int(state.get("skipped", 0)))
    self._window_index, self._emitted = int(state["window"]), 0
    self._window = None
    emitted = int(state["emitted"])
    if emitted:
      self._fill()
      self._emitted = min(emitted, len(self._window))

  @property
  def skipped(self) -> int:
    return self._reader.skipped

  def close(self) -> None:
    self._reader.close()
    super().close()


class StreamLaneDataset(grain.IterDataset):
  """One lane of a StreamSource as a grain IterDataset of str documents."""

  def __init__(self, src: StreamSource, *, lane: int, num_lanes: int, seed: int,
               shuffle: bool = True, shuffle_buffer: int = 256, num_epochs: int | None = None,
               source_index: int = 0):
    super().__init__()
    self._kw = dict(lane=lane, num_lanes=num_lanes, seed=seed, shuffle=shuffle,
                    shuffle_buffer=shuffle_buffer, num_epochs=num_epochs,
                    source_index=source_index)
    self._src = src

  def __iter__(self) -> StreamLaneIterator:
    return StreamLaneIterator(self._src, **self._kw)

  def __str__(self) -> str:
    return f"StreamLaneDataset({self._src.name}, lane={self._kw['lane']})"


def lane_documents(src: StreamSource, lanes: Sequence[int], num_lanes: int, *, seed: int,
                   shuffle: bool = True, num_epochs: int = 1) -> list[str]:
  """All documents the given lanes read in `num_epochs` (unshuffled within lanes; tests)."""
  out = []
  for lane in lanes:
    reader = LaneReader(src, lane=lane, num_lanes=num_lanes, seed=seed, shuffle=shuffle,
                        num_epochs=num_epochs)
    while True:
      got = reader.read(1024)
      out.extend(got)
      if len(got) < 1024:
        break
  return out
