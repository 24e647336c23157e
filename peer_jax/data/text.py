"""Documents from local text files: one per line, per blank-line-separated block, or JSON lines."""

import json


def read_documents(path: str, text_format: str) -> list[str]:
  """All non-empty documents of a file, in file order.

  `lines`: each non-blank line is a document (WikiText paragraphs, tiny corpora).
  `paragraphs`: blocks separated by blank lines. `jsonl`: the `text` field of each line.
  """
  with open(path, encoding="utf-8") as f:
    if text_format == "lines":
      return [line.strip() for line in f if line.strip()]
    if text_format == "paragraphs":
      blocks, current = [], []
      for line in f:
        if line.strip():
          current.append(line.rstrip("\n"))
        elif current:
          blocks.append("\n".join(current))
          current = []
      if current:
        blocks.append("\n".join(current))
      return blocks
    if text_format == "jsonl":
      docs = []
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from None
        if text.strip():
          docs.append(text)
      return docs
  raise ValueError(f"unknown text format {text_format!r}")
