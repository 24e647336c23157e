"""Streaming sources and the lane layout: exact resume, a data order independent of the number
of processes (and resume on another count), disjoint per-process reads covering the epoch,
records split within shards, mixtures, bounded memory, every kind of bad shard, `gs://`
through the file-system layer. The corpus is hundreds of tiny .jsonl.zst / .json.gz shards
made from the bundled WikiText-2 validation text."""

import collections
import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs.base import SHARED_DATA
from peer_jax.data import pipeline as P
from peer_jax.data import streaming as ST
from peer_jax.data.sources import DataError, parse_sources
from peer_jax.data.tokenizer import Tokenizer

zstandard = pytest.importorskip("zstandard")

SPM = f"{SHARED_DATA}/tokenizers/c4_en_32k_spm.model"
WIKI_VALID = f"{SHARED_DATA}/wikitext-2/valid.txt"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines():
  with open(WIKI_VALID, encoding="utf-8") as f:
    return [l.strip()[:160] for l in f if l.strip()]


def write_shard(path: str, records: list, raw: bytes | None = None) -> None:
  """A shard of JSON records, compressed by its extension; `raw` bytes are written as given."""
  data = raw
  if raw is None:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.endswith(".zst"):
      data = zstandard.ZstdCompressor(level=1).compress(data)
    elif path.endswith(".gz"):
      data = gzip.compress(data, compresslevel=1)
  with open(path, "wb") as f:
    f.write(data)


def make_corpus(directory, num_shards: int, docs_per_shard=(3, 8), prefix="doc",
                lines=None) -> list[str]:
  """num_shards shards alternating .jsonl.zst / .json.gz; returns every document."""
  os.makedirs(directory, exist_ok=True)
  lines = lines or _lines()
  docs, k = [], 0
  lo, hi = docs_per_shard
  for i in range(num_shards):
    n = lo + (i * 7) % (hi - lo + 1)
    shard = [{"text": f"{prefix} {k + j}: {lines[(k + j) % len(lines)]}", "meta": i}
             for j in range(n)]
    k += n
    docs += [r["text"] for r in shard]
    ext = ".jsonl.zst" if i % 2 else ".json.gz"
    write_shard(os.path.join(directory, f"part-{i:05d}{ext}"), shard)
  return docs


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(SPM)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("stream") / "c4like")
  return d, make_corpus(d, 240)


def _cfg(path, **kw):
  return {"train_path": path, "text_format": "lines", "shuffle": True, "num_threads": 0,
          "prefetch": 2, "tfds_data_dir": "", "shuffle_buffer": 8, **kw}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _global(batches_per_host):
  """Concatenate the hosts' local batches of each step into the global batch."""
  return [{k: np.concatenate([b[k] for b in step]) for k in step[0]}
          for step in zip(*batches_per_host)]


# ----------------------------------------------------------------------------- specs


def test_streaming_specs(corpus, tmp_path):
  d, _ = corpus
  for spec in (d, f"stream:{d}/*.zst", "gs://bucket/c4/en/c4-train.*.json.gz"):
    assert parse_sources(spec)[0].kind == "stream"
  assert parse_sources(f"stream:{d}/*.zst")[0].name == "c4like"
  mix = parse_sources(f"c4=stream:{d}/*.gz@0.7,pile={d}@0.3")
  assert [(s.name, s.kind, s.weight) for s in mix] == [("c4", "stream", 0.7), ("pile", "stream", 0.3)]
  assert len(ST.list_shards(d)) == 240 and len(ST.list_shards(f"stream:{d}/*.zst")) == 120
  with pytest.raises(DataError, match="no file matches"):
    ST.list_shards(f"{tmp_path}/*.jsonl.zst")
  with pytest.raises(DataError, match="no shard files in this directory"):
    ST.list_shards(str(tmp_path))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_threads,prefetch", [(0, 2), (2, 0)])
