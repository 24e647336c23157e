"""One shard's records for the streaming reader (streaming.py): where a reader is
(`Position`), the raw records from a position (`read_records`) and their documents
(`decode_record`). A record that cannot be read or decoded raises `BadRecord` naming the
shard and line; the reader turns it into a DataError or a counted skip."""

import dataclasses
import zlib

from peer_jax.data.sources import DataError, json_record_text


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a lane's reader is: epoch, piece of that epoch's plan, and inside its shard the
  number of lines consumed, the (decompressed) byte offset and the next record's index."""
  epoch: int = 0
  piece: int = 0
  line: int = 0
  byte: int = 0
  record: int = 0

  def to_json(self) -> list[int]:
    return [self.epoch, self.piece, self.line, self.byte, self.record]

  @classmethod
  def from_json(cls, v) -> "Position":
    return cls(*(int(x) for x in v))


class BadRecord(Exception):
  """A record that could not be parsed (internal: becomes DataError or a skip)."""


def read_records(f, path: str, fmt: str, line: int, byte: int, record: int):
  """(text or None, lines_after, bytes_after, record_index) for each record from a position.

  A record is a non-blank line (jsonl, lines) or a blank-line separated block (paragraphs);
  the text is decoded lazily by the caller (`None` here means "not decoded").
  """
  n, offset = line, byte
  para: list[bytes] = []
  start = 0
  try:
    for raw in f:
      n += 1
      offset += len(raw)
      if fmt == "paragraphs":
        if raw.strip():
          if not para:
            start = n
          para.append(raw)
          continue
        if not para:
          continue
        yield b"".join(para), start, n, offset, record
        para = []
        record += 1
      elif raw.strip():
        yield raw, n, n, offset, record
        record += 1
  except DataError:
    raise
  except (OSError, EOFError, zlib.error) as e:
    raise BadRecord(f"{path}: line {n + 1}: corrupt or truncated compressed shard "
                    f"({type(e).__name__}: {e})") from None
  except Exception as e:  # zstandard.ZstdError and friends
    raise BadRecord(f"{path}: line {n + 1}: cannot read shard ({type(e).__name__}: {e})") from None
  if para:
    yield b"".join(para), start, n, offset, record


def decode_record(raw: bytes, path: str, line: int, fmt: str, text_field: str = "text") -> str:
  """The document of one raw record; BadRecord (naming shard and line) when it has none."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecord(f"{path}: line {line}: bytes are not valid UTF-8 at byte offset "
                    f"{e.start} of the line ({e.reason})") from None
  if fmt == "lines":
    return text.strip()
  if fmt == "paragraphs":
    return "\n".join(l.rstrip("\r") for l in text.split("\n") if l.strip())
  return json_record_text(text, path, line, text_field, error=BadRecord)
