#!/usr/bin/env python
"""Convert local text / JSON-lines files into an ArrayRecord dataset that training reads
with random access (a TFDS dataset; TensorFlow is not needed).

  python scripts/prepare_data.py --name=wikitext2 --output_dir=DATA_DIR \\
      --train=../shared/data/wikitext-2/train.txt --validation=../shared/data/wikitext-2/valid.txt

  python scripts/prepare_data.py --name=pile --output_dir=DATA_DIR \\
      --train='pile/train/*.jsonl.zst' --validation=pile/val.jsonl.zst

  python scripts/prepare_data.py --name=c4_en --output_dir=DATA_DIR --workers=16 \\
      --train='c4/en/c4-train.*-of-01024.json.gz'     # parallel, resumable

Inputs: .txt (one document per line, or per blank-line block with --text_format=paragraphs),
.jsonl/.json (a `text` field per line), each optionally .gz or .zst. Writes
DATA_DIR/NAME/VERSION/; train with

  --config.data.train_path=DATA_DIR/NAME/VERSION          (a directory source), or
  --config.data.train_path=tfds:NAME --config.data.tfds_data_dir=DATA_DIR
and evaluate with `--config.data.eval_paths=valid=DATA_DIR/NAME/VERSION[validation]`.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

_NAME = flags.DEFINE_string("name", None, "Dataset name (lower_case, a TFDS name).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "TFDS data_dir to write into (local or gs://).")
_TRAIN = flags.DEFINE_multi_string("train", [], "Files or globs for the train split.")
_VALID = flags.DEFINE_multi_string("validation", [], "Files or globs for the validation split.")
_TEST = flags.DEFINE_multi_string("test", [], "Files or globs for the test split.")
_FORMAT = flags.DEFINE_enum("text_format", "lines", ["lines", "paragraphs", "jsonl"],
                            "Documents of .txt files: one per line or per blank-line block "
                            "(.jsonl/.json files are always JSON lines).")
_VERSION = flags.DEFINE_string("version", "1.0.0", "Dataset version (x.y.z).")
_SHARDS = flags.DEFINE_integer("num_shards", None, "Number of ArrayRecord shards per split "
                               "(default: TFDS picks by size; not with --workers).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Convert the input files in this many parallel "
                                "processes, one ArrayRecord shard per input file, without "
                                "TFDS's builder; resumable (an interrupted run keeps its "
                                "finished files: run the same command again). 0: one TFDS "
                                "build in this process.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild an existing dataset.")


class UsageError(ValueError):
  """A bad flag: one line naming it, exit 2."""


def check_flags() -> dict[str, list[str]]:
  """Every flag checked, before anything is read or written; returns the split inputs."""
  from peer_jax.data.prepare import VERSION_RE, _NAME_RE
  from peer_jax.data.sources import DataError, expand_files
  if not _NAME.value:
    raise UsageError("--name is required (the dataset's lower_case TFDS name)")
  if not _NAME_RE.match(_NAME.value):
    raise UsageError(f"--name={_NAME.value}: use lower_case letters, digits and '_' "
                     "(a TFDS name), starting with a letter")
  if not _OUTPUT.value:
    raise UsageError("--output_dir is required (the TFDS data_dir to write into)")
  out = os.path.expanduser(_OUTPUT.value)
  if "://" not in out and os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--output_dir={_OUTPUT.value}: is a file, not a directory")
  if not VERSION_RE.match(_VERSION.value or ""):
    raise UsageError(f"--version={_VERSION.value}: not a version of the form x.y.z (e.g. 1.0.0)")
  if _SHARDS.value is not None and _SHARDS.value < 1:
    raise UsageError(f"--num_shards={_SHARDS.value}: must be >= 1")
  if _WORKERS.value < 0:
    raise UsageError(f"--workers={_WORKERS.value}: must be >= 0")
  if _WORKERS.value and _SHARDS.value is not None:
    raise UsageError(f"--num_shards={_SHARDS.value}: not with --workers (which writes one "
                     "shard per input file)")
  if _WORKERS.value and "://" in out:
    raise UsageError(f"--workers needs a local --output_dir (got {_OUTPUT.value}); write "
                     "locally, then copy with `gsutil -m cp -r`")
  splits = {k: v for k, v in (("train", _TRAIN.value), ("validation", _VALID.value),
                              ("test", _TEST.value)) if v}
  if not splits:
    raise UsageError("no input files: give at least one of --train, --validation, --test")
  for split, patterns in splits.items():
    for pattern in patterns:
      try:
        expand_files(os.path.expanduser(pattern))
      except DataError as e:
        raise UsageError(f"--{split}={pattern}: {e}") from None
  return {k: [os.path.expanduser(p) for p in v] for k, v in splits.items()}


def convert() -> None:
  from peer_jax.data.prepare import prepare_dataset, prepare_dataset_parallel
  splits = check_flags()
  out = os.path.expanduser(_OUTPUT.value)
  t0 = time.time()
  if _WORKERS.value:
    path = prepare_dataset_parallel(
        _NAME.value, splits, out, workers=_WORKERS.value, text_format=_FORMAT.value,
        version=_VERSION.value, overwrite=_OVERWRITE.value,
        progress=lambda msg: print(msg, flush=True))
  else:
    path = prepare_dataset(_NAME.value, splits, out, text_format=_FORMAT.value,
                           version=_VERSION.value, num_shards=_SHARDS.value,
                           overwrite=_OVERWRITE.value)
  print(f"wrote {path} in {time.time() - t0:.1f}s; train with "
        f"--config.data.train_path={path}")


def main(argv) -> None:
  from peer_jax.cli import exit_now, run_or_explain
  def run():
    if len(argv) > 1:
      raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    convert()

  code = run_or_explain(run, usage_errors=(UsageError,))
  if code:
    exit_now(code)


if __name__ == "__main__":
  from peer_jax.cli import run_main
  run_main(main)
