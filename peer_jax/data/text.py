"""Documents from local text files (kept for older callers; see peer_jax/data/sources.py)."""

from peer_jax.data.sources import DataError, read_file_documents


def read_documents(path: str, text_format: str) -> list[str]:
  """All non-empty documents of a file (or glob), in file order.

  `lines`: each non-blank line is a document (WikiText paragraphs, tiny corpora).
  `paragraphs`: blocks separated by blank lines. `jsonl`: the `text` field of each line
  (also chosen automatically for .jsonl/.json files). `.gz`/`.zst` files are decompressed.
  Raises DataError (a ValueError) naming the file for anything unreadable or empty.
  """
  return read_file_documents(path, text_format)


__all__ = ["DataError", "read_documents"]
