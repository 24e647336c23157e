"""Input pipeline: exact resume, no token lost or repeated, host sharding, mixtures,
bad input, tokenizer training, ArrayRecord (TFDS) round trip, evaluation batches."""

import glob
import gzip
import itertools
import json
import os

import numpy as np
import pytest

from configs.base import SHARED_DATA
from peer_jax.data import pipeline as P
from peer_jax.data import sources as S
from peer_jax.data.sources import DataError
from peer_jax.data.tokenizer import Tokenizer, train_tokenizer

SPM = f"{SHARED_DATA}/tokenizers/c4_en_32k_spm.model"
WIKI_VALID = f"{SHARED_DATA}/wikitext-2/valid.txt"
C4 = f"{SHARED_DATA}/c4_en_sample/c4-train.00000-of-01024.first1000.jsonl"
SHAKESPEARE = f"{SHARED_DATA}/tiny_shakespeare/input.txt"


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(SPM)


@pytest.fixture
def tiny(tmp_path):
  """40 distinct short documents: a few batches make an epoch."""
  path = tmp_path / "tiny.txt"
  path.write_text("".join(f"document number {i} says {'word ' * (i % 7)}\n" for i in range(40)))
  return str(path)


def _cfg(path, **kw):
  return {"train_path": path, "text_format": "lines", "shuffle": True, "num_threads": 0,
          "prefetch": 2, "tfds_data_dir": "", **kw}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _first(dataset, n):
  """The first n elements of a grain dataset."""
  return list(itertools.islice(iter(dataset), n))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _row_tokens(batch):
  """The seq_len+1 tokens of each packed row (inputs plus the last target)."""
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_threads,prefetch", [(0, 2), (2, 0)])
def test_exact_resume_across_epochs(tiny, tok, num_threads, prefetch):
  cfg = _cfg(tiny, num_threads=num_threads, prefetch=prefetch)
  kw = dict(batch_size=2, seq_len=16, seed=3, shard_index=0, shard_count=1)
  # ~40 docs of ~10 tokens: one epoch is ~13 batches, so 40 batches cross epochs twice.
  ref = P.make_train_iterator(cfg, tok, **kw)
  expected = _take(ref, 45)
  it = P.make_train_iterator(cfg, tok, **kw)
  states = [json.loads(json.dumps(it.get_state()))]  # survives a JSON checkpoint
  for _ in range(40):
    next(it)
    states.append(json.loads(json.dumps(it.get_state())))
  # Resume from every position: some states carry a partly packed document, some do not.
  assert len({json.dumps(st["lanes"]["0"].get("remainder_slices")) for st in states}) > 2
  for n in range(0, 41, 1 if prefetch else 4):
    resumed = P.make_train_iterator(cfg, tok, **kw)
    resumed.set_state(states[n])
    _assert_same(_take(resumed, 45 - n if n % 10 == 3 else 4), expected[n:n + (45 - n if n % 10 == 3 else 4)])
  # The original iterator continues unchanged after get_state.
  _assert_same(_take(it, 3), expected[40:43])


def test_each_epoch_is_a_new_permutation(tiny, tok):
  opened = P.open_sources(tiny)
  docs = _first(P.document_dataset(opened, seed=0, shuffle=True, shard_index=0, shard_count=1), 80)
  epoch1, epoch2 = docs[:40], docs[40:]
  assert sorted(epoch1) == sorted(epoch2) == sorted(opened[0].docs)
  assert epoch1 != epoch2 and epoch1 != opened[0].docs
  other_seed = P.document_dataset(opened, seed=1, shuffle=True, shard_index=0, shard_count=1)
  assert _first(other_seed, 40) != epoch1


