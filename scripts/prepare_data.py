#!/usr/bin/env python
"""Convert local text / JSON-lines files into an ArrayRecord dataset that training reads
with random access (a TFDS dataset; TensorFlow is not needed).

  python scripts/prepare_data.py --name=wikitext2 --output_dir=DATA_DIR \\
      --train=../shared/data/wikitext-2/train.txt --validation=../shared/data/wikitext-2/valid.txt

  python scripts/prepare_data.py --name=pile --output_dir=DATA_DIR \\
      --train='pile/train/*.jsonl.zst' --validation=pile/val.jsonl.zst

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

from absl import app, flags

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
                               "(default: TFDS picks by size).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild an existing dataset.")
flags.mark_flags_as_required(["name", "output_dir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from peer_jax.data.prepare import prepare_dataset
  from peer_jax.data.sources import DataError
  splits = {k: v for k, v in (("train", _TRAIN.value), ("validation", _VALID.value),
                              ("test", _TEST.value)) if v}
  t0 = time.time()
  try:
    out = prepare_dataset(_NAME.value, splits, _OUTPUT.value, text_format=_FORMAT.value,
                          version=_VERSION.value, num_shards=_SHARDS.value,
                          overwrite=_OVERWRITE.value)
  except DataError as e:
    print(f"error: data: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out} in {time.time() - t0:.1f}s; train with "
        f"--config.data.train_path={out}")
  return 0


if __name__ == "__main__":
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
