"""Evaluation: loss/ppl/bits per byte, LAMBADA accuracy, expert usage, scripts/evaluate.py."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO, tiny_config
from peer_jax import evaluate as ev
from peer_jax.checkpoint import Checkpointer
from peer_jax.data import Tokenizer
from peer_jax.train import Trainer

SEQ_LEN = 32
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text — with multi-byte characters, 42 numbers and punctuation!",
    " ".join(f"word{i} follows word{i - 1} in this rather long document" for i in range(1, 12)),
    "Short one.",
    "Another ordinary sentence about language models and their many experts.",
]
# LAMBADA-format passages: the final word is the answer. Two of them end in "elephant".
PASSAGES = [
    "She opened the door and there, in the middle of the living room, stood an elephant",
    "He poured the coffee into his favourite cup",
    "The zoo keeper said the largest animal in the park was the old elephant",
    "After the long walk they finally reached the house",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny PEER model (initial parameters) saved as a workdir, and the eval files."""
  root = tmp_path_factory.mktemp("evaluate")
  cfg = tiny_config("peer")
  cfg.train.seq_len = SEQ_LEN
  cfg.checkpoint.async_save = False
  trainer = Trainer.build(cfg)
  state = trainer.init_state()
  workdir = root / "run"
  ckpt = Checkpointer(str(workdir), cfg.checkpoint)
  ckpt.save(3, state, {}, json.loads(cfg.to_json_best_effort()), force=True)
  ckpt.close()
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  txt = root / "docs.txt"
  txt.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
  jsonl = root / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[::-1]), encoding="utf-8")
  lambada = root / "lambada.jsonl"
  lambada.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
  tokenizer = Tokenizer(cfg.data.tokenizer, add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos)
  empty = root / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((workdir / "config.json").read_text())
  # The script runs start now and go on while the in-process tests run: each is mostly
  # interpreter and JAX start-up.
  png = root / "experts.png"
  runs = {
      "lm": _start(f"--workdir={workdir}", f"--data={txt}", f"--data=c4like={jsonl}",
                   f"--expert_histogram={png}"),
      "lambada": _start(f"--workdir={workdir}", f"--data={lambada}", "--task=lambada",
                        "--step=3"),
  }
  errors = [
      ([f"--workdir={root / 'nope'}", f"--data={txt}"], "not a directory"),
      ([f"--workdir={workdir}", "--data=/no/such/file.txt"], "file not found"),
      ([f"--workdir={empty}", f"--data={txt}"], "no checkpoints"),
      ([f"--workdir={workdir}", f"--data={txt}", "--step=7"], "no checkpoint for step 7"),
      ([f"--workdir={workdir}"], "--data"),
  ]
  runs.update({f"error{i}": _start(*args) for i, (args, _) in enumerate(errors)})
  yield dict(cfg=cfg, trainer=trainer, state=state, workdir=workdir, txt=str(txt),
             jsonl=str(jsonl), lambada=str(lambada), tokenizer=tokenizer, runs=runs,
             errors=errors, png=png)
  for proc in runs.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _zero_aux(trainer, batch, expert=0):
  """aux of a model whose PEER layer sends every token to one expert with weight 1."""
  shape = batch["inputs"].shape + (1, 1)
  return {b: {"expert_indices": jnp.full(shape, expert, jnp.int32),
              "expert_weights": jnp.ones(shape, jnp.float32)}
          for b in ev.expert_layers(trainer.cfg.model)}


def _zeros_logits(batch, vocab):
  """Uniform logits that depend on the input (a constant would be folded, slowly, by XLA)."""
  x = batch["inputs"][..., None].astype(jnp.float32) * 0.0
  return jnp.broadcast_to(x, batch["inputs"].shape + (vocab,))


def _start(*args):
  return subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _evaluate(*args):
  return _finish(_start(*args))


# ----------------------------------------------------------------------------- pure parts


