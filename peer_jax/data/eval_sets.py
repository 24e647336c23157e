"""Eval sets: fixed lists of batches for `peer_jax.evaluate.Evaluator` (built on the host).

An `EvalSet` is a fixed list of batches in the training format {inputs, targets, positions,
segment_ids, mask} plus what the metrics need besides the model (UTF-8 bytes, LAMBADA
examples). Two tasks:

* `lm`: any source (`peer_jax.data.make_eval_iterator`). No packing across documents: each
  document is cut into windows of seq_len+1 tokens overlapping by one token (every token but
  the document's first is a target exactly once; a window does not see the text of the
  windows before it), windows are placed whole as separate segments of a row.
* `lambada`: each document is a passage whose final word is to be predicted. The model sees
  [BOS] + context and must give every token of the final word (with its leading space) by
  greedy argmax; checking argmax under teacher forcing is the same as greedy decoding.
  Passages are placed whole as separate segments (left-truncated to seq_len+1 tokens).

`num_bytes` is what bits per byte divides by: lm: the bytes of every evaluated document (a
document cut short by max_batches counts in proportion to its targets evaluated); lambada:
the bytes of the final words with their leading whitespace. The metrics themselves are in
`peer_jax/evaluate.py`.
"""

import dataclasses
import re
from typing import Callable, Sequence

import jax
import numpy as np

from peer_jax.data import sources
from peer_jax.data.batches import global_batch, local_batch, resolve_shard, to_model_batch
from peer_jax.data.eval_batches import eval_sources, make_eval_iterator
from peer_jax.data.sources import DataError, config_value, single_source

TASKS = ("lm", "lambada")


class EvalError(ValueError):
  """A request the evaluator cannot honour; str() is one line."""


@dataclasses.dataclass
class LambadaExample:
  tokens: list[int]     # [BOS] + context + final word, left-truncated to seq_len + 1
  num_target: int       # the final word's tokens, at the end of `tokens`
  num_bytes: int        # UTF-8 bytes of the final word with its leading whitespace
  where: tuple[int, int, int] = (-1, -1, -1)  # (batch, global row in batch, first target column)


@dataclasses.dataclass
class EvalSet:
  name: str
  data: str                  # the source as given
  task: str                  # "lm" or "lambada"
  batches: list[dict]        # local numpy batches, or global jax.Arrays after on_device()
  num_bytes: float           # UTF-8 bytes of the text the targets score
  examples: list[LambadaExample] | None = None

  def on_device(self, sharding_for) -> "EvalSet":
    """The same set with its batches as global arrays (`sharding_for(ndim)` -> sharding)."""
    return dataclasses.replace(self, batches=[global_batch(b, sharding_for)
                                              for b in self.batches])


class _RecordingTokenizer:
  """Wraps a tokenizer; remembers (tokens, UTF-8 bytes) of every document it encodes."""

  def __init__(self, tokenizer):
    self._tokenizer, self.records = tokenizer, []

  def encode(self, text: str):
    ids = self._tokenizer.encode(text)
    self.records.append((len(ids), len(text.encode("utf-8"))))
    return ids

  def __getattr__(self, name):
    return getattr(self._tokenizer, name)


