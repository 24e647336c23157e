"""Convert local text / JSON-lines corpora into a TFDS dataset stored as ArrayRecord shards.

TFDS builds it without TensorFlow: a small `GeneratorBasedBuilder` whose one feature is
`text`, generated under the given name in `DATA_DIR/NAME/VERSION/`. Training then reads it
with random access, either by directory (`data.train_path=DATA_DIR/NAME/1.0.0`) or by name
(`data.train_path=tfds:NAME`, `data.tfds_data_dir=DATA_DIR`). Documents keep file order
(`disable_shuffling`), so eval sets stay in order; training shuffles at read time.
"""

import os
import re
import types

from peer_jax.data.sources import DataError, expand_files, iter_file_documents

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _builder_class(name: str, version: str, split_files: dict[str, list[str]], text_format: str):
  import tensorflow_datasets as tfds

  def body(ns):
    ns["name"] = name
    ns["VERSION"] = tfds.core.Version(version)
    ns["RELEASE_NOTES"] = {version: "Prepared by peer_jax scripts/prepare_data.py."}

    def _info(self):
      files = {split: [os.path.abspath(f) for f in fs] for split, fs in split_files.items()}
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"Local text corpus prepared by peer_jax from {files}",
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(files) for split, files in split_files.items()}

    def _generate_examples(self, files):
      for file_index, path in enumerate(files):
        count = 0
        for doc_index, text in enumerate(iter_file_documents(path, text_format)):
          count += 1
          yield f"{file_index:05d}_{doc_index:09d}", {"text": text}
        if count == 0:
          raise DataError(f"{path}: no documents found (empty file?)")

    ns.update(_info=_info, _split_generators=_split_generators,
              _generate_examples=_generate_examples)

  camel = "".join(p.capitalize() for p in name.split("_")) or "Corpus"
  return types.new_class(camel, (tfds.core.GeneratorBasedBuilder,),
                         {"skip_registration": True}, body)


def prepare_dataset(name: str, split_inputs: dict[str, list[str]], data_dir: str, *,
                    text_format: str = "lines", version: str = "1.0.0",
                    num_shards: int | None = None, overwrite: bool = False) -> str:
  """Write DATA_DIR/NAME/VERSION (ArrayRecord); returns that directory.

  `split_inputs` maps a split name (`train`, `validation`, ...) to files or globs.
  """
  import tensorflow_datasets as tfds

  if not _NAME_RE.match(name):
    raise DataError(f"dataset name {name!r}: use lower_case letters, digits and '_' "
                    f"(a TFDS name)")
  if not split_inputs:
    raise DataError("no input files given")
  split_files = {split: [f for p in pats for f in expand_files(p)]
                 for split, pats in split_inputs.items()}
  cls = _builder_class(name, version, split_files, text_format)
  builder = cls(data_dir=data_dir, file_format="array_record")
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  if builder.is_prepared() and not overwrite:
    raise DataError(f"{builder.data_dir} already exists; pass --overwrite to rebuild it")
  config = tfds.download.DownloadConfig(download_mode=mode, num_shards=num_shards)
  try:
    builder.download_and_prepare(download_config=config)
  except DataError:
    raise
  except Exception as e:  # TFDS wraps generator errors; surface ours unchanged
    cause = e
    while cause is not None and not isinstance(cause, DataError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None:
      raise cause from None
    raise
  return str(builder.data_dir)