def test_bits_per_byte_formula():
  assert ev.bits_per_byte(100.0, 50) == pytest.approx(100.0 / (math.log(2) * 50))
  m = ev.lm_metrics(loss_sum=30.0, count=10.0, num_bytes=40.0)
  assert m["loss"] == pytest.approx(3.0) and m["ppl"] == pytest.approx(math.exp(3.0))
  assert m["bits_per_byte"] == pytest.approx(30.0 / math.log(2) / 40.0)
  assert math.isnan(ev.bits_per_byte(1.0, 0))


def test_window_bytes_counts_partial_documents_pro_rata():
  # (tokens, bytes): 4 targets in 1 window; a 1-token document (no window); 69 targets in
  # 3 windows of 32, 32, 5.
  records = [(5, 10), (1, 3), (70, 100)]
  assert ev.window_bytes(records, 32, 4) == 110
  assert ev.window_bytes(records, 32, 1) == 10
  assert ev.window_bytes(records, 32, 3) == pytest.approx(10 + 100 * 64 / 69)


def test_expert_routing_aggregation_by_hand():
  rng = np.random.default_rng(0)
  n = 16
  idx = rng.integers(0, n, size=(2, 5, 3, 2))
  w = rng.random((2, 5, 3, 2)).astype(np.float32)
  valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  z = ev.accumulate_routing({"block_1": {"expert_indices": idx, "expert_weights": w}},
                            jnp.asarray(valid), {"block_1": n})["block_1"]
  expected = np.zeros(n)
  np.add.at(expected, idx[valid].reshape(-1), w[valid].reshape(-1))
  np.testing.assert_allclose(np.asarray(z), expected, rtol=1e-6)
  p = expected / expected.sum()
  m = ev.expert_metrics({"block_1": z})
  assert m["experts/block_1/usage"] == pytest.approx(np.mean(expected > 0))
  assert m["experts/block_1/unevenness"] == pytest.approx(
      math.log(n) + np.sum(p[p > 0] * np.log(p[p > 0])), abs=1e-5)
  # Every expert equally often -> KL 0 and usage 1; all weight on one -> KL log N, usage 1/N.
  even = ev.expert_metrics({"b": np.full(n, 3.0)})
  assert even == {"experts/b/usage": 1.0, "experts/b/unevenness": pytest.approx(0.0, abs=1e-6)}
  one = ev.expert_metrics({"b": np.eye(n)[5] * 7.0})
  assert one["experts/b/usage"] == pytest.approx(1 / n)
  assert one["experts/b/unevenness"] == pytest.approx(math.log(n), rel=1e-6)


def test_split_last_word():
  assert ev.split_last_word("the cat  sat ") == ("the cat", "  sat")
  assert ev.split_last_word("alone") is None
  assert ev.split_last_word("  ") is None


# ----------------------------------------------------------------------------- with a model


def test_uniform_logits_give_vocab_size_perplexity_and_hand_bpb(setup):
  trainer, tok = setup["trainer"], setup["tokenizer"]
  vocab = trainer.cfg.model.vocab_size

  def uniform(graphdef, state, batch):
    return _zeros_logits(batch, vocab), _zero_aux(trainer, batch, expert=3)

  evaluator = ev.Evaluator(trainer, forward=uniform)
  # Batches of 2 rows so the set spans several batches, the last one padded.
  full = ev.load_lm_set(None, tok, setup["txt"], batch_size=2, seq_len=SEQ_LEN)
  m = evaluator.evaluate(setup["state"], full.on_device(trainer.batch_sharding))
  tokens = sum(len(tok.encode(d)) - 1 for d in DOCS)
  nbytes = sum(len(d.encode("utf-8")) for d in DOCS)
  assert m["tokens"] == tokens and full.num_bytes == nbytes
  assert m["ppl"] == pytest.approx(vocab, rel=1e-5)
  assert m["bits_per_byte"] == pytest.approx(tokens * math.log(vocab) / (math.log(2) * nbytes),
                                             rel=1e-6)
  # One expert takes every token: usage 1/N, unevenness log N.
  n = trainer.cfg.model.peer.num_experts
  assert m["experts/block_0/usage"] == pytest.approx(1 / n)
  assert m["experts/block_0/unevenness"] == pytest.approx(math.log(n), rel=1e-5)
  # Truncated to one batch: the bytes follow the windows that were scored.
  part = ev.load_lm_set(None, tok, setup["txt"], batch_size=2, seq_len=SEQ_LEN, max_batches=1)
  mp = evaluator.evaluate(setup["state"], part.on_device(trainer.batch_sharding))
  assert 0 < part.num_bytes < nbytes and 0 < mp["tokens"] < tokens
  assert mp["bits_per_byte"] == pytest.approx(
      mp["tokens"] * math.log(vocab) / (math.log(2) * part.num_bytes), rel=1e-6)


