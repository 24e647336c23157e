"""Parse the text of an optimized HLO module (`compiled.as_text()`) into instructions,
computations and the StackFrames tables; array shapes and their sizes in bytes.

Pure text processing (no jax import). The byte model and the categories built on it are in
peer_jax/hlo_bytes.py.
"""

import dataclasses
import re

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
    "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "token": 0,
}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+|f4e\w+|token)\[([0-9,]*)\]")


def array_bytes(shape: str) -> float:
  """Bytes of every array in an HLO shape string (a tuple sums its arrays)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * DTYPE_BYTES.get(dtype, 1 if dtype.startswith(("f8", "f4")) else 4)
  return total


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list
  attrs: str
  frame: int = 0
  op_name: str = ""


def _balanced(s: str, i: int) -> int:
  """Index just past the bracket group opening at s[i] (strings may hold brackets)."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack, j, in_str = [], i, False
  while j < len(s):
    c = s[j]
    if in_str:
      if c == "\\":
        j += 1
      elif c == '"':
        in_str = False
    elif c == '"':
      in_str = True
    elif c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return j + 1
    j += 1
  return len(s)


def _split_top(s: str) -> list[str]:
  """Split on commas not inside brackets or strings."""
  out, depth, cur, in_str = [], 0, [], False
  for c in s:
    if in_str:
      cur.append(c)
      in_str = c != '"'
      continue
    if c == '"':
      in_str = True
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      out.append("".join(cur).strip())
      cur = []
      continue
    cur.append(c)
  if cur and "".join(cur).strip():
    out.append("".join(cur).strip())
  return out


_LINE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def parse_instr(line: str) -> Instr | None:
  m = _LINE.match(line)
  if not m:
    return None
  rest = line[m.end():]
  # The result shape: a tuple in parentheses, or one array with an optional {layout}.
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    sp = re.match(r"[\w]+\[[0-9,]*\]", rest)
    end = sp.end() if sp else rest.index(" ")
    if end < len(rest) and rest[end] == "{":
      end = _balanced(rest, end)
  shape, rest = rest[:end], rest[end:].lstrip()
  om = re.match(r"([\w\-]+)\(", rest)
  if not om:
    return None
  opcode = om.group(1)
  close = _balanced(rest, om.end() - 1)
  operand_text = rest[om.end():close - 1]
  operands = []
  for o in _split_top(operand_text):
    nm = re.search(r"%?([\w.\-]+)\s*$", o)
    if nm:
      operands.append(nm.group(1))
  attrs = rest[close:]
  fm = re.search(r"stack_frame_id=(\d+)", attrs)
  on = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
  return Instr(m.group(2), shape, opcode, operands, attrs, int(fm.group(1)) if fm else 0,
               on.group(1) if on else "")


@dataclasses.dataclass
class Module:
  computations: dict          # name -> list[Instr]
  entry: str
  frames: dict                # stack frame id -> (file, function, line, parent id)
  roots: dict                 # computation name -> its ROOT instruction's name

  def stack(self, frame: int) -> list[tuple[str, str, int]]:
    """(file, function, line) from innermost to outermost."""
    out, seen = [], set()
    while frame and frame in self.frames and frame not in seen:
      seen.add(frame)
      f, fn, ln, parent = self.frames[frame]
      out.append((f, fn, ln))
      frame = parent
    return out


def _tables(lines):
  """The module's FileNames / FunctionNames / FileLocations / StackFrames tables."""
  tables, cur = {}, None
  for line in lines:
    s = line.strip()
    if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      cur = tables.setdefault(s, {})
      continue
    if cur is None:
      continue
    m = re.match(r"^(\d+)\s+(.*)$", s)
    if not m:
      cur = None
      continue
    cur[int(m.group(1))] = m.group(2)
  files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
  funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
  locs = {}
  for k, v in tables.get("FileLocations", {}).items():
    g = dict(re.findall(r"(\w+)=(\d+)", v))
    locs[k] = (files.get(int(g.get("file_name_id", 0)), "?"),
               funcs.get(int(g.get("function_name_id", 0)), "?"), int(g.get("line", 0)))
  frames = {}
  for k, v in tables.get("StackFrames", {}).items():
    g = dict(re.findall(r"(\w+)=(\d+)", v))
    f, fn, ln = locs.get(int(g.get("file_location_id", 0)), ("?", "?", 0))
    # XLA prints parent_frame_id one above the parent's id (0 = no parent).
    frames[k] = (f, fn, ln, int(g.get("parent_frame_id", 0)) - 1)
  return frames


_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")


def parse_module(text: str) -> Module:
  lines = text.splitlines()
  comps, roots, entry, cur, cname = {}, {}, None, None, None
  for line in lines:
    head = _HEAD.match(line)
    if head and not line.startswith(" "):
      cname = head.group(2)
      cur = comps.setdefault(cname, [])
      if head.group(1):
        entry = cname
      continue
    if line.startswith("}"):
      cur = None
      continue
    if cur is not None:
      ins = parse_instr(line)
      if ins:
        cur.append(ins)
        if line.lstrip().startswith("ROOT"):
          roots[cname] = ins.name
  return Module(comps, entry, _tables(lines), roots)
