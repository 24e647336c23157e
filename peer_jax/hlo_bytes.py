"""Where the bytes go: attribute an optimized HLO module's memory traffic to categories.

    from peer_jax import hlo_bytes
    rows = hlo_bytes.attribute(compiled.as_text(), table_rows=1024**2)
    totals = hlo_bytes.summarize(rows)          # {category: bytes}

Pure text processing (no jax import): the module is the text of `compiled.as_text()`, the
scheduled, fused, per-device program. Each instruction that touches memory (a fusion, an
unfused op, a collective) gets a byte count and one category:

  collectives, optimizer (tables / rest), scatter, gather, top-k/sort, table buffers
  (other ops on (N, ·) arrays: zero-init, casts, copies of the expert tables or their
  gradients), retrieval matmuls (the PEER/PKM query and key products), attention, dense
  matmuls, expert-path other (elementwise work of ops/experts.py, ops/sharded_experts.py),
  other.

The byte count follows XLA's HloCostAnalysis rules (operands read + result written; inside
a fusion a parameter read only through a slice / dynamic-slice counts the slice; in-place
dynamic-update-slice and scatter count the update, not the buffer). The TPU backend's own
cost model is not public, so the sum need not equal `cost_analysis()["bytes accessed"]`:
callers report the remainder. A `while` body is counted once, as HloCostAnalysis does
(`loop_mode="once"`), or times its known trip count (`loop_mode="trips"`: the traffic that
actually happens).

Categories come from the opcodes in an instruction (and its fused computation) and from the
Python stack XLA records for it (the module's StackFrames table, `stack_frame_id=`).
The text is parsed by peer_jax/hlo_parse.py.
"""

import dataclasses
import re
from collections import defaultdict

# The parser is its own module; these names stay importable from here.
from peer_jax.hlo_parse import (  # noqa: F401
    DTYPE_BYTES, Instr, Module, array_bytes, arrays, parse_instr, parse_module)

CATEGORIES = ("collectives", "optimizer (tables)", "optimizer (rest)", "scatter", "gather",
              "top-k/sort", "table buffers", "retrieval matmuls", "attention", "dense matmuls",
              "expert-path other", "other")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")

FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota"}


# ------------------------------------------------------------------------- byte model


def _called(attrs: str, key: str) -> list[str]:
  """Computations an attribute names: `calls=%f` or `branch_computations={%a, %b}`."""
  m = re.search(r"\b" + key + r"=(\{[^}]*\}|%?[\w.\-]+)", attrs)
  if not m:
    return []
  return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",") if c.strip()]


def trip_count(ins: Instr, mod: Module | None = None) -> int | None:
  """A while loop's trip count: XLA's known_trip_count, else read off its condition when
  that is `counter < constant` (jax's scan / map / fori_loop counters start at 0)."""
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', ins.attrs)
  if m:
    return int(m.group(1))
  if mod is None:
    return None
  cond = (_called(ins.attrs, "condition") or [""])[0]
  body = {b.name: b for b in mod.computations.get(cond, [])}
  root = body.get(mod.roots.get(cond, ""))
  if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
    return None
  for o in root.operands[1:]:
    c = body.get(o)
    if c is not None and c.opcode == "constant" and c.operands and c.operands[0].isdigit():
      return int(c.operands[0])
  return None


def tile_rows(shape: str) -> int:
  """Rows of one memory tile of a TPU layout: T(8,128) -> 8; T(8,128)(2,1) (bf16) -> 16.

  XLA's TPU cost model charges a gather or scatter of one row for the whole tile it lies
  in (calibrated on single-op compiles: docs/scaling.md); 1 without a tiled layout."""
  m = re.search(r":T\((\d+),\d+\)(?:\((\d+),1\))?", shape)
  if not m:
    return 1
  return int(m.group(1)) * int(m.group(2) or 1)


def _row_access(users_of, p: Instr, shapes: dict, tiles: bool):
  """Bytes a fusion parameter is read with (None: read in full, once)."""
  size, full = 0.0, False
  amp = tile_rows(p.shape) if tiles else 1
  for u in users_of(p.name):
    if u.opcode == "bitcast":
      sub, f = _row_access(users_of, u, shapes, tiles)
      size, full = size + sub, full or f
    elif u.opcode == "slice" or (u.opcode == "dynamic-slice" and u.operands[:1] == [p.name]):
      size += array_bytes(u.shape)
    elif u.opcode == "dynamic-update-slice" and u.operands[:1] == [p.name]:
      size += array_bytes(shapes.get(u.operands[1], ""))
    elif u.opcode == "scatter" and u.operands[:1] == [p.name]:
      size += amp * array_bytes(shapes.get(u.operands[-1], ""))   # the rows it updates
    elif u.opcode == "gather" and u.operands[:1] == [p.name]:
      size += amp * array_bytes(u.shape)   # the rows it returns (whole tiles on TPU)
    else:
      full = True
  return size, full


