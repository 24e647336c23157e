"""Evaluation: token loss, perplexity, bits per byte, LAMBADA accuracy, expert usage.

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

Metrics of one set (`Evaluator.evaluate`):
  tokens          scored target tokens (lambada: tokens of the final words)
  loss            mean nats per scored token;  ppl = exp(loss)
  bits_per_byte   total nats / (ln 2 · UTF-8 bytes of the text scored): tokenizer-independent.
                  lm: the bytes of every evaluated document (a document cut short by
                  max_batches counts in proportion to its targets evaluated); lambada: the
                  bytes of the final words with their leading whitespace.
  accuracy        lambada: share of passages whose final word is predicted exactly
  word_ppl        lambada: exp(mean over passages of the final word's total nats)
  experts/BLOCK/usage, experts/BLOCK/unevenness
                  per PEER/PKM layer, from the router weights accumulated over the whole set
                  (all real input tokens; peer_jax.expert_stats), as in the paper's Table 2.
"""

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from peer_jax import expert_stats, sharding
from peer_jax.data import pipeline, sources
from peer_jax.data.sources import DataError

LN2 = math.log(2.0)
TASKS = ("lm", "lambada")


class EvalError(ValueError):
  """A request the evaluator cannot honour; str() is one line."""


# ----------------------------------------------------------------------------- pure metrics


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))


def bits_per_byte(loss_sum_nats: float, num_bytes: float) -> float:
  """Total nats over the UTF-8 bytes of the text they score, in bits per byte."""
  return loss_sum_nats / (LN2 * num_bytes) if num_bytes > 0 else float("nan")


def lm_metrics(loss_sum: float, count: float, num_bytes: float) -> dict[str, float]:
  loss = loss_sum / max(count, 1.0)
  return {"tokens": count, "loss": loss, "ppl": perplexity(loss),
          "bits_per_byte": bits_per_byte(loss_sum, num_bytes)}


def expert_layers(model_cfg) -> dict[str, int]:
  """{block name: number of experts} of every block whose FFW retrieves experts (the
  kind's pool: PEER, PKM, Memory+)."""
  return expert_stats.expert_pools(model_cfg)


def accumulate_routing(aux: dict, valid_BT, layers: dict[str, int]) -> dict[str, jax.Array]:
  """z_N per layer: router weight each expert got from the valid tokens of one batch."""
  out = {}
  for block, n in layers.items():
    idx, w = aux[block]["expert_indices"], aux[block]["expert_weights"]
    valid = valid_BT.reshape(valid_BT.shape + (1,) * (w.ndim - valid_BT.ndim))
    out[block] = expert_stats.accumulate_expert_weights(idx, w * valid.astype(w.dtype), n)
  return out


def expert_metrics(z: dict[str, Any]) -> dict[str, float]:
  """{'experts/BLOCK/usage', 'experts/BLOCK/unevenness'} from accumulated weights."""
  out = {}
  for block, z_N in z.items():
    z_N = jnp.asarray(z_N)
    out[f"experts/{block}/usage"] = float(expert_stats.expert_usage(z_N))
    out[f"experts/{block}/unevenness"] = float(expert_stats.expert_unevenness(z_N))
  return out