def test_exact_resume_after_n_batches(corpus, tok, num_threads, prefetch):
  d, _ = corpus
  cfg = _cfg(d, num_threads=num_threads, prefetch=prefetch)
  kw = dict(batch_size=4, seq_len=32, seed=7, shard_count=1)
  expected = _take(P.make_train_iterator(cfg, tok, **kw), 40)
  it = P.make_train_iterator(cfg, tok, **kw)
  states = [json.loads(json.dumps(it.get_state()))]
  for _ in range(30):
    next(it)
    states.append(json.loads(json.dumps(it.get_state())))
  # positions inside a window, at window starts, with and without a half-packed document
  windows = {json.dumps(st["lanes"]["0"]["parent_state"]) for st in states}
  assert len(windows) > 5
  for n in (0, 1, 5, 12, 23, 30):
    resumed = P.make_train_iterator(cfg, tok, **kw)
    resumed.set_state(states[n])
    _assert_same(_take(resumed, 10), expected[n:n + 10])
  _assert_same(_take(it, 3), expected[30:33])


def test_resume_across_epochs_of_a_small_corpus(tmp_path, tok):
  d = str(tmp_path / "small")
  make_corpus(d, 12, docs_per_shard=(2, 4))
  cfg = _cfg(d, shuffle_buffer=3)
  kw = dict(batch_size=4, seq_len=16, seed=1, shard_count=1)
  expected = _take(P.make_train_iterator(cfg, tok, **kw), 60)  # several epochs per lane
  it = P.make_train_iterator(cfg, tok, **kw)
  _take(it, 37)
  state = it.get_state()
  assert max(l["parent_state"]["start"][0] for l in state["lanes"].values()) >= 1
  resumed = P.make_train_iterator(cfg, tok, **kw)
  resumed.set_state(state)
  _assert_same(_take(resumed, 23), expected[37:])


# ----------------------------------------------------------------------------- processes


@pytest.mark.parametrize("kind", ["stream", "memory"])
def test_global_batches_do_not_depend_on_the_process_count(corpus, tmp_path, tok, kind):
  d, docs = corpus
  if kind == "memory":  # the same guarantee for sources read into memory
    path = tmp_path / "all.txt"
    path.write_text("".join(t + "\n" for t in docs[:300]))
    d = str(path)
  cfg = _cfg(d)
  kw = dict(batch_size=8, seq_len=32, seed=3)
  one = _take(P.make_train_iterator(cfg, tok, shard_count=1, **kw), 12)
  for count in (2, 4, 8):
    hosts = [P.make_train_iterator(cfg, tok, shard_index=h, shard_count=count, **kw)
             for h in range(count)]
    _assert_same(_global([_take(h, 12) for h in hosts]), one)


def test_resume_on_another_process_count_continues_the_stream(corpus, tok):
  d, _ = corpus
  cfg = _cfg(d)
  kw = dict(batch_size=8, seq_len=32, seed=3)
  expected = _take(P.make_train_iterator(cfg, tok, shard_count=1, **kw), 20)
  two = [P.make_train_iterator(cfg, tok, shard_index=h, shard_count=2, **kw) for h in range(2)]
  for h in two:
    _take(h, 9)
  saved = {f"data_{h}": json.loads(json.dumps(it.get_state())) for h, it in enumerate(two)}
  for count in (1, 4):  # fewer and more processes than saved
    hosts = []
    for h in range(count):
      it = P.make_train_iterator(cfg, tok, shard_index=h, shard_count=count, **kw)
      it.set_state(P.merge_process_states(saved, h, count))
      hosts.append(it)
    _assert_same(_global([_take(h, 11) for h in hosts]), expected[9:])
  # Without the other processes' states a process refuses, naming both counts.
  four = P.make_train_iterator(cfg, tok, shard_index=3, shard_count=4, **kw)
  with pytest.raises(DataError, match=r"rows 0\.\.3 .*saved by 2 processes.*process 3 of 4 "
                                      r"now needs rows 6\.\.7"):
    four.set_state(saved["data_0"])