def test_lambada_accuracy_on_a_known_case(setup):
  """A stub that predicts every target except one token id: passages ending in it fail."""
  trainer, tok = setup["trainer"], setup["tokenizer"]
  vocab = trainer.cfg.model.vocab_size
  plain = Tokenizer(tok.path, add_bos=False, add_eos=False)
  wrong = plain.encode("an elephant")[-1]  # the last piece of " elephant"
  assert all(wrong not in plain.encode(p.rsplit(" ", 1)[1]) for p in PASSAGES[1::2])

  def oracle(graphdef, state, batch):
    pred = jnp.where(batch["targets"] == wrong, (wrong + 1) % vocab, batch["targets"])
    return 20.0 * jax.nn.one_hot(pred, vocab), _zero_aux(trainer, batch)

  eval_set = ev.load_lambada_set(None, tok, setup["lambada"], batch_size=2, seq_len=SEQ_LEN)
  # The loss mask is exactly the final words' tokens, at the columns the examples record.
  for ex in eval_set.examples:
    b, row, col = ex.where
    batch = eval_set.batches[b]
    assert batch["mask"][row, col:col + ex.num_target].all()
    np.testing.assert_array_equal(batch["targets"][row, col:col + ex.num_target],
                                  ex.tokens[-ex.num_target:])
  assert (sum(b["mask"].sum() for b in eval_set.batches)
          == sum(e.num_target for e in eval_set.examples))
  assert eval_set.num_bytes == sum(len((" " + p.rsplit(" ", 1)[1]).encode()) for p in PASSAGES)

  m = ev.Evaluator(trainer, forward=oracle).evaluate(
      setup["state"], eval_set.on_device(trainer.batch_sharding))
  assert m["examples"] == 4 and m["accuracy"] == pytest.approx(0.5)
  right = math.log1p((vocab - 1) * math.exp(-20.0))  # nll of a correct one-hot-20 logit
  n_wrong = sum(ex.tokens[-ex.num_target:].count(wrong) for ex in eval_set.examples)
  assert n_wrong == 2
  assert m["loss"] == pytest.approx((m["tokens"] * right + n_wrong * 20.0) / m["tokens"], rel=1e-4)