# ----------------------------------------------------------------------------- eval sets


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
    return dataclasses.replace(self, batches=[pipeline.global_batch(b, sharding_for)
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

  Windows follow `pipeline.eval_windows`: a document of n tokens has n-1 targets in windows
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


def _single_source(source):
  if isinstance(source, sources.SourceSpec):
    return source
  specs = sources.parse_sources(source, default_split="validation")
  if len(specs) != 1:
    raise DataError(f"an eval source is one source, not a mixture: {source!r}")
  return specs[0]


def _describe(source) -> str:
  return source.source if isinstance(source, sources.SourceSpec) else str(source)


def _cfg(data_cfg, key, default):
  return pipeline._cfg(data_cfg, key, default)  # noqa: SLF001  (the data package's own helper)


def load_lm_set(data_cfg, tokenizer, source, *, batch_size: int, seq_len: int,
                max_batches: int | None = None, name: str | None = None) -> EvalSet:
  """Windows of every document of `source` (see module doc), this host's local batches."""
  spec = _single_source(source)
  recorder = _RecordingTokenizer(tokenizer)
  it = pipeline.make_eval_iterator(data_cfg, recorder, spec, batch_size=batch_size,
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
  index, count = pipeline.resolve_shard(shard_index, shard_count)
  local = pipeline._local_batch(batch_size, count)  # noqa: SLF001
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
    batch = pipeline.to_model_batch({"tokens": tok, "tokens_segment_ids": segs,
                                     "tokens_positions": pos})
    batch["mask"] = (batch["mask"] * tgt[:, 1:]).astype(np.float32)
    batches.append(batch)
  return batches, placed


def load_lambada_set(data_cfg, tokenizer, source, *, batch_size: int, seq_len: int,
                     max_batches: int | None = None, name: str | None = None) -> EvalSet:
  """LAMBADA-format passages (one per document: `.txt` line or `.jsonl` `text`)."""
  spec = _single_source(source)
  docs = sources.open_source(spec, text_format=_cfg(data_cfg, "text_format", "lines"),
                             tfds_data_dir=_cfg(data_cfg, "tfds_data_dir", "") or None)
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
  for name, spec in pipeline.eval_sources(cfg.data.eval_paths).items():
    out[name] = load_eval_set(cfg.data, tokenizer, spec, task=task_of(name), name=name,
                              batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                              max_batches=cfg.data.eval_batches or None)
  return out


# ----------------------------------------------------------------------------- evaluation


def model_forward(graphdef, state, batch):
  """(logits_BTV, aux) of the model in evaluation mode (running batch-norm statistics)."""
  from flax import nnx
  model = nnx.merge(graphdef, state.params, state.model_state, copy=True)
  return model(batch["inputs"], batch["positions"], batch["segment_ids"], train=False)


def token_nll(logits_BTV, targets_BT):
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  return logz_BT - jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]


class Evaluator:
  """Jitted evaluation of a `Trainer`'s model on `EvalSet`s (batches already on device).

  `forward(graphdef, state, batch) -> (logits, aux)` defaults to the model; tests pass stubs.
  """

  def __init__(self, trainer, forward: Callable | None = None):
    self.trainer = trainer
    self.layers = expert_layers(trainer.cfg.model)
    self._forward = forward or model_forward
    self._fns: dict[Any, Callable] = {}

  def _fn(self, per_token: bool, keys: tuple[str, ...]):
    if (per_token, keys) in self._fns:
      return self._fns[(per_token, keys)]
    trainer, layers, forward = self.trainer, self.layers, self._forward

    def step(state, batch, z):
      logits_BTV, aux = forward(trainer.graphdef, state, batch)
      mask_BT = batch["mask"]
      nll_BT = token_nll(logits_BTV, batch["targets"]) * mask_BT
      batch_z = accumulate_routing(aux, batch["segment_ids"] > 0, layers)
      out = {"loss_sum": jnp.sum(nll_BT), "count": jnp.sum(mask_BT)}
      if per_token:
        out["nll_BT"] = nll_BT
        out["correct_BT"] = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
      return out, {k: z[k] + batch_z[k] for k in z}

    with_rules = getattr(sharding, "with_rules", None)  # activates the sharded layers' rules
    if with_rules is not None:
      step = with_rules(step, trainer.mesh, tuple(trainer.cfg.sharding.rules))
    replicated = NamedSharding(trainer.mesh, P())
    fn = jax.jit(step, in_shardings=(trainer.state_shardings,
                                     {k: trainer.batch_sharding(2) for k in keys}, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=2)
    self._fns[(per_token, keys)] = fn
    return fn

  def _zeros(self) -> dict[str, jax.Array]:
    """Replicated zero accumulators (made by jit, so multi-host runs agree on them)."""
    if "zeros" not in self._fns:
      layers = self.layers
      self._fns["zeros"] = jax.jit(
          lambda: {b: jnp.zeros((n,), jnp.float32) for b, n in layers.items()},
          out_shardings=NamedSharding(self.trainer.mesh, P()))
    return self._fns["zeros"]()

  def evaluate(self, state, eval_set: EvalSet, *, return_routing: bool = False):
    """Metrics of one set (module doc); with return_routing also {block: z_N numpy}."""
    per_token = eval_set.task == "lambada"
    z = self._zeros()
    loss_sum, count, per_batch = 0.0, 0.0, []
    for batch in eval_set.batches:
      out, z = self._fn(per_token, tuple(sorted(batch)))(state, batch, z)
      out = jax.device_get(out)
      loss_sum += float(out["loss_sum"])
      count += float(out["count"])
      if per_token:
        per_batch.append((np.asarray(out["nll_BT"]), np.asarray(out["correct_BT"])))
    metrics = lm_metrics(loss_sum, count, eval_set.num_bytes)
    if per_token:
      metrics.update(lambada_metrics(eval_set.examples, per_batch))
    z = jax.device_get(z)
    metrics.update(expert_metrics(z))
    return (metrics, z) if return_routing else metrics

  def evaluate_sets(self, state, eval_sets: dict[str, EvalSet], prefix: str = "eval/"
                    ) -> dict[str, float]:
    """{'eval/NAME/loss', '.../ppl', '.../bpb', '.../tokens', lambada sets also
    '.../accuracy' and '.../word_ppl', PEER/PKM models '.../experts/BLOCK/usage' and
    '.../experts/BLOCK/unevenness'} over every set."""
    out = {}
    for name, eval_set in eval_sets.items():
      for key, value in self.evaluate(state, eval_set).items():
        if key == "examples":  # constant over a run
          continue
        key = "bpb" if key == "bits_per_byte" else key
        out[f"{prefix}{name}/{key}"] = value
    return out


def lambada_metrics(examples: Sequence[LambadaExample],
                    per_batch: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
  """accuracy and word_ppl from the global per-token nll / argmax-correct arrays."""
  hits, word_nll = [], []
  for ex in examples:
    b, row, col = ex.where
    nll, correct = per_batch[b]
    sl = slice(col, col + ex.num_target)
    hits.append(bool(np.all(correct[row, sl])))
    word_nll.append(float(np.sum(nll[row, sl])))
  n = max(len(examples), 1)
  return {"examples": float(len(examples)), "accuracy": sum(hits) / n,
          "word_ppl": perplexity(sum(word_nll) / n)}


def evaluate_sets(trainer, state, eval_sets: dict[str, EvalSet]) -> dict[str, float]:
  """Convenience: `Evaluator(trainer).evaluate_sets(...)`, the evaluator cached per trainer."""
  evaluator = trainer.__dict__.get("_evaluator")
  if evaluator is None:
    evaluator = trainer.__dict__["_evaluator"] = Evaluator(trainer)
  return evaluator.evaluate_sets(state, eval_sets)


# ----------------------------------------------------------------------------- histogram


def write_expert_histogram(path: str, routing: dict[str, dict[str, np.ndarray]]) -> None:
  """PNG of the expert load distribution: one panel per (eval set, layer).

  x: an expert's share of the accumulated router weight relative to uniform (N·z_i/Σz,
  log scale; 1 = perfectly even), y: number of experts. Unused experts are counted in the
  panel title with usage and unevenness.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise EvalError("--expert_histogram needs matplotlib (pip install matplotlib)") from None
  panels = [(s, b, np.asarray(z, np.float64)) for s, layers in routing.items()
            for b, z in layers.items()]
  if not panels:
    raise EvalError("no PEER/PKM layer in this model: nothing to draw for --expert_histogram")
  cols = min(len(panels), 3)
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax, (set_name, block, z) in zip(axes.flat, panels):
    n = z.size
    load = z * n / max(z.sum(), np.finfo(np.float64).tiny)
    used = load[load > 0]
    stats = expert_metrics({block: z})
    if used.size:
      lo, hi = used.min(), used.max()
      bins = np.geomspace(lo, hi * (1 + 1e-9), 50) if hi > lo else np.array([lo * 0.9, lo * 1.1])
      ax.hist(used, bins=bins)
      ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("expert load / uniform load")
    ax.set_ylabel("experts")
    ax.set_title(f"{set_name} {block}: N={n}, unused {n - used.size}\n"
                 f"usage {stats[f'experts/{block}/usage']:.1%}, "
                 f"KL {stats[f'experts/{block}/unevenness']:.3f}", fontsize=9)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  try:
    fig.savefig(path, dpi=100)
  except OSError as e:
    raise EvalError(f"--expert_histogram: cannot write {path} ({e.strerror or e})") from None
  finally:
    plt.close(fig)
