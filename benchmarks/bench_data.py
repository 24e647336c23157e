"""Input-pipeline throughput: tokens/s of packed batches delivered to the training loop, and
the raw read rate (MB/s of decompressed JSON lines) of streaming shards.

  python -m benchmarks.bench_data                   # every case, ~5 s each
  python -m benchmarks.bench_data --cases=stream_gz,memory --seconds=10

Streaming cases read a synthetic corpus written to a temporary directory: the bundled C4
sample (1,000 documents) cut into 64 shards, `--copies` times over, as .json.gz or .jsonl.zst.
"""

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.base import SHARED_DATA  # noqa: E402

C4 = f"{SHARED_DATA}/c4_en_sample/c4-train.00000-of-01024.first1000.jsonl"
WIKI = f"{SHARED_DATA}/wikitext-2/train.txt"
SPM = f"{SHARED_DATA}/tokenizers/c4_en_32k_spm.model"


def write_corpus(directory: str, ext: str, copies: int, shards: int = 64) -> int:
  """The C4 sample as `shards` shards per copy; returns the decompressed size in bytes."""
  import zstandard
  with open(C4, "rb") as f:
    lines = [l for l in f if l.strip()]
  os.makedirs(directory, exist_ok=True)
  total = 0
  for c in range(copies):
    for s in range(shards):
      data = b"".join(lines[s::shards])
      total += len(data)
      path = os.path.join(directory, f"c4-{c:02d}-{s:05d}{ext}")
      blob = gzip.compress(data, 6) if ext.endswith(".gz") else \
          zstandard.ZstdCompressor(level=3).compress(data)
      with open(path, "wb") as f:
        f.write(blob)
  return total


def tokens_per_second(data_cfg, batch: int, seq_len: int, seconds: float) -> float:
  from peer_jax.data import Tokenizer, make_train_iterator
  it = make_train_iterator(data_cfg, Tokenizer(SPM), batch_size=batch, seq_len=seq_len,
                           seed=0, shard_count=1)
  next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  rate = n * batch * seq_len / (time.perf_counter() - t0)
  it.close()
  return rate


def read_mb_per_second(directory: str, nbytes: int) -> float:
  from peer_jax.data import streaming
  src = streaming.StreamSource(directory)
  t0 = time.perf_counter()
  docs = streaming.lane_documents(src, range(4), 4, seed=0)
  dt = time.perf_counter() - t0
  assert docs
  return nbytes / dt / 1e6


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  ap.add_argument("--cases", default="memory,memory_b32x2048,stream_gz,stream_zst,"
                  "stream_gz_b32x2048,stream_gz_threads2,mixture,read_gz,read_zst",
                  help="comma-separated cases to run (default: all)")
  ap.add_argument("--seconds", type=float, default=5.0,
                  help="how long each tokens/s case is timed, after its first batch")
  ap.add_argument("--copies", type=int, default=2,
                  help="copies of the C4 sample in the streaming corpus (64 shards each)")
  args = ap.parse_args(argv)
  cases = args.cases.split(",")
  tmp = tempfile.mkdtemp(prefix="bench_data_")
  sizes = {}
  for ext, key in ((".json.gz", "gz"), (".jsonl.zst", "zst")):
    if any(c.endswith(key) or f"_{key}_" in c or c == "mixture" for c in cases):
      sizes[key] = write_corpus(os.path.join(tmp, key), ext, args.copies)
  base = {"text_format": "lines", "shuffle": True, "num_threads": 0, "prefetch": 2,
          "shuffle_buffer": 256}
  specs = {
      "memory": ({**base, "train_path": WIKI}, 8, 128),
      "memory_b32x2048": ({**base, "train_path": WIKI}, 32, 2048),
      "stream_gz": ({**base, "train_path": f"{tmp}/gz"}, 8, 128),
      "stream_zst": ({**base, "train_path": f"{tmp}/zst"}, 8, 128),
      "stream_gz_b32x2048": ({**base, "train_path": f"{tmp}/gz"}, 32, 2048),
      "stream_gz_threads2": ({**base, "train_path": f"{tmp}/gz", "num_threads": 2}, 8, 128),
      "mixture": ({**base, "train_path": f"c4={tmp}/gz@0.6,pile={tmp}/zst@0.4"}, 8, 128),
  }
  print(f"| case | batch x seq_len | rate |\n|---|---|---|")
  for case in cases:
    if case in specs:
      cfg, b, l = specs[case]
      rate = tokens_per_second(cfg, b, l, args.seconds)
      print(f"| {case} | {b} x {l} | {rate:,.0f} tokens/s |", flush=True)
    elif case.startswith("read_"):
      key = case[5:]
      rate = read_mb_per_second(os.path.join(tmp, key), sizes[key])
      print(f"| {case} | (no tokenization) | {rate:.1f} MB/s of JSON lines |", flush=True)
    else:
      raise SystemExit(f"error: unknown case {case!r}")


if __name__ == "__main__":
  main()