def test_set_state_from_another_pipeline_is_refused(tiny, tok):
  it = P.make_train_iterator(_cfg(tiny), tok, batch_size=2, seq_len=16, seed=0, shard_count=1)
  next(it)
  other = P.make_train_iterator(_cfg(tiny), tok, batch_size=2, seq_len=32, seed=0, shard_count=1)
  with pytest.raises(DataError, match="different pipeline.*seq_len"):
    other.set_state(it.get_state())
  with pytest.raises(DataError, match="not a peer_jax data iterator state"):
    other.set_state({"next_index": 3})


# ----------------------------------------------------------------------------- packing


def test_stream_is_the_documents_concatenated(tok):
  """Row r of consecutive batches, end to end, is exactly lane r's tokenized documents."""
  cfg = _cfg(WIKI_VALID)
  it = P.make_train_iterator(cfg, tok, batch_size=4, seq_len=64, seed=5, shard_count=1)
  batches = _take(it, 60)
  opened = P.open_sources(WIKI_VALID)
  for lane in range(4):
    stream = np.concatenate([_row_tokens(b)[lane] for b in batches])
    docs = iter(P.document_dataset(opened, seed=5, shuffle=True, shard_index=lane, shard_count=4))
    expected = []
    while sum(map(len, expected)) < len(stream):
      expected.append(tok.encode(next(docs)))
    np.testing.assert_array_equal(stream, np.concatenate(expected)[:len(stream)])
  for b in batches:
    # segment ids restart per row and mark document pieces; positions restart per piece
    seg, pos, mask = b["segment_ids"], b["positions"], b["mask"]
    assert (seg >= 1).all() and (seg[:, 0] == 1).all()
    starts = np.diff(seg, axis=1) != 0
    assert (pos[:, 1:][starts] == 0).all() and (pos[:, 1:][~starts] == pos[:, :-1][~starts] + 1).all()
    assert mask[:, :-1][starts].sum() == 0  # no target across a document boundary


def test_one_epoch_has_every_token_exactly_once(tok):
  """Count tokens of one epoch of packed rows against tokenizing every document directly."""
  opened = P.open_sources(WIKI_VALID)
  it = P.build_train_iterator(opened, tok, batch_size=1, seq_len=128, seed=0, shard_count=1,
                              num_epochs=1, prefetch=0)
  counts = np.zeros(tok.vocab_size, np.int64)
  rows = 0
  for b in it:
    row = _row_tokens(b)[0]
    # Only the epoch's last row is padded (segment 0). The row's final token has no segment
    # id of its own: it is real if it continues its document or starts one (BOS).
    last_real = b["mask"][0, -1] > 0 or row[-1] == tok.bos_id
    valid = np.concatenate([b["segment_ids"][0] > 0, [last_real]])
    counts += np.bincount(row[valid], minlength=tok.vocab_size)
    rows += 1
  direct = np.zeros(tok.vocab_size, np.int64)
  for d in opened[0].docs:
    direct += np.bincount(tok.encode(d), minlength=tok.vocab_size)
  assert rows > 100
  np.testing.assert_array_equal(counts, direct)


# ----------------------------------------------------------------------------- sharding


def test_two_hosts_read_disjoint_shares_covering_the_epoch(tiny, tok):
  opened = P.open_sources(tiny)
  shares = []
  for host in range(2):
    docs = P.document_dataset(opened, seed=0, shuffle=True, shard_index=host, shard_count=2,
                              num_epochs=1)
    shares.append(list(docs))
  assert set(shares[0]).isdisjoint(shares[1])
  assert sorted(shares[0] + shares[1]) == sorted(opened[0].docs)
  # Each host's iterator yields its local half of the global batch.
  its = [P.make_train_iterator(_cfg(tiny), tok, batch_size=4, seq_len=16, seed=0,
                               shard_index=h, shard_count=2) for h in range(2)]
  b0, b1 = next(its[0]), next(its[1])
  assert b0["inputs"].shape == b1["inputs"].shape == (2, 16)
  assert not np.array_equal(b0["inputs"], b1["inputs"])
  with pytest.raises(DataError, match="not divisible"):
    P.make_train_iterator(_cfg(tiny), tok, batch_size=3, seq_len=16, seed=0, shard_count=2)