def _owners(src, num_lanes, hosts, epoch_docs):
  shares = []
  per = num_lanes // hosts
  for h in range(hosts):
    shares.append(ST.lane_documents(src, range(h * per, (h + 1) * per), num_lanes, seed=5))
  for a in range(hosts):
    for b in range(a + 1, hosts):
      assert set(shares[a]).isdisjoint(shares[b])
  assert sorted(sum(shares, [])) == sorted(epoch_docs)
  return shares


def test_two_processes_read_disjoint_records_covering_the_epoch(corpus):
  d, docs = corpus
  src = ST.StreamSource(d)
  shares = _owners(src, num_lanes=8, hosts=2, epoch_docs=docs)
  assert abs(len(shares[0]) - len(shares[1])) < 0.2 * len(docs)
  # Each process opens only its whole shards.
  meta = [set() for _ in range(2)]
  for h in range(2):
    for lane in range(4 * h, 4 * h + 4):
      for piece in src.plan(lane, 8, epoch=0, seed=5, shuffle=True):
        assert piece.stride == 1
        meta[h].add(piece.shard)
  assert meta[0].isdisjoint(meta[1]) and len(meta[0] | meta[1]) == 240


def test_fewer_shards_than_lanes_splits_records_within_shards(tmp_path):
  d = str(tmp_path / "few")
  docs = make_corpus(d, 3, docs_per_shard=(20, 31))
  src = ST.StreamSource(d)
  _owners(src, num_lanes=8, hosts=2, epoch_docs=docs)
  _owners(src, num_lanes=8, hosts=8, epoch_docs=docs)
  strides = sorted({p.stride for lane in range(8) for p in src.plan(lane, 8, 0, 5, True)})
  assert strides == [2, 3]  # 8 lanes over 3 shards: 3 + 3 + 2 readers


def test_shard_order_is_reshuffled_every_epoch(corpus):
  d, docs = corpus
  src = ST.StreamSource(d)
  plans = [[p.shard for lane in range(8) for p in src.plan(lane, 8, e, 5, True)]
           for e in range(3)]
  assert sorted(plans[0]) == sorted(plans[1]) == list(range(240))
  assert plans[0] != plans[1] != plans[2]
  two_epochs = collections.Counter(ST.lane_documents(src, range(8), 8, seed=5, num_epochs=2))
  assert set(two_epochs) == set(docs) and set(two_epochs.values()) == {2}
  # The window shuffle reorders records inside a lane; shuffle=False keeps file order.
  it = iter(ST.StreamLaneDataset(src, lane=0, num_lanes=8, seed=5, shuffle_buffer=16))
  shuffled = [next(it) for _ in range(64)]
  assert sorted(shuffled) != shuffled and set(shuffled) <= set(docs)


# ----------------------------------------------------------------------------- mixtures


def test_mixture_of_two_streaming_sources(tmp_path, tok):
  make_corpus(str(tmp_path / "c4"), 40, prefix="c4doc")
  make_corpus(str(tmp_path / "pile"), 60, prefix="piledoc")
  spec = f"c4={tmp_path}/c4@0.7,pile=stream:{tmp_path}/pile/*.zst@0.3"
  opened = P.open_sources(spec)
  docs = P.document_dataset(opened, seed=0, shuffle=True, shard_index=0, shard_count=2,
                            shuffle_buffer=4)
  it = iter(docs)
  first = [next(it) for _ in range(400)]
  frac = np.mean([d.startswith("c4doc") for d in first])
  assert abs(frac - 0.7) < 0.02, frac
  cfg = _cfg(spec)
  kw = dict(batch_size=4, seq_len=32, seed=0, shard_count=1)
  ref = _take(P.make_train_iterator(cfg, tok, **kw), 12)
  it2 = P.make_train_iterator(cfg, tok, **kw)
  _take(it2, 5)
  resumed = P.make_train_iterator(cfg, tok, **kw)
  resumed.set_state(it2.get_state())
  _assert_same(_take(resumed, 7), ref[5:])
  text = " ".join(tok.decode(b["inputs"].reshape(-1)) for b in ref)
  assert "c4doc" in text and "piledoc" in text


