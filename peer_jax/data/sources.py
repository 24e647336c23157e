"""Where documents come from: local text / JSON-lines files (optionally .gz/.zst), prepared
ArrayRecord (TFDS) directories and TFDS datasets by name, and weighted mixtures of them.

A *source spec* is one string (config keys `data.train_path`, `data.eval_paths`):

    SOURCE                                   one source
    NAME=SOURCE@WEIGHT,NAME=SOURCE@WEIGHT    a mixture (NAME= and @WEIGHT are optional)

SOURCE is one of
  * a local file or glob: `.txt` (documents per line or per blank-line block, see
    `data.text_format`), `.jsonl`/`.json` (one JSON object with a `text` field per line),
    each optionally compressed `.gz` (stdlib) or `.zst` (needs the `zstandard` package);
  * a directory written by scripts/prepare_data.py (or any TFDS dataset directory, the one
    holding `dataset_info.json`), read with random access from its ArrayRecord shards;
  * `tfds:NAME[:VERSION]`, e.g. `tfds:c4/en:3.1.0`, read with
    `tfds.data_source(NAME, data_dir=data.tfds_data_dir)` (ArrayRecord format).
A directory or TFDS source may end in `[SPLIT]` (default: `train` for training, `validation`
for evaluation). Every problem with a source is one `DataError` naming the file or dataset.
"""

import dataclasses
import glob
import gzip
import io
import json
import os
import re
from typing import Sequence

JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")
TEXT_FORMATS = ("lines", "paragraphs", "jsonl")


class DataError(ValueError):
  """A data source that cannot be read; the message names the file or dataset."""


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  source: str  # path, glob, directory or tfds:NAME
  weight: float = 1.0
  split: str | None = None  # for directory / tfds sources

  @property
  def kind(self) -> str:
    """tfds | dir (prepared ArrayRecord) | stream (read sequentially) | files (in memory)."""
    if self.source.startswith("tfds:"):
      return "tfds"
    if self.source.startswith("stream:") or "://" in self.source:
      return "stream"
    if os.path.isdir(self.source):
      return "dir" if _is_prepared_dir(self.source) else "stream"
    return "files"


_NAME_RE = re.compile(r"^([A-Za-z_][\w.\-]*)=(.+)$")
_SPLIT_RE = re.compile(r"^(.*)\[([\w\-:%+.]+)\]$")


def _parse_item(item: str, default_split: str | None) -> SourceSpec:
  name, source, weight = "", item, 1.0
  m = _NAME_RE.match(item)
  if m and not os.path.exists(item):
    name, source = m.group(1), m.group(2)
  if "@" in source:
    head, _, tail = source.rpartition("@")
    try:
      weight = float(tail)
      source = head
    except ValueError:
      pass
    if not weight > 0 or weight != weight or weight == float("inf"):
      raise DataError(f"source {item!r}: the weight after '@' must be a positive number")
  split = default_split
  m = _SPLIT_RE.match(source)
  if m and not os.path.exists(source):
    source, split = m.group(1), m.group(2)
  source = source.strip()
  if not source:
    raise DataError(f"source {item!r}: empty path")
  if not name:
    if source.startswith("tfds:"):
      name = source[5:].split(":")[0].replace("/", "_")
    else:
      path = source[len("stream:"):] if source.startswith("stream:") else source
      base = os.path.basename(path.rstrip("/"))
      if any(c in base for c in "*?["):
        base = os.path.basename(os.path.dirname(path.rstrip("/")))
      for suffix in COMPRESSED_SUFFIXES + JSONL_SUFFIXES + (".txt",):
        if base.endswith(suffix):
          base = base[:-len(suffix)]
      name = base or "data"
  return SourceSpec(name=name, source=source, weight=weight, split=split)