def window_bytes(records: Sequence[tuple[int, int]], seq_len: int, num_windows: int) -> float:
  """UTF-8 bytes scored by the first `num_windows` eval windows of documents (tokens, bytes).

  Windows follow `eval_batches.eval_windows`: a document of n tokens has n-1 targets in windows
  of seq_len targets (the last one shorter); a document only partly evaluated counts the
  share of its bytes that its evaluated targets are of its n-1 targets.
  """
  total, left = 0.0, num_windows
  for n, nbytes in records:
    if n < 2 or left <= 0:
      if left <= 0:
        break
      continue
    k = -(-(n - 1) // seq_len)
    if left >= k:
      total += nbytes
      left -= k
    else:
      total += nbytes * (left * seq_len) / (n - 1)
      left = 0
  return total


def _global_sum(x: float) -> float:
  if jax.process_count() == 1:
    return float(x)
  from jax.experimental import multihost_utils
  return float(np.sum(multihost_utils.process_allgather(np.asarray([x], np.float64))))


def _describe(source) -> str:
  return source.source if isinstance(source, sources.SourceSpec) else str(source)


def load_lm_set(data_cfg, tokenizer, source, *, batch_size: int, seq_len: int,
                max_batches: int | None = None, name: str | None = None) -> EvalSet:
  """Windows of every document of `source` (see module doc), this host's local batches."""
  spec = single_source(source)
  recorder = _RecordingTokenizer(tokenizer)
  it = make_eval_iterator(data_cfg, recorder, spec, batch_size=batch_size,
                                   seq_len=seq_len, max_batches=max_batches)
  batches = list(it)
  # Each window starts at position 0 of a real segment; the global count fixes the bytes.
  local_windows = sum(int(np.sum((b["positions"] == 0) & (b["segment_ids"] > 0)))
                      for b in batches)
  num_windows = int(round(_global_sum(local_windows)))
  if num_windows == 0:
    raise DataError(f"{spec.source}: no document of two or more tokens to evaluate")
  return EvalSet(name or spec.name, _describe(source), "lm", batches,
                 window_bytes(recorder.records, seq_len, num_windows))


_LAST_WORD = re.compile(r"^(.*\S)(\s+\S+)\s*$", re.S)


def split_last_word(text: str) -> tuple[str, str] | None:
  """'the cat sat' -> ('the cat', ' sat'); None when there is no context before the word."""
  m = _LAST_WORD.match(text)
  return (m.group(1), m.group(2)) if m else None


def lambada_example(text: str, tokenizer, plain_encode: Callable[[str], list[int]],
                    seq_len: int) -> LambadaExample | None:
  """Tokens of one passage: [BOS] + context + final word; None without a final word.

  The final word's tokens are those the whole passage has after the context's (so the
  tokenizer sees the text as one piece); if the joint tokenization does not start with the
  context's, the word is tokenized on its own.
  """
  parts = split_last_word(text)
  if parts is None:
    return None
  context, word = parts
  ctx_ids, full_ids = plain_encode(context), plain_encode(context + word)
  if full_ids[:len(ctx_ids)] == ctx_ids and len(full_ids) > len(ctx_ids):
    target = full_ids[len(ctx_ids):]
  else:
    target = plain_encode(word.strip())
  if not target:
    return None
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id >= 0 else []
  tokens = (bos + ctx_ids + target)[-(seq_len + 1):]
  return LambadaExample(tokens, min(len(target), len(tokens) - 1), len(word.encode("utf-8")))


def _plain_encoder(tokenizer) -> Callable[[str], list[int]]:
  """encode() without BOS/EOS."""
  from peer_jax.data.tokenizer import Tokenizer
  if isinstance(tokenizer, Tokenizer):
    return Tokenizer(tokenizer.path, add_bos=False, add_eos=False).encode
  return getattr(tokenizer, "encode_plain", tokenizer.encode)


def lambada_batches(examples: list[LambadaExample], *, batch_size: int, seq_len: int,
                    max_batches: int | None = None, shard_index: int | None = None,
                    shard_count: int | None = None) -> tuple[list[dict], list[LambadaExample]]:
  """Passages placed whole into rows first-fit in order; loss mask on final words only.

  Returns this host's local batches and the examples they hold (with `where` filled in).
  """
  index, count = resolve_shard(shard_index, shard_count)
  local = local_batch(batch_size, count)
  width = seq_len + 1
  rows, placed, used = [], [], width  # rows: (tokens, segments, positions, is_target)
  for ex in examples:
    n = len(ex.tokens)
    if used + n > width:
      if max_batches is not None and len(rows) == max_batches * batch_size:
        break
      rows.append(tuple(np.zeros(width, np.int32) for _ in range(4)))
      used, seg = 0, 0
    seg += 1
    tok, segs, pos, tgt = rows[-1]
    tok[used:used + n], segs[used:used + n], pos[used:used + n] = ex.tokens, seg, np.arange(n)
    tgt[used + n - ex.num_target:used + n] = 1
    r = len(rows) - 1
    # The target at sequence index i is predicted at input column used + i - 1.
    placed.append(dataclasses.replace(ex, where=(r // batch_size, r % batch_size,
                                                 used + n - ex.num_target - 1)))
    used += n
  if not rows:
    return [], []
  rows += [tuple(np.zeros(width, np.int32) for _ in range(4))] * (-len(rows) % batch_size)
  batches = []
  for b in range(len(rows) // batch_size):
    mine = rows[b * batch_size + index * local:b * batch_size + (index + 1) * local]
    tok, segs, pos, tgt = (np.stack([r[i] for r in mine]) for i in range(4))
    batch = to_model_batch({"tokens": tok, "tokens_segment_ids": segs,
                                     "tokens_positions": pos})
    batch["mask"] = (batch["mask"] * tgt[:, 1:]).astype(np.float32)
    batches.append(batch)
  return batches, placed


def load_lambada_set(data_cfg, tokenizer, source, *, batch_size: int, seq_len: int,
                     max_batches: int | None = None, name: str | None = None) -> EvalSet:
  """LAMBADA-format passages (one per document: `.txt` line or `.jsonl` `text`)."""
  spec = single_source(source)
  docs = sources.open_source(spec, text_format=config_value(data_cfg, "text_format", "lines"),
                             tfds_data_dir=config_value(data_cfg, "tfds_data_dir", "") or None)
  plain = _plain_encoder(tokenizer)
  examples = []
  for i in range(len(docs)):
    ex = lambada_example(docs[i], tokenizer, plain, seq_len)
    if ex is not None:
      examples.append(ex)
    if max_batches is not None and len(examples) >= max_batches * batch_size * (seq_len + 1) // 2:
      break  # more than the batches can hold (a passage has at least two tokens)
  if not examples:
    raise DataError(f"{spec.source}: no passage with a final word (LAMBADA format: one "
                    f"passage per document, the last word is the one to predict)")
  batches, placed = lambada_batches(examples, batch_size=batch_size, seq_len=seq_len,
                                    max_batches=max_batches)
  return EvalSet(name or spec.name, _describe(source), "lambada", batches,
                 float(sum(e.num_bytes for e in placed)), placed)


def load_eval_set(data_cfg, tokenizer, source, *, task: str = "lm", batch_size: int,
                  seq_len: int, max_batches: int | None = None, name: str | None = None
                  ) -> EvalSet:
  if task not in TASKS:
    raise EvalError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
  load = load_lm_set if task == "lm" else load_lambada_set
  return load(data_cfg, tokenizer, source, batch_size=batch_size, seq_len=seq_len,
              max_batches=max_batches, name=name)


def task_of(name: str) -> str:
  """Eval sets of `data.eval_paths` whose name starts with `lambada` are LAMBADA sets."""
  return "lambada" if name.lower().startswith("lambada") else "lm"


def load_eval_sets(cfg, tokenizer) -> dict[str, EvalSet]:
  """Every set of `data.eval_paths` (first `data.eval_batches` batches), for the train loop."""
  if not cfg.train.eval_every:
    return {}
  out = {}
  for name, spec in eval_sources(cfg.data.eval_paths).items():
    out[name] = load_eval_set(cfg.data, tokenizer, spec, task=task_of(name), name=name,
                              batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                              max_batches=cfg.data.eval_batches or None)
  return out