def test_eval_from_a_streaming_source_reads_every_shard_in_order(tmp_path, tok):
  d = str(tmp_path / "valid")
  docs = make_corpus(d, 5)
  flat = tmp_path / "valid.txt"
  flat.write_text("".join(t + "\n" for t in docs))
  a = list(P.make_eval_iterator({}, tok, d, batch_size=2, seq_len=32))
  b = list(P.make_eval_iterator({}, tok, str(flat), batch_size=2, seq_len=32))
  _assert_same(a, b)


# ----------------------------------------------------------------------------- file system


def test_gs_paths_go_through_the_file_system_layer(corpus, monkeypatch, tok):
  """A `gs://` spec is listed and opened through etils.epath (here mapped onto a local dir)."""
  d, _ = corpus
  from etils import epath
  seen = []

  def fake_epath(path):
    seen.append(path)
    assert path.startswith("gs://bucket/c4") or path.startswith(d), path
    return epath.Path(path.replace("gs://bucket/c4", d))

  monkeypatch.setattr(ST, "_epath", fake_epath)
  spec = "gs://bucket/c4/part-*.zst"
  cfg = _cfg(spec)
  kw = dict(batch_size=4, seq_len=32, seed=0, shard_count=1)
  remote = _take(P.make_train_iterator(cfg, tok, **kw), 4)
  local = _take(P.make_train_iterator(_cfg(f"stream:{d}/part-*.zst"), tok, **kw), 4)
  _assert_same(remote, local)
  assert any(p.startswith("gs://bucket/c4") for p in seen)


# ----------------------------------------------------------------------------- memory


_RSS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    from peer_jax.data import streaming as ST
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
      with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
    src = ST.StreamSource({path!r})
    before, peak, n, kept = rss(), 0, 0, []
    lanes = [iter(ST.StreamLaneDataset(src, lane=l, num_lanes=4, seed=0, shuffle_buffer=64,
                                       num_epochs=1)) for l in range(4)]
    for it in lanes:
      for i, doc in enumerate(it):
        n += len(doc)
        if {keep}:
          kept.append(doc)  # the control: what reading into memory costs
        if i % 50 == 0:
          peak = max(peak, rss())
    peak = max(peak, rss())
    print(json.dumps({{"growth": peak - before, "chars": n}}))