def _fusion_param_read(p: Instr, users: dict, shapes: dict, tiles: bool = True) -> float:
  """HloCostAnalysis::FusionParameterReadBytes: slices read their slice, in-place updates
  and gathers the rows they touch; every other use shares one full read."""
  size, full = _row_access(lambda n: users.get(n, []), p, shapes, tiles)
  return size + (array_bytes(p.shape) if full else 0.0)


def fusion_bytes(ins: Instr, mod: Module, shapes: dict, tiles: bool = True) -> float:
  cname = (_called(ins.attrs, "calls") or [""])[0]
  body = mod.computations.get(cname, [])
  params = {int(b.operands[0]): b for b in body
            if b.opcode == "parameter" and b.operands and b.operands[0].isdigit()}
  users = defaultdict(list)
  inner = {b.name: b.shape for b in body}
  for b in body:
    for o in b.operands:
      users[o].append(b)
  read = 0.0
  for i, op in enumerate(ins.operands):
    p = params.get(i)
    read += (_fusion_param_read(p, users, inner, tiles) if p is not None
             else array_bytes(shapes.get(op, "")))
  r = next((b for b in body if b.name == mod.roots.get(cname)), body[-1] if body else None)
  write = array_bytes(ins.shape)
  if r is not None and r.opcode in ("dynamic-update-slice", "scatter"):
    upd = r.operands[1] if r.opcode == "dynamic-update-slice" else r.operands[-1]
    amp = tile_rows(r.shape) if tiles and r.opcode == "scatter" else 1
    write = amp * array_bytes(inner.get(upd, ""))
  return read + write