def parse_sources(spec: str, default_split: str | None = "train") -> list[SourceSpec]:
  """'a=PATH@0.7,b=tfds:c4/en:3.1.0@0.3' -> [SourceSpec, ...] (weights as given)."""
  items = [s.strip() for s in str(spec or "").split(",") if s.strip()]
  if not items:
    raise DataError("no data source given (empty path)")
  specs = [_parse_item(item, default_split) for item in items]
  names = [s.name for s in specs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise DataError(f"source names must be unique in a mixture, repeated: {', '.join(dupes)} "
                    f"(name them: NAME=PATH@WEIGHT)")
  return specs


def check_sources(spec: str, default_split: str | None = "train") -> list[SourceSpec]:
  """Parse a spec and check that every local file or directory exists (cheap; no reading)."""
  specs = parse_sources(spec, default_split)
  for s in specs:
    if s.kind == "files":
      expand_files(s.source)
    elif s.kind == "stream":
      from peer_jax.data.streaming import list_shards
      list_shards(s.source)
  return specs


def single_source(source, default_split: str = "validation") -> SourceSpec:
  """A SourceSpec, or a spec string naming exactly one source (eval sets take one)."""
  if isinstance(source, SourceSpec):
    return source
  specs = parse_sources(source, default_split=default_split)
  if len(specs) != 1:
    raise DataError(f"an eval source is one source, not a mixture: {source!r}")
  return specs[0]


def config_value(data_cfg, key: str, default):
  """data_cfg[key] if the config has it (ConfigDict, dict or object), else default."""
  if data_cfg is None:
    return default
  if isinstance(data_cfg, dict) or hasattr(data_cfg, "keys"):
    try:
      return data_cfg[key] if key in data_cfg else default
    except TypeError:
      pass
  return getattr(data_cfg, key, default)


# ----------------------------------------------------------------------------- local files


def expand_files(pattern: str) -> list[str]:
  if any(c in pattern for c in "*?["):
    files = sorted(glob.glob(pattern))
    if not files:
      raise DataError(f"no file matches {pattern}")
    return files
  if not os.path.exists(pattern):
    raise DataError(f"file not found: {pattern}")
  if os.path.isdir(pattern):
    raise DataError(f"{pattern} is a directory without dataset_info.json (not a prepared "
                    f"dataset; see scripts/prepare_data.py)")
  return [pattern]


def file_format(path: str, text_format: str) -> str:
  """'jsonl' for .jsonl/.json files (compressed or not), else `text_format`."""
  base = path
  for suffix in COMPRESSED_SUFFIXES:
    if base.endswith(suffix):
      base = base[:-len(suffix)]
  return "jsonl" if base.endswith(JSONL_SUFFIXES) else text_format


def open_binary(path: str) -> io.BufferedIOBase:
  """Open a local file for reading bytes, decompressing .gz and .zst transparently."""
  try:
    if path.endswith(".gz"):
      return gzip.open(path, "rb")
    if path.endswith(".zst"):
      try:
        import zstandard
      except ImportError:
        raise DataError(f"{path}: reading .zst files needs the zstandard package "
                        f"(pip install zstandard)") from None
      return io.BufferedReader(ZstdReader(open(path, "rb"), zstandard), buffer_size=1 << 16)
    return open(path, "rb")
  except OSError as e:
    raise DataError(f"{path}: cannot open ({e.strerror or e})") from None


class ZstdReader(io.RawIOBase):
  """Decompresses a .zst stream (one or more frames) and, unlike zstandard's stream_reader,
  raises EOFError when the input ends inside a frame (a truncated shard)."""

  def __init__(self, raw, zstandard):
    self._raw, self._zstd = raw, zstandard
    self._dobj = zstandard.ZstdDecompressor().decompressobj()
    self._pending, self._offset = b"", 0
    self._started = False  # inside a frame (input consumed since the last frame ended)

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    if self._offset >= len(self._pending):
      self._pending, self._offset = b"", 0
    while not self._pending:
      chunk = self._raw.read(1 << 16)
      if not chunk:
        if self._started and not self._dobj.eof:
          raise EOFError("the compressed stream ends inside a zstd frame (truncated file)")
        return 0
      while chunk:
        if self._dobj.eof:  # the next frame of a multi-frame file
          self._dobj = self._zstd.ZstdDecompressor().decompressobj()
        self._started = True
        self._pending += self._dobj.decompress(chunk)
        chunk = self._dobj.unused_data if self._dobj.eof else b""
    n = min(len(b), len(self._pending) - self._offset)
    b[:n] = self._pending[self._offset:self._offset + n]
    self._offset += n
    return n

  def close(self) -> None:
    self._raw.close()
    super().close()


def _decoded_lines(path: str):
  """(line number, text) for each line of a file; DataError on undecodable bytes."""
  offset = 0
  with open_binary(path) as f:
    try:
      for n, raw in enumerate(f, 1):
        try:
          yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{path}: line {n}: bytes are not valid UTF-8 at byte offset "
                          f"{offset + e.start} ({e.reason})") from None
        offset += len(raw)
    except (OSError, EOFError) as e:
      if isinstance(e, DataError):
        raise
      raise DataError(f"{path}: corrupt or truncated compressed file ({e})") from None
    except Exception as e:  # zstandard.ZstdError and friends
      if isinstance(e, DataError):
        raise
      raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def json_record_text(line: str, path: str, n: int, text_field: str = "text",
                     error=DataError) -> str:
  """The `text_field` string of one JSON-lines record (line `n` of `path`); `error(message)`
  naming file and line when the record has none (DataError here, the streaming reader's
  BadRecord there)."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise error(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict) or text_field not in obj:
    keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
    raise error(f"{path}: line {n}: JSON object has no {text_field!r} field "
                f"(found: {keys or 'nothing'})")
  text = obj[text_field]
  if not isinstance(text, str):
    raise error(f"{path}: line {n}: field {text_field!r} is a {type(text).__name__}, "
                f"not a string")
  return text


def iter_file_documents(path: str, text_format: str, text_field: str = "text"):
  """Yield the non-empty documents of one local file, in file order."""
  fmt = file_format(path, text_format)
  if fmt not in TEXT_FORMATS:
    raise DataError(f"unknown text format {fmt!r}; expected one of {', '.join(TEXT_FORMATS)}")
  if fmt == "lines":
    for _, line in _decoded_lines(path):
      if line.strip():
        yield line.strip()
  elif fmt == "paragraphs":
    current = []
    for _, line in _decoded_lines(path):
      if line.strip():
        current.append(line.rstrip("\r\n"))
      elif current:
        yield "\n".join(current)
        current = []
    if current:
      yield "\n".join(current)
  else:
    for n, line in _decoded_lines(path):
      if not line.strip():
        continue
      text = json_record_text(line, path, n, text_field)
      if text.strip():
        yield text


def read_file_documents(pattern: str, text_format: str, text_field: str = "text") -> list[str]:
  """All documents of the files matching `pattern`; DataError when there are none."""
  docs = []
  for path in expand_files(pattern):
    n_before = len(docs)
    docs.extend(iter_file_documents(path, text_format, text_field))
    if len(docs) == n_before:
      raise DataError(f"{path}: no documents found (empty file? format "
                      f"{file_format(path, text_format)!r})")
  return docs


# ----------------------------------------------------------------------------- TFDS / ArrayRecord


class TextRecords(Sequence):
  """Random-access view of a TFDS data source as str documents (the `text` feature)."""

  def __init__(self, source, description: str, text_field: str = "text"):
    self._source, self._description, self._field = source, description, text_field

  def __len__(self) -> int:
    return len(self._source)

  def _text(self, record, index: int) -> str:
    value = record.get(self._field) if isinstance(record, dict) else None
    if value is None:
      raise DataError(f"{self._description}: record {index} has no {self._field!r} feature")
    if isinstance(value, bytes):
      try:
        return value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{self._description}: record {index}: bytes are not valid UTF-8 at "
                        f"byte offset {e.start} ({e.reason})") from None
    return str(value)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(range(*index.indices(len(self))))
    return self._text(self._source[index], index)

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    records = self._source.__getitems__(list(indices))
    return [self._text(r, i) for r, i in zip(records, indices)]


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


def open_tfds(spec: SourceSpec, data_dir: str | None) -> TextRecords:
  tfds = _tfds()
  split = spec.split or "train"
  if spec.kind == "dir":
    desc = f"{spec.source}[{split}]"
    try:
      builder = tfds.builder_from_directory(_dataset_dir(spec.source))
    except Exception as e:
      raise DataError(f"{spec.source}: not a prepared dataset directory (expected "
                      f"dataset_info.json from scripts/prepare_data.py): {_first_line(e)}") from None
  else:
    name = spec.source[len("tfds:"):]
    desc = f"tfds:{name}[{split}]"
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:
      raise DataError(f"tfds dataset {name!r} not found (data_dir={data_dir or 'TFDS default'}): "
                      f"{_first_line(e)}. Prepare it first (docs/data.md).") from None
    if not builder.is_prepared():
      raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; run "
                      f"`tfds build {name.split(':')[0]} --file_format=array_record "
                      f"--data_dir=...` (docs/data.md)")
  if split not in builder.info.splits:
    raise DataError(f"{desc}: no split {split!r}; available: {', '.join(builder.info.splits)}")
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:
    raise DataError(f"{desc}: cannot open as ArrayRecord data source (prepared with "
                    f"file_format=array_record?): {_first_line(e)}") from None
  if len(source) == 0:
    raise DataError(f"{desc}: no documents")
  return TextRecords(source, desc, text_field=_text_feature(builder.info.features, desc))


def _text_feature(features, desc: str) -> str:
  """`text`, else the dataset's one Text feature (TFDS `lambada` keeps its passages in
  `passage`); several candidates and no `text` is an error naming them."""
  try:
    names = list(features.keys())
  except AttributeError:  # not a FeaturesDict: a single feature
    return "text"
  if "text" in names:
    return "text"
  texts = [n for n in names if type(features[n]).__name__ == "Text"]
  if len(texts) == 1:
    return texts[0]
  raise DataError(f"{desc}: no 'text' feature, and {len(texts)} text features "
                  f"({', '.join(texts) or 'none'}) to choose from; features: {', '.join(names)}")


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")


def _is_prepared_dir(path: str) -> bool:
  """Whether a local directory is (or holds versions of) a prepared TFDS dataset."""
  return os.path.isfile(os.path.join(_dataset_dir(path), "dataset_info.json"))


def _dataset_dir(path: str) -> str:
  """DIR itself if it holds dataset_info.json, else its newest VERSION subdirectory that does."""
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  versions = [d for d in os.listdir(path)
              if re.fullmatch(r"\d+\.\d+\.\d+", d)
              and os.path.isfile(os.path.join(path, d, "dataset_info.json"))]
  if versions:
    return os.path.join(path, max(versions, key=lambda v: tuple(map(int, v.split(".")))))
  return path


def open_source(spec: SourceSpec, *, text_format: str = "lines",
                tfds_data_dir: str | None = None, bad_records: str = "error") -> Sequence[str]:
  """A random-access sequence of documents (str) for one source (for a streaming source: a
  StreamSource, which the pipeline reads lane by lane, and which iterates its documents in
  shard order)."""
  if spec.kind == "stream":
    from peer_jax.data.streaming import StreamSource
    return StreamSource(spec.source, name=spec.name, text_format=text_format,
                        bad_records=bad_records)
  if spec.kind == "files":
    return read_file_documents(spec.source, text_format)
  return open_tfds(spec, tfds_data_dir)
