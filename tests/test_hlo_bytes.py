"""peer_jax/hlo_bytes.py: HLO parsing, the byte model and the categories.

Hand-written HLO snippets check each rule; a tiny PEER train step compiled on CPU checks
that the categories cover what XLA's own cost analysis counts. No libtpu needed.
"""

import os
import sys

import pytest

from peer_jax import hlo_bytes
from tests.conftest import REPO, tiny_config

# Stack tables as XLA prints them (parent_frame_id is one above the parent's id).
FRAMES = """
FileNames
1 "/repo/peer_jax/train.py"
2 "/venv/site-packages/optax/_src/transform.py"
3 "/repo/peer_jax/layers/attention.py"
4 "/repo/peer_jax/layers/peer.py"
FunctionNames
1 "train_step"
2 "update_fn"
3 "__call__"
FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=1}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=1 end_column=1}
3 {file_name_id=3 function_name_id=3 line=30 end_line=30 column=1 end_column=1}
4 {file_name_id=4 function_name_id=3 line=40 end_line=40 column=1 end_column=1}
StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=2}
4 {file_location_id=4 parent_frame_id=2}
"""

MODULE = FRAMES + """
%fused_gather (param_0: f32[64,8], param_1: s32[4,1]) -> f32[4,8] {
  %param_0 = f32[64,8]{1,0} parameter(0)
  %param_1 = s32[4,1]{1,0} parameter(1)
  ROOT %gather.1 = f32[4,8]{1,0} gather(%param_0, %param_1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,8}
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%x, %y)
}

%fused_scatter (param_0: f32[64,8], param_1: s32[4,1], param_2: f32[4,8]) -> f32[64,8] {
  %param_0 = f32[64,8]{1,0} parameter(0)
  %param_1 = s32[4,1]{1,0} parameter(1)
  %param_2 = f32[4,8]{1,0} parameter(2)
  ROOT %scatter.1 = f32[64,8]{1,0} scatter(%param_0, %param_1, %param_2), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

%fused_adam (param_0: f32[64,8], param_1: f32[64,8]) -> f32[64,8] {
  %param_0 = f32[64,8]{1,0} parameter(0)
  %param_1 = f32[64,8]{1,0} parameter(1)
  ROOT %m = f32[64,8]{1,0} multiply(%param_0, %param_1)
}

%fused_slice (param_0: f32[64,8]) -> f32[2,8] {
  %param_0 = f32[64,8]{1,0} parameter(0)
  ROOT %s = f32[2,8]{1,0} slice(%param_0), slice={[0:2], [0:8]}
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %a = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %e = f32[4,8]{1,0} exponential(%a), metadata={op_name="jit(f)/exp" stack_frame_id=1}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %e)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (table: f32[64,8], idx: s32[4,1], x: f32[4,16], w: f32[16,8]) -> f32[64,8] {
  %table = f32[64,8]{1,0:T(8,128)} parameter(0)
  %idx = s32[4,1]{1,0} parameter(1)
  %x = f32[4,16]{1,0} parameter(2)
  %w = f32[16,8]{1,0} parameter(3)
  %g = f32[4,8]{1,0} fusion(%table, %idx), kind=kLoop, calls=%fused_gather, metadata={op_name="jit(f)/gather"}
  %q = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general" stack_frame_id=4}
  %att = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general" stack_frame_id=3}
  %top = (f32[4,2]{1,0}, s32[4,2]{1,0}) custom-call(%q), custom_call_target="TopK", metadata={op_name="jit(f)/top_k"}
  %z = f32[64,8]{1,0} broadcast(f32[] constant(0)), dimensions={}
  %sc = f32[64,8]{1,0} fusion(%z, %idx, %g), kind=kLoop, calls=%fused_scatter
  %ar = f32[64,8]{1,0} all-reduce(%sc), replica_groups={}, to_apply=%add
  %sl = f32[2,8]{1,0} fusion(%ar), kind=kLoop, calls=%fused_slice
  %init = (s32[], f32[4,8]{1,0}) tuple(s32[] constant(0), %att)
  %loop = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %upd = f32[64,8]{1,0} fusion(%table, %ar), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(f)/mul" stack_frame_id=2}
}
"""


def by_name(rows):
  return {r.name: r for r in rows}


def test_array_bytes_and_instruction_parsing():
  assert hlo_bytes.array_bytes("f32[64,8]{1,0:T(8,128)}") == 64 * 8 * 4
  assert hlo_bytes.array_bytes("(bf16[2,3]{1,0}, s32[4]{0}, pred[])") == 12 + 16 + 1
  ins = hlo_bytes.parse_instr('  ROOT %a.1 = (f32[2]{0}, s8[3]{0}) custom-call(f32[2]{0} %x, '
                              '%y), custom_call_target="f(x)", metadata={op_name="a(b)"}')
  assert (ins.name, ins.opcode, ins.operands, ins.op_name) == ("a.1", "custom-call",
                                                               ["x", "y"], "a(b)")
  assert hlo_bytes.array_bytes(ins.shape) == 8 + 3


def test_module_stack_frames():
  mod = hlo_bytes.parse_module(MODULE)
  assert mod.entry == "main" and mod.roots["fused_scatter"] == "scatter.1"
  assert [f for f, _, _ in mod.stack(2)] == ["/venv/site-packages/optax/_src/transform.py",
                                              "/repo/peer_jax/train.py"]


