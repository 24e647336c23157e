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


# ----------------------------------------------------------------------------- parallel, resumable

VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
PARTS_SUFFIX = ".parts"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_FEATURES = {"featuresDict": {"features": {"text": {
    "pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}}}},
    "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict"}


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def example_bytes(text: str) -> bytes:
  """The serialized tf.train.Example {"text": bytes} of one document, byte for byte what
  TFDS writes for a `Text` feature (without TFDS's per-example feature machinery)."""
  t = text.encode("utf-8")
  values = b"\x0a" + _varint(len(t)) + t                       # BytesList.value
  feature = b"\x0a" + _varint(len(values)) + values            # Feature.bytes_list
  entry = b"\x0a\x04text\x12" + _varint(len(feature)) + feature  # map entry: key, value
  features = b"\x0a" + _varint(len(entry)) + entry             # Features.feature
  return b"\x0a" + _varint(len(features)) + features           # Example.features


def _convert_file(path: str, out: str, text_format: str) -> dict:
  """One input file -> one ArrayRecord shard `out` (+ `out.json` with its counts); a
  worker's task. Written under temporary names and renamed, so a finished part is whole."""
  import json
  from array_record.python import array_record_module
  tmp = out + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  count = nbytes = 0
  try:
    for text in iter_file_documents(path, text_format):
      record = example_bytes(text)
      writer.write(record)
      count += 1
      nbytes += len(record)
  finally:
    writer.close()
  if count == 0:
    os.remove(tmp)
    raise DataError(f"{path}: no documents found (empty file?)")
  os.replace(tmp, out)
  info = {"records": count, "bytes": nbytes, "input": os.path.abspath(path)}
  with open(out + ".json.tmp", "w") as f:
    json.dump(info, f)
  os.replace(out + ".json.tmp", out + ".json")
  return info


def prepare_dataset_parallel(name: str, split_inputs: dict[str, list[str]], data_dir: str, *,
                             workers: int, text_format: str = "lines", version: str = "1.0.0",
                             overwrite: bool = False, progress=None) -> str:
  """Like `prepare_dataset`, without TFDS's builder: every input file becomes one ArrayRecord
  shard, written `workers` at a time in separate processes into DATA_DIR/NAME/VERSION.parts/;
  the shards are then moved into the dataset DATA_DIR/NAME/VERSION (same documents, same
  order: files as given, each in file order) and its dataset_info.json written, readable by
  TFDS as any prepared dataset. Run again after an interruption or a bad file, it resumes:
  finished shards are kept."""
  import concurrent.futures
  import json
  import multiprocessing
  import shutil

  if not _NAME_RE.match(name):
    raise DataError(f"dataset name {name!r}: use lower_case letters, digits and '_' "
                    f"(a TFDS name)")
  if not split_inputs:
    raise DataError("no input files given")
  split_files = {split: [f for p in pats for f in expand_files(p)]
                 for split, pats in split_inputs.items()}
  final = os.path.join(data_dir, name, version)
  parts = final + PARTS_SUFFIX
  if os.path.isfile(os.path.join(final, "dataset_info.json")):
    if not overwrite:
      raise DataError(f"{final} already exists; pass --overwrite to rebuild it")
    shutil.rmtree(final)
  if overwrite and os.path.isdir(parts):
    shutil.rmtree(parts)
  os.makedirs(parts, exist_ok=True)
  tasks = [(split, i, path, os.path.join(parts, f"{split}-{i:05d}.array_record"))
           for split, files in split_files.items() for i, path in enumerate(files)]
  todo = [t for t in tasks if not os.path.isfile(t[3] + ".json")]
  if progress:
    done = len(tasks) - len(todo)
    progress(f"{len(tasks)} input files, {done} already converted (resuming)" if done
             else f"{len(tasks)} input files")
  if todo and workers <= 1:
    for n, (_, _, path, out) in enumerate(todo, 1):
      _convert_file(path, out, text_format)
      if progress:
        progress(f"converted {n}/{len(todo)}: {path}")
  elif todo:
    # fork: the workers need no imports of their own (nothing here has started threads)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method)) as pool:
      futures = {pool.submit(_convert_file, path, out, text_format): path
                 for _, _, path, out in todo}
      try:
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
          future.result()
          if progress:
            progress(f"converted {n}/{len(todo)}: {futures[future]}")
      except BaseException:
        for f in futures:
          f.cancel()
        raise
  # Merge: move the shards into the dataset directory, numbered in input order.
  os.makedirs(final, exist_ok=True)
  splits = []
  for split, files in split_files.items():
    mine = [t for t in tasks if t[0] == split]
    lengths, nbytes = [], 0
    for k, (_, _, _, out) in enumerate(mine):
      with open(out + ".json") as f:
        info = json.load(f)
      lengths.append(int(info["records"]))
      nbytes += int(info["bytes"])
      dest = os.path.join(final, f"{name}-{split}.array_record-{k:05d}-of-{len(mine):05d}")
      if os.path.exists(out):
        shutil.move(out, dest)
      elif not os.path.exists(dest):  # neither there nor moved by an interrupted merge
        raise DataError(f"{out}: converted shard missing; delete {parts} and run again")
    splits.append({"filepathTemplate": _TEMPLATE, "name": split, "numBytes": str(nbytes),
                   "shardLengths": [str(n) for n in lengths]})
  files = {split: [os.path.abspath(f) for f in fs] for split, fs in split_files.items()}
  info = {"description": f"Local text corpus prepared by peer_jax from {files}",
          "disableShuffling": True, "fileFormat": "array_record", "moduleName": "peer_jax",
          "name": name,
          "releaseNotes": {version: "Prepared by peer_jax scripts/prepare_data.py --workers."},
          "splits": splits, "version": version}
  with open(os.path.join(final, "features.json"), "w") as f:
    json.dump(_FEATURES, f, indent=4)
  with open(os.path.join(final, "dataset_info.json.tmp"), "w") as f:
    json.dump(info, f, indent=2)
  os.replace(os.path.join(final, "dataset_info.json.tmp"),
             os.path.join(final, "dataset_info.json"))
  shutil.rmtree(parts)
  return final