def test_two_hosts_token_counts_add_up(tok):
  opened = P.open_sources(WIKI_VALID)
  total = np.zeros(tok.vocab_size, np.int64)
  for host in range(2):
    docs = P.document_dataset(opened, seed=1, shuffle=True, shard_index=host, shard_count=2,
                              num_epochs=1)
    for d in docs:
      total += np.bincount(tok.encode(d), minlength=tok.vocab_size)
  direct = sum(np.bincount(tok.encode(d), minlength=tok.vocab_size) for d in opened[0].docs)
  np.testing.assert_array_equal(total, direct)


# ----------------------------------------------------------------------------- mixtures


def test_mixture_spec_parsing():
  specs = S.parse_sources("wiki=/a/b.txt@0.7, c4=tfds:c4/en:3.1.0@0.3,/x/y.jsonl.gz")
  assert [(s.name, s.source, s.weight, s.kind) for s in specs] == [
      ("wiki", "/a/b.txt", 0.7, "files"), ("c4", "tfds:c4/en:3.1.0", 0.3, "tfds"),
      ("y", "/x/y.jsonl.gz", 1.0, "files")]
  assert S.parse_sources("tfds:c4/en:3.1.0[validation]")[0].split == "validation"
  with pytest.raises(DataError, match="unique"):
    S.parse_sources("a=/x.txt,a=/y.txt")
  with pytest.raises(DataError, match="positive"):
    S.parse_sources("a=/x.txt@0")


def test_mixture_weights_are_respected(tmp_path, tok):
  (tmp_path / "a.txt").write_text("".join(f"alpha {i}\n" for i in range(50)))
  (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"beta {i}"}) + "\n"
                                            for i in range(500)))
  spec = f"a={tmp_path}/a.txt@0.7,b={tmp_path}/b.jsonl@0.3"
  docs = P.document_dataset(P.open_sources(spec), seed=0, shuffle=True, shard_index=0,
                            shard_count=1)
  first = _first(docs, 2000)  # source a repeats 28 times, b about 1.2 times
  frac_a = np.mean([d.startswith("alpha") for d in first])
  assert abs(frac_a - 0.7) < 0.02, frac_a
  # and the mixed stream trains: batches come out with both sources' tokens
  it = P.make_train_iterator(_cfg(spec), tok, batch_size=2, seq_len=32, seed=0, shard_count=1)
  batches = _take(it, 30)
  decoded = " ".join(tok.decode(_row_tokens(b).reshape(-1)) for b in batches)
  assert "alpha" in decoded and "beta" in decoded


# ----------------------------------------------------------------------------- formats / bad input


def test_formats_and_compression(tmp_path):
  text = "first doc\nstill first\n\nsecond doc\n\n\nthird\n"
  (tmp_path / "p.txt").write_text(text)
  assert S.read_file_documents(str(tmp_path / "p.txt"), "paragraphs") == [
      "first doc\nstill first", "second doc", "third"]
  assert S.read_file_documents(str(tmp_path / "p.txt"), "lines") == [
      "first doc", "still first", "second doc", "third"]
  with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
    f.write('{"text": "a b"}\n\n{"text": "c", "meta": 1}\n')
  assert S.read_file_documents(str(tmp_path / "d.jsonl.gz"), "lines") == ["a b", "c"]
  assert S.read_file_documents(str(tmp_path / "*.gz"), "lines") == ["a b", "c"]
  zstandard = pytest.importorskip("zstandard")
  (tmp_path / "d.jsonl.zst").write_bytes(
      zstandard.ZstdCompressor().compress(b'{"text": "z1"}\n{"text": "z2"}\n'))
  assert S.read_file_documents(str(tmp_path / "d.jsonl.zst"), "lines") == ["z1", "z2"]


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", r"empty.txt: no documents"),
    ("blank.txt", b"\n  \n\n", r"blank.txt: no documents"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext.jsonl: line 2: .*no 'text' field.*body"),
    ("badjson.jsonl", b'{"text": "ok"}\n{"text": \n', r"badjson.jsonl: line 2: not valid JSON"),
    ("num.jsonl", b'{"text": 5}\n', r"num.jsonl: line 1: .*not a string"),
    ("latin1.txt", b"good line\nbad \xe9 line\n", r"latin1.txt: line 2: .*UTF-8 at byte offset 14"),
    ("bad.gz", b"this is not gzip", r"bad.gz: .*(corrupt|gzip)"),
])
def test_bad_input_names_the_file(tmp_path, tok, name, content, match):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(DataError, match=match):
    P.make_train_iterator(_cfg(str(tmp_path / name)), tok, batch_size=2, seq_len=16, seed=0,
                          shard_count=1)