def test_rules_and_categories():
  rows = by_name(hlo_bytes.attribute(MODULE, table_rows=64))
  cat = {n: r.category for n, r in rows.items()}
  assert cat == {"g": "gather", "q": "retrieval matmuls", "att": "attention",
                 "top": "top-k/sort", "z": "table buffers", "sc": "scatter",
                 "ar": "collectives", "sl": "table buffers", "e": "other", "lt": "other",
                 "upd": "optimizer (tables)"}
  # A fused gather reads the rows it returns (+ indices), not the whole table.
  assert rows["g"].bytes == 4 * 8 * 4 + 4 * 4 + 4 * 8 * 4
  # In-place scatter-add: reads the rows it updates, the indices and the updates, writes
  # the updated rows; the (64, 8) buffer is not read or written in full.
  assert rows["sc"].bytes == 4 * 8 * 4 + 4 * 4 + 4 * 8 * 4 + 4 * 8 * 4
  # A parameter read only through a slice counts the slice.
  assert rows["sl"].bytes == 2 * 8 * 4 * 2
  assert rows["upd"].bytes == 3 * 64 * 8 * 4
  assert rows["e"].count == 1


def test_loop_trips_and_summary():
  once = hlo_bytes.attribute(MODULE, table_rows=64)
  trips = by_name(hlo_bytes.attribute(MODULE, table_rows=64, loop_mode="trips"))
  assert trips["e"].count == 3
  s1, s3 = hlo_bytes.summarize(once), hlo_bytes.summarize(list(trips.values()))
  assert set(s1) == set(hlo_bytes.CATEGORIES)
  assert s3["other"] == 3 * s1["other"] and s3["gather"] == s1["gather"]
  assert sum(s1.values()) == pytest.approx(sum(r.bytes for r in once))
  top = hlo_bytes.top_rows(once, 2)
  assert [t["name"] for t in top] == ["upd", "ar"]
  with pytest.raises(ValueError, match="loop_mode"):
    hlo_bytes.attribute(MODULE, loop_mode="twice")


def _compile_cpu(ffw):
  import jax
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  from compile_tpu import compile_train_step, table_rows  # noqa: E402
  c = tiny_config(ffw)
  c.model.peer.kernel = "xla"
  c.model.peer.chunk_size = 32   # several chunks: the expert path runs as loops
  c.model.peer.num_experts = 64**2
  _, compiled = compile_train_step(c, jax.devices()[:1])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled.as_text(), float(cost["bytes accessed"]), table_rows(c.model)


def test_cpu_compiled_peer_step_is_covered():
  text, xla_total, n = _compile_cpu("peer")
  assert n == 64**2
  s = hlo_bytes.summarize(hlo_bytes.attribute(text, table_rows=n))
  # XLA's CPU cost model and ours agree to within a few tens of percent on the total ...
  assert sum(s.values()) == pytest.approx(xla_total, rel=0.3)
  # ... and every PEER-specific term is found.
  for k in ("scatter", "gather", "optimizer (tables)", "optimizer (rest)", "top-k/sort",
            "retrieval matmuls", "attention", "dense matmuls"):
    assert s[k] > 0, k
  trips = hlo_bytes.summarize(hlo_bytes.attribute(text, table_rows=n, loop_mode="trips"))
  assert sum(trips.values()) > sum(s.values())   # the expert path's loops run several times


def test_cpu_compiled_dense_step_has_no_table_terms():
  text, xla_total, n = _compile_cpu("dense")
  assert n is None
  s = hlo_bytes.summarize(hlo_bytes.attribute(text, table_rows=n))
  # (its scatter term is the embedding's gradient)
  assert s["optimizer (tables)"] == s["table buffers"] == 0
  assert s["retrieval matmuls"] == 0 and s["dense matmuls"] > 0
  assert sum(s.values()) == pytest.approx(xla_total, rel=0.3)


def test_tpu_tiles_and_inferred_trip_count():
  assert hlo_bytes.tile_rows("f32[64,8]{1,0:T(8,128)}") == 8
  assert hlo_bytes.tile_rows("bf16[64,8]{1,0:T(8,128)(2,1)}") == 16
  assert hlo_bytes.tile_rows("f32[64,8]{1,0}") == 1
  # On a TPU layout a gathered row costs its whole tile (XLA's TPU cost model).
  tiled = MODULE.replace("%param_0 = f32[64,8]{1,0} parameter(0)\n  %param_1 = s32[4,1]{1,0} "
                         "parameter(1)\n  ROOT %gather.1",
                         "%param_0 = f32[64,8]{1,0:T(8,128)} parameter(0)\n  %param_1 = "
                         "s32[4,1]{1,0} parameter(1)\n  ROOT %gather.1")
  g = by_name(hlo_bytes.attribute(tiled, table_rows=64))["g"]
  assert g.bytes == 8 * 4 * 8 * 4 + 4 * 4 + 4 * 8 * 4
  assert by_name(hlo_bytes.attribute(tiled, table_rows=64, tiles=False))["g"].bytes == 272
  # Without known_trip_count the count is read off `counter < constant` in the condition.
  plain = MODULE.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
  assert by_name(hlo_bytes.attribute(plain, loop_mode="trips"))["e"].count == 3