""")


def _stream_peak(path, keep=False):
  code = _RSS_SCRIPT.format(repo=REPO, path=path, keep=keep)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_traced_memory_is_one_window_per_lane(tmp_path):
  """Python allocations while streaming a corpus stay far below the corpus size."""
  import tracemalloc
  lines = [(l * 8)[:1200] for l in _lines()[:400]]
  docs = make_corpus(str(tmp_path / "c"), 120, (20, 30), lines=lines)
  size = sum(map(len, docs))
  src = ST.StreamSource(str(tmp_path / "c"))
  lanes = [iter(ST.StreamLaneDataset(src, lane=l, num_lanes=4, seed=0, shuffle_buffer=16,
                                     num_epochs=1)) for l in range(4)]
  tracemalloc.start()
  try:
    n = sum(len(d) for it in lanes for d in it)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert n == size > 2_000_000
  assert peak < min(1 << 20, size / 4), (peak, size)


@pytest.mark.slow
def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
  lines = [(l * 8)[:1200] for l in _lines()[:400]]
  make_corpus(str(tmp_path / "small"), 8, (20, 30), lines=lines)
  make_corpus(str(tmp_path / "big"), 120, (20, 30), lines=lines)
  small, big = _stream_peak(str(tmp_path / "small")), _stream_peak(str(tmp_path / "big"))
  kept = _stream_peak(str(tmp_path / "big"), keep=True)
  assert big["chars"] > 10 * small["chars"] and big["chars"] > 2_000_000
  # Keeping the big corpus in memory grows RSS by about its size; streaming it grows RSS
  # by less than 1 MB more than streaming a corpus 15x smaller.
  assert kept["growth"] > big["chars"] / 2, kept
  assert big["growth"] - small["growth"] < min(1 << 20, kept["growth"] / 3), (small, big, kept)


# ----------------------------------------------------------------------------- bad shards


def _bad_corpus(tmp_path, name, raw):
  d = tmp_path / "bad"
  make_corpus(str(d), 4)
  write_shard(str(d / name), [], raw=raw)
  return str(d)


def _truncated(path_ext, text):
  if path_ext == ".gz":
    return gzip.compress(text)[:-30]
  return zstandard.ZstdCompressor().compress(text)[:-12]


GOOD = b"".join(json.dumps({"text": f"fine record {i} " + "x" * 50}).encode() + b"\n"
                for i in range(400))


@pytest.mark.parametrize("name,raw,match", [
    ("zz-trunc.jsonl.gz", None, r"zz-trunc.jsonl.gz: line \d+: corrupt or truncated"),
    ("zz-trunc.jsonl.zst", None, r"zz-trunc.jsonl.zst: line \d+: (corrupt or truncated|cannot read)"),
    ("zz-notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"zz-notext.jsonl: line 2: .*no 'text' field.*body"),
    ("zz-badjson.jsonl", b'{"text": "ok"}\n\n{"text": \n', r"zz-badjson.jsonl: line 3: not valid JSON"),
    ("zz-latin1.jsonl", b'{"text": "ok \xe9"}\n', r"zz-latin1.jsonl: line 1: .*UTF-8"),
    ("zz-notgzip.jsonl.gz", b"plain bytes, not gzip", r"zz-notgzip.jsonl.gz: line 1: corrupt"),
    ("zz-empty.jsonl", b"", r"zz-empty.jsonl: no documents"),
])
def test_each_bad_shard_is_one_error_naming_shard_and_line(tmp_path, tok, name, raw, match):
  if raw is None:
    raw = _truncated(os.path.splitext(name)[1], GOOD)
  d = _bad_corpus(tmp_path, name, raw)
  # one lane reads every shard, so the bad one is reached within a few batches
  it = P.make_train_iterator(_cfg(d, shuffle=False), tok, batch_size=1, seq_len=64, seed=0,
                             shard_count=1)
  with pytest.raises(DataError, match=match):
    _take(it, 400)
  # bad_records=skip: skipped and counted, never silently
  src = ST.StreamSource(d, bad_records="skip")
  reader = ST.LaneReader(src, lane=0, num_lanes=1, seed=0, shuffle=False, num_epochs=1)
  got = reader.read(10**6)
  assert reader.skipped >= 1 and len(got) >= 4 * 3


def test_a_shard_that_vanishes_mid_run_is_reported(tmp_path, tok):
  d = str(tmp_path / "c")
  make_corpus(d, 6)
  it = P.make_train_iterator(_cfg(d, shuffle=False, prefetch=0), tok, batch_size=1,
                             seq_len=16, seed=0, shard_count=1)
  next(it)
  os.remove(os.path.join(d, "part-00005.jsonl.zst"))
  with pytest.raises(DataError, match=r"part-00005.jsonl.zst: shard not found .*vanish"):
    _take(it, 500)


def test_bad_specs_fail_at_validation(tmp_path):
  from configs.base import get_config
  from peer_jax.config_validation import ConfigError, validate_data as validate
  cfg = get_config()
  cfg.data.train_path = f"stream:{tmp_path}/*.jsonl.zst"
  with pytest.raises(ConfigError, match=r"data.train_path: no file matches"):
    validate(cfg)
  cfg.data.train_path = WIKI_VALID
  cfg.data.bad_records = "ignore"
  with pytest.raises(ConfigError, match=r"data.bad_records: unknown value 'ignore'"):
    validate(cfg)
  cfg.data.bad_records = "skip"
  cfg.data.shuffle_buffer = 0
  with pytest.raises(ConfigError, match=r"data.shuffle_buffer: must be an integer >= 1"):
    validate(cfg)


def test_skipped_records_are_counted_in_the_state(tmp_path, tok):
  d = _bad_corpus(tmp_path, "zz-notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n{"id": 3}\n')
  cfg = _cfg(d, shuffle=False, bad_records="skip", prefetch=0)
  it = P.make_train_iterator(cfg, tok, batch_size=1, seq_len=64, seed=0, shard_count=1)
  assert it.skipped_records() == 0
  _take(it, 60)  # several epochs of this small corpus: 2 bad records each
  n = it.skipped_records()
  assert n >= 2 and n % 2 == 0
  resumed = P.make_train_iterator(cfg, tok, batch_size=1, seq_len=64, seed=0, shard_count=1)
  resumed.set_state(it.get_state())
  assert resumed.skipped_records() == n


def test_a_state_from_another_pipeline_is_a_refusal_not_damage(corpus, tok):
  from peer_jax.config_validation import ConfigError
  d, _ = corpus
  it = P.make_train_iterator(_cfg(d), tok, batch_size=4, seq_len=32, seed=0, shard_count=1)
  for bad in ({"format": "peer_jax.data/1", "grain": {}},
              {**it.get_state(), "fingerprint": {"seed": 1}}):
    with pytest.raises(ConfigError, match="cannot resume exactly"):
      it.set_state(bad)


def test_plain_and_text_shards_resume_by_byte_offset(tmp_path, tok):
  """Uncompressed shards are resumed by seeking to the saved byte offset."""
  lines = _lines()
  d = tmp_path / "plain"
  d.mkdir()
  for i in range(6):
    (d / f"p{i}.jsonl").write_text("".join(json.dumps({"text": f"plain {i}.{j} {lines[i * 40 + j]}"})
                                           + "\n" for j in range(40)))
    (d / f"t{i}.txt").write_text("".join(f"text {i}.{j} {lines[j]}\n\n" for j in range(30)))
  cfg = _cfg(str(d), shuffle_buffer=5)
  kw = dict(batch_size=2, seq_len=32, seed=4, shard_count=1)
  expected = _take(P.make_train_iterator(cfg, tok, **kw), 40)
  it = P.make_train_iterator(cfg, tok, **kw)
  _take(it, 17)
  state = it.get_state()
  assert any(l["parent_state"]["start"][3] > 0 for l in state["lanes"].values())  # mid-shard
  resumed = P.make_train_iterator(cfg, tok, **kw)
  resumed.set_state(state)
  _assert_same(_take(resumed, 23), expected[17:])


@pytest.mark.parametrize("text_format", ["lines", "paragraphs"])
def test_streamed_documents_equal_the_in_memory_ones(tmp_path, text_format):
  from peer_jax.data.sources import read_file_documents
  path = tmp_path / "x.txt.gz"
  body = "first doc\nstill first\n\nsecond doc\n\n\nthird\n  \nfourth\n"
  path.write_bytes(gzip.compress(body.encode()))
  src = ST.StreamSource(str(path), text_format=text_format)
  assert list(src) == read_file_documents(str(path), text_format)
  assert ST.lane_documents(src, [0], 1, seed=0, shuffle=False) == list(src)


def test_eval_from_a_stream_reports_bad_shards(tmp_path, tok):
  d = _bad_corpus(tmp_path, "zz-empty.jsonl", b"")
  with pytest.raises(DataError, match="zz-empty.jsonl: no documents found"):
    list(P.make_eval_iterator({}, tok, d, batch_size=2, seq_len=32))
  assert list(P.make_eval_iterator({"bad_records": "skip"}, tok, d, batch_size=2, seq_len=32))