def test_missing_sources_and_bad_tokenizer(tmp_path, tok):
  for spec, match in [(f"{tmp_path}/nope.txt", "file not found: .*nope.txt"),
                      (f"{tmp_path}/*.jsonl", "no file matches"),
                      (f"ok={WIKI_VALID},gone={tmp_path}/gone.txt@2", "file not found: .*gone.txt"),
                      (str(tmp_path), "no shard files in this directory"),
                      ("tfds:no_such_dataset_xyz", "tfds dataset 'no_such_dataset_xyz' not found")]:
    with pytest.raises(DataError, match=match):
      P.make_train_iterator(_cfg(spec, tfds_data_dir=str(tmp_path)), tok, batch_size=2,
                            seq_len=16, seed=0, shard_count=1)
  with pytest.raises(DataError, match="valid.txt is not a SentencePiece model"):
    Tokenizer(WIKI_VALID)
  with pytest.raises(DataError, match="cannot read .*missing.model"):
    Tokenizer(str(tmp_path / "missing.model"))
  assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- tokenizer


def test_train_tokenizer_on_shakespeare(tmp_path):
  path = train_tokenizer([SHAKESPEARE], str(tmp_path / "ts"), 256, input_sentence_size=4000)
  tok = Tokenizer(path)
  assert tok.vocab_size == 256 and (tok.bos_id, tok.eos_id) == (1, 2)
  ids = tok.encode("To be, or not to be")
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids) == "To be, or not to be"
  no_specials = Tokenizer(path, add_bos=False, add_eos=False)
  assert no_specials.encode("To be") == ids[1:3] or no_specials.encode("To be")[0] != 1
  with pytest.raises(DataError, match="failed"):
    train_tokenizer([SHAKESPEARE], str(tmp_path / "big"), 10**6, input_sentence_size=500)


# ----------------------------------------------------------------------------- ArrayRecord / TFDS