def _op_bytes(ins: Instr, mod: Module, shapes: dict, tiles: bool = True) -> float:
  op = ins.opcode
  if op in FREE or op.endswith("-done") or op in ("while", "call", "conditional",
                                                   "async-start", "async-update", "async-done"):
    return 0.0
  if op == "fusion":
    return fusion_bytes(ins, mod, shapes, tiles)
  out = array_bytes(ins.shape)
  if op.endswith("-start"):   # async collectives: the result tuple repeats the operand
    return sum(array_bytes(shapes.get(o, "")) for o in ins.operands) * 2
  amp = tile_rows(shapes.get(ins.operands[0], "")) if tiles and ins.operands else 1
  if op == "gather":
    return (1 + amp) * out + array_bytes(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else out
  if op == "dynamic-slice":
    return 2 * out
  if op == "dynamic-update-slice":
    return 2 * array_bytes(shapes.get(ins.operands[1], ""))
  if op == "scatter":
    upd = array_bytes(shapes.get(ins.operands[-1], ""))
    return (1 + 2 * amp) * upd + array_bytes(shapes.get(ins.operands[1], ""))
  return out + sum(array_bytes(shapes.get(o, "")) for o in ins.operands)


# ---------------------------------------------------------------------- classification


def _opcodes(ins: Instr, mod: Module, depth: int = 0) -> set:
  ops = {ins.opcode}
  if ins.opcode == "custom-call":
    t = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    ops.add("custom-call:" + (t.group(1) if t else "?"))
  if depth < 4:
    for key in ("calls",):
      for c in _called(ins.attrs, key):
        for b in mod.computations.get(c, []):
          ops |= _opcodes(b, mod, depth + 1)
  return ops


def _where(ins: Instr, mod: Module, fused: list) -> str:
  """The innermost project / library file in the instruction's Python stack."""
  frames = [ins.frame] + [b.frame for b in fused]
  files = []
  for f in frames:
    for path, fn, _ in mod.stack(f):
      files.append((path, fn))
  text = " ".join(f"{p}:{fn}" for p, fn in files)
  return text


def classify(ins: Instr, mod: Module, table_rows: int | None, shapes: dict | None = None) -> str:
  """One of CATEGORIES for a memory-touching instruction (`shapes`: its computation's
  instruction name -> shape, to see its operands)."""
  ops = _opcodes(ins, mod)
  fused = []
  for c in _called(ins.attrs, "calls"):
    fused = mod.computations.get(c, [])
  where = _where(ins, mod, fused[-1:] + [b for b in fused if b.opcode in ("dot", "gather",
                                                                            "scatter")][:1])
  name = ins.op_name + " " + " ".join(b.op_name for b in fused[-1:])
  if any(o.split("-start")[0] in COLLECTIVES or o.split("-done")[0] in COLLECTIVES
         for o in ops):
    return "collectives"
  # Touches an (N, ...) array: the tables, their gradients or optimizer moments.
  shapes = shapes or {}
  table = table_rows is not None and any(
      dims[:1] == (table_rows,) for s in [ins.shape] + [shapes.get(o, "") for o in ins.operands]
      for _, dims in arrays(s))
  if "optax" in where or "peer_jax/optim.py" in where:
    return "optimizer (tables)" if table else "optimizer (rest)"
  if "scatter" in ops:
    return "scatter"
  if "gather" in ops:
    return "gather"
  if "sort" in ops or "top_k" in name or any("TopK" in o or "topk" in o.lower() for o in ops):
    return "top-k/sort"
  if table:
    return "table buffers"
  if "dot" in ops or "convolution" in ops:
    if any(k in where for k in ("layers/peer.py", "layers/pkm.py", "ops/product_keys.py")):
      return "retrieval matmuls"
    if "layers/attention.py" in where:
      return "attention"
    return "dense matmuls"
  if "layers/attention.py" in where:
    return "attention"
  if "ops/experts.py" in where or "ops/sharded_experts.py" in where:
    return "expert-path other"
  return "other"


@dataclasses.dataclass
class Row:
  name: str
  opcode: str
  category: str
  bytes: float        # one execution
  count: int          # executions per step (loop trips; 1 outside loops)
  shape: str
  op_name: str


def attribute(text: str, table_rows: int | None = None, loop_mode: str = "once",
              tiles: bool = True) -> list[Row]:
  """One Row per memory-touching instruction reachable from the entry computation.

  tiles: charge gathers and scatters whole layout tiles per row, as XLA's TPU cost model
  does (no effect on untiled CPU / GPU layouts)."""
  if loop_mode not in ("once", "trips"):
    raise ValueError(f"loop_mode {loop_mode!r}: expected 'once' or 'trips'")
  mod = parse_module(text)
  rows: list[Row] = []

  def walk(cname: str, mult: int, depth: int):
    body = mod.computations.get(cname, [])
    shapes = {b.name: b.shape for b in body}
    for ins in body:
      if ins.opcode == "while":
        n = trip_count(ins, mod) if loop_mode == "trips" else 1
        for c in _called(ins.attrs, "body") + _called(ins.attrs, "condition"):
          walk(c, mult * (n or 1), depth + 1)
        continue
      if ins.opcode in ("call", "async-start", "conditional") and depth < 16:
        subs = (_called(ins.attrs, "to_apply") + _called(ins.attrs, "calls")
                + _called(ins.attrs, "branch_computations")
                + _called(ins.attrs, "true_computation") + _called(ins.attrs, "false_computation"))
        for c in subs:
          walk(c, mult, depth + 1)
        if ins.opcode != "async-start" or not subs:
          continue
      b = _op_bytes(ins, mod, shapes, tiles)
      if b:
        rows.append(Row(ins.name, ins.opcode, classify(ins, mod, table_rows, shapes), b, mult,
                        ins.shape[:120], ins.op_name[-160:]))

  walk(mod.entry, 1, 0)
  return rows


def summarize(rows: list[Row]) -> dict:
  """{category: bytes per step}, every category present (0 where nothing fell in it)."""
  out = {c: 0.0 for c in CATEGORIES}
  for r in rows:
    out[r.category] += r.bytes * r.count
  return out


def top_rows(rows: list[Row], n: int = 15) -> list[dict]:
  """The n largest instructions by bytes per step, as small dicts for a JSON report."""
  best = sorted(rows, key=lambda r: -r.bytes * r.count)[:n]
  return [{"name": r.name, "opcode": r.opcode, "category": r.category,
           "bytes": r.bytes * r.count, "count": r.count, "shape": r.shape,
           "op_name": r.op_name} for r in best]


def format_breakdown(b: dict, xla_total: float) -> str:
  """The categories of a breakdown report as text lines (bytes and share of XLA's total)."""
  lines = [f"bytes per device by category (XLA total {xla_total:.3e}):"]
  for k, v in b["categories"].items():
    if v:
      lines.append(f"  {k:20s} {v:10.3e}  {100 * v / xla_total:5.1f}%")
  lines.append(f"  {'unattributed':20s} {b['unattributed_bytes']:10.3e}  "
               f"{100 * b['unattributed_bytes'] / xla_total:5.1f}% (XLA total - our sum)")
  return "\n".join(lines)