def test_loss_and_expert_usage_equal_a_direct_computation(setup):
  """Packed eval windows vs each window run alone through the model (no packing)."""
  trainer, state, tok = setup["trainer"], setup["state"], setup["tokenizer"]
  eval_set = ev.load_lm_set(None, tok, setup["txt"], batch_size=4, seq_len=SEQ_LEN)
  m = ev.Evaluator(trainer).evaluate(state, eval_set.on_device(trainer.batch_sharding))

  windows = []
  for doc in DOCS:
    ids = tok.encode(doc)
    windows += [ids[s:s + SEQ_LEN + 1] for s in range(0, len(ids) - 1, SEQ_LEN)]
  assert len(windows) > len(DOCS)  # one document spans several windows
  rows = -(-len(windows) // 4) * 4
  tokens = np.zeros((rows, SEQ_LEN + 1), np.int32)
  segs = np.zeros((rows, SEQ_LEN + 1), np.int32)
  for i, w in enumerate(windows):
    tokens[i, :len(w)], segs[i, :len(w)] = w, 1
  pos = np.broadcast_to(np.arange(SEQ_LEN), (rows, SEQ_LEN))
  batch = {"inputs": tokens[:, :-1], "positions": pos, "segment_ids": segs[:, :-1]}
  forward = jax.jit(lambda s, b: ev.model_forward(trainer.graphdef, s, b))
  logits, aux = jax.device_get(forward(state, batch))
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  mask = (segs[:, 1:] > 0)
  assert m["tokens"] == mask.sum()
  assert m["loss"] == pytest.approx(nll[mask].sum() / mask.sum(), rel=1e-5)
  assert m["bits_per_byte"] == pytest.approx(
      nll[mask].sum() / (math.log(2) * sum(len(d.encode()) for d in DOCS)), rel=1e-5)

  n = trainer.cfg.model.peer.num_experts
  z = np.zeros(n)
  valid = segs[:, :-1] > 0
  a = aux["block_0"]
  np.add.at(z, a["expert_indices"][valid].reshape(-1), a["expert_weights"][valid].reshape(-1))
  p = z / z.sum()
  assert m["experts/block_0/usage"] == pytest.approx(np.mean(z > 0))
  assert m["experts/block_0/unevenness"] == pytest.approx(
      math.log(n) + np.sum(p[p > 0] * np.log(p[p > 0])), abs=1e-4)
  setup["direct_loss"] = m["loss"]


def test_load_eval_sets_for_training(setup):
  """data.eval_paths sets for the train loop: a set named lambada* is scored as LAMBADA."""
  cfg, trainer = setup["cfg"], setup["trainer"]
  vocab = cfg.model.vocab_size
  with cfg.unlocked():
    cfg.train.eval_every = 5
    cfg.data.eval_paths = f"wiki={setup['txt']},lambada={setup['lambada']}"
  sets = ev.load_eval_sets(cfg, setup["tokenizer"])
  assert {k: s.task for k, s in sets.items()} == {"wiki": "lm", "lambada": "lambada"}
  uniform = lambda g, s, b: (_zeros_logits(b, vocab), _zero_aux(trainer, b))
  on_device = {k: s.on_device(trainer.batch_sharding) for k, s in sets.items()}
  out = ev.Evaluator(trainer, forward=uniform).evaluate_sets(setup["state"], on_device)
  for name in ("wiki", "lambada"):
    for key in ("loss", "ppl", "bpb", "tokens", "experts/block_0/usage",
                "experts/block_0/unevenness"):
      assert f"eval/{name}/{key}" in out
  assert out["eval/lambada/accuracy"] == 0.0  # argmax of uniform logits is token 0
  assert out["eval/wiki/ppl"] == pytest.approx(vocab, rel=1e-5)


# ----------------------------------------------------------------------------- the script


def test_script_output_schema_results_file_and_histogram(setup):
  workdir, png = setup["workdir"], setup["png"]
  r = _finish(setup["runs"]["lm"])
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in r.stdout.splitlines()]
  assert [rec["data"] for rec in records] == [setup["txt"], f"c4like={setup['jsonl']}"]
  for rec in records:
    assert {"data", "tokens", "loss", "ppl", "bits_per_byte", "step",
            "experts/block_0/usage", "experts/block_0/unevenness"} <= set(rec)
    assert rec["step"] == 3 and rec["ppl"] == pytest.approx(math.exp(rec["loss"]))
  # Same documents in another order and container: the same numbers.
  assert records[0]["tokens"] == records[1]["tokens"]
  assert records[0]["loss"] == pytest.approx(records[1]["loss"], rel=1e-5)
  if "direct_loss" in setup:  # the restored checkpoint scores like the in-memory model
    assert records[0]["loss"] == pytest.approx(setup["direct_loss"], rel=1e-5)
  saved = [json.loads(line) for line in open(workdir / "eval_results.jsonl")]
  assert all(rec in saved for rec in records)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_lambada(setup):
  r = _finish(setup["runs"]["lambada"])
  assert r.returncode == 0, r.stderr[-3000:]
  rec = json.loads(r.stdout)
  assert rec["task"] == "lambada" and rec["step"] == 3
  assert rec["examples"] == 4 and 0.0 <= rec["accuracy"] <= 1.0 and "bits_per_byte" in rec


def test_script_bad_input_is_one_line_exit_2(setup):
  for i, (args, message) in enumerate(setup["errors"]):
    r = _finish(setup["runs"][f"error{i}"])
    assert r.returncode == 2, (args, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], (args, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stdout == ""