def test_prepare_arrayrecord_round_trip(tmp_path, tok):
  from peer_jax.data.prepare import prepare_dataset
  out = prepare_dataset("c4_sample", {"train": [C4], "validation": [WIKI_VALID]},
                        str(tmp_path / "tfds"), num_shards=2)
  assert sorted(f for f in os.listdir(out) if "train.array_record" in f) == [
      "c4_sample-train.array_record-00000-of-00002", "c4_sample-train.array_record-00001-of-00002"]
  local = S.read_file_documents(C4, "lines")
  by_dir = S.open_source(S.parse_sources(out)[0])
  by_name = S.open_source(S.parse_sources("tfds:c4_sample")[0], tfds_data_dir=str(tmp_path / "tfds"))
  assert len(by_dir) == len(by_name) == len(local) == 1000
  assert list(by_dir[:]) == local and by_name[999] == local[999]
  # The fast converter (--workers) writes byte for byte the records TFDS writes.
  from array_record.python import array_record_module
  from peer_jax.data.prepare import example_bytes
  reader = array_record_module.ArrayRecordReader(
      os.path.join(out, "c4_sample-train.array_record-00000-of-00002"))
  n = reader.num_records()
  assert [example_bytes(d) for d in local[:n]] == reader.read(list(range(n)))
  valid = S.open_source(S.parse_sources(f"{out}[validation]")[0])
  assert list(valid[:]) == S.read_file_documents(WIKI_VALID, "lines")
  # Training from ArrayRecord equals training from the file, and resumes exactly.
  kw = dict(batch_size=2, seq_len=64, seed=0, shard_count=1)
  from_records = P.make_train_iterator(_cfg(out), tok, **kw)
  from_file = P.make_train_iterator(_cfg(C4), tok, **kw)
  first = _take(from_records, 5)
  _assert_same(first, _take(from_file, 5))
  state = from_records.get_state()
  after = _take(from_records, 3)
  resumed = P.make_train_iterator(_cfg(out), tok, **kw)
  resumed.set_state(state)
  _assert_same(_take(resumed, 3), after)
  with pytest.raises(DataError, match="already exists"):
    prepare_dataset("c4_sample", {"train": [C4]}, str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="notext.jsonl: line 1"):
    (tmp_path / "notext.jsonl").write_text('{"body": 1}\n')
    prepare_dataset("bad", {"train": [str(tmp_path / "notext.jsonl")]}, str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------- evaluation


def test_eval_every_target_once_and_hosts_agree(tok):
  docs = S.read_file_documents(WIKI_VALID, "lines")[:300]
  expected_targets = sum(len(tok.encode(d)) - 1 for d in docs)
  full = list(P.EvalIterator(docs, tok, batch_size=4, seq_len=64, shard_count=1, shard_index=0))
  assert sum(b["mask"].sum() for b in full) == expected_targets
  # Each row holds whole windows: segments never continue into the next row.
  hosts = [list(P.EvalIterator(docs, tok, batch_size=4, seq_len=64, shard_index=h,
                               shard_count=2)) for h in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(full)
  for f, h0, h1 in zip(full, *hosts):
    for k in f:
      np.testing.assert_array_equal(f[k], np.concatenate([h0[k], h1[k]]))
  limited = list(P.make_eval_iterator({}, tok, WIKI_VALID, batch_size=4, seq_len=64,
                                      max_batches=3, shard_count=1))
  assert len(limited) == 3
  for k in limited[0]:
    np.testing.assert_array_equal(limited[0][k], full[0][k])
  assert P.eval_sources("v=/a.txt,tfds:c4/en:3.1.0")["c4_en"].split == "validation"


def test_eval_windows_overlap_by_one():
  w = P.eval_windows(np.arange(10), 4)
  assert [list(x) for x in w] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
  assert P.eval_windows(np.arange(1), 4) == []


# ----------------------------------------------------------------------------- compatibility


def test_text_data_iterator_and_global_batch_still_work(tok):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  it = P.TextDataIterator(WIKI_VALID, "lines", tok, batch_size=4, seq_len=32, seed=1)
  b = next(it)
  assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
      "inputs": ((4, 32), "int32"), "targets": ((4, 32), "int32"),
      "positions": ((4, 32), "int32"), "segment_ids": ((4, 32), "int32"),
      "mask": ((4, 32), "float32")}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  g = P.global_batch(b, lambda ndim: NamedSharding(mesh, PartitionSpec("data")))
  np.testing.assert_array_equal(np.asarray(g["inputs"]), b["inputs"])
  state = it.get_state()
  nxt = next(it)
  it.set_state(state)
  _assert_same([next(it)], [nxt])


def test_parallel_conversion_resumes_and_equals_the_sequential_one(tmp_path):
  from peer_jax.data.prepare import prepare_dataset_parallel
  from tests.test_streaming import make_corpus
  make_corpus(str(tmp_path / "in"), 4, (20, 30))
  bad = tmp_path / "in" / "part-00002.json.gz"
  good = bad.read_bytes()
  bad.write_bytes(gzip.compress(b'{"text": "fine"}\n{"body": "no text"}\n'))
  messages = []
  with pytest.raises(DataError, match=r"part-00002.json.gz: line 2: .*no 'text' field"):
    prepare_dataset_parallel("par", {"train": [f"{tmp_path}/in/*"]}, str(tmp_path / "out"),
                             workers=1, progress=messages.append)
  parts = tmp_path / "out" / "par" / "1.0.0.parts"
  assert sorted(f for f in os.listdir(parts) if f.endswith(".json")) == [
      "train-00000.array_record.json", "train-00001.array_record.json"]
  bad.write_bytes(good)  # fixed: the rerun converts only what is left
  messages.clear()
  out = prepare_dataset_parallel("par", {"train": [f"{tmp_path}/in/*"]}, str(tmp_path / "out"),
                                 workers=1, progress=messages.append)
  assert messages[0] == "4 input files, 2 already converted (resuming)"
  assert not parts.exists()
  records = S.open_source(S.parse_sources(out)[0])
  assert list(records[:]) == S.read_file_documents(f"{tmp_path}/in/*", "lines")
  assert len(records) == sum(len(S.read_file_documents(f, "lines"))
                             for f in sorted(glob.glob(f"{tmp_path}/in/*")))
  with pytest.raises(DataError, match="already exists"):
    prepare_dataset_parallel("par", {"train": [f"{tmp_path}/in/*"]}, str(tmp_path / "out"),
                             workers=1)


@pytest.mark.slow
def test_prepare_data_script_in_parallel_and_its_bad_flags(tmp_path):
  import subprocess
  import sys
  from tests.test_streaming import make_corpus
  make_corpus(str(tmp_path / "in"), 4, (20, 30))
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "prepare_data.py")

  def run(*args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=600)

  ok = run("--name=par", f"--output_dir={tmp_path}/out", f"--train={tmp_path}/in/*",
           "--workers=2")
  assert ok.returncode == 0, ok.stderr[-2000:]
  records = S.open_source(S.parse_sources(f"{tmp_path}/out/par/1.0.0")[0])
  assert list(records[:]) == S.read_file_documents(f"{tmp_path}/in/*", "lines")
  (tmp_path / "afile").write_text("x")
  for args, message in [
      (["--name=Bad"], "error: command line: --name=Bad: use lower_case"),
      ([f"--output_dir={tmp_path}/afile"], "--output_dir=.*afile: is a file"),
      (["--version=1.0"], "--version=1.0: not a version of the form x.y.z"),
      (["--num_shards=0"], "--num_shards=0: must be >= 1"),
      (["--workers=-1"], "--workers=-1: must be >= 0"),
      ([f"--train={tmp_path}/none/*.gz"], "--train=.*: no file matches"),
  ]:
    base = {"name": "--name=x", "output_dir": f"--output_dir={tmp_path}/o2",
            "train": f"--train={tmp_path}/in/*"}
    for a in args:
      base[a.split("=")[0][2:]] = a
    r = run(*base.values(), *[a for a in args if a.split("=")[0][2:] not in base])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert __import__("re").search(message, r.stderr), r.stderr


def test_tfds_text_feature_is_text_or_the_one_text_feature():
  """TFDS `lambada` keeps its passages in `passage`: the one Text feature is read."""
  import tensorflow_datasets as tfds
  from peer_jax.data.sources import DataError, _text_feature
  F = tfds.features
  assert _text_feature(F.FeaturesDict({"text": F.Text(), "url": F.Text()}), "d") == "text"
  assert _text_feature(F.FeaturesDict({"passage": F.Text(), "id": F.Scalar(np.int64)}),
                       "d") == "passage"
  with pytest.raises(DataError, match="d: no 'text' feature, and 2 text features"):
    _text_feature(F.FeaturesDict({"a": F.Text(), "b": F.Text()}), "d")
