#!/usr/bin/env python
"""Where a compiled step's bytes go, from its optimized HLO text (no libtpu needed).

  # 1. compile for a TPU topology and keep the HLO (needs libtpu: docs/scaling.md)
  python scripts/compile_tpu.py --config=configs/c4_peer.py:6e18 --topology=v5p-32 \\
      --config.mesh.tensor=4 --config.model.peer.kernel=xla --hlo_out=HLO_FILE --json=peer.json
  # 2. attribute its bytes per device to categories
  python scripts/tpu_bytes.py --hlo=HLO_FILE --table_rows=1048576 --xla_json=peer.json

(`compile_tpu.py --breakdown` does step 2 in the same run.) Prints bytes per category
(peer_jax/hlo_bytes.py: gathers, scatters, table buffers, optimizer, retrieval matmuls,
top-k, attention, other matmuls, collectives, other), with loop bodies counted once as
XLA's cost analysis does and, beside them, times their trip counts; the largest
instructions; and, given XLA's own total (`--xla_bytes` or the `--xla_json` of
compile_tpu.py), the remainder our byte model does not account for.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_string("hlo", None, "Optimized HLO text (compile_tpu.py --hlo_out).")
flags.DEFINE_integer("table_rows", 0, "Rows N of the expert tables (0: no tables).")
flags.DEFINE_float("xla_bytes", 0.0, "XLA's bytes accessed per device, for the remainder.")
flags.DEFINE_string("xla_json", None, "compile_tpu.py --json output (gives --xla_bytes).")
flags.DEFINE_integer("top", 15, "How many of the largest instructions to list.")
flags.DEFINE_string("json", None, "Also write the breakdown as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.hlo:
    raise app.UsageError("--hlo is required (an optimized HLO text: compile_tpu.py --hlo_out)")
  from peer_jax import hlo_bytes
  text = open(FLAGS.hlo).read()
  rows_n = FLAGS.table_rows or None
  xla = FLAGS.xla_bytes
  accum = 1
  if FLAGS.xla_json:
    with open(FLAGS.xla_json) as f:
      rep = json.load(f)
    xla, accum = rep["xla_bytes_per_device"], rep.get("grad_accum_steps", 1)
  once = hlo_bytes.attribute(text, table_rows=rows_n, loop_mode="once")
  trips = hlo_bytes.attribute(text, table_rows=rows_n, loop_mode="trips")
  a, b = hlo_bytes.summarize(once), hlo_bytes.summarize(trips)
  total_a, total_b = accum * sum(a.values()), accum * sum(b.values())
  print(f"{'category':20s} {'bytes (loops once)':>18s} {'share':>6s} {'x loop trips':>13s}")
  for k in hlo_bytes.CATEGORIES:
    print(f"{k:20s} {accum * a[k]:18.3e} {100 * accum * a[k] / total_a:5.1f}% "
          f"{accum * b[k]:13.3e}")
  print(f"{'sum':20s} {total_a:18.3e} {'':6s} {total_b:13.3e}")
  if xla:
    print(f"XLA's total {xla:.3e}: unattributed {xla - total_a:.3e} "
          f"({100 * (xla - total_a) / xla:.1f}%)")
  print("largest instructions (loops once):")
  for r in hlo_bytes.top_rows(once, FLAGS.top):
    print(f"  {r['bytes'] * accum:10.3e} {r['category']:18s} {r['opcode']:12s} {r['shape'][:48]:48s}"
          f" {r['op_name'][-70:]}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"categories": {k: accum * v for k, v in a.items()},
                 "categories_with_loop_trips": {k: accum * v for k, v in b.items()},
                 "attributed_bytes": total_a, "xla_bytes_per_device": xla,
                 "top_instructions": hlo_bytes.top_rows(once, FLAGS.top)}, f, indent=1)
  return 0


if __name__ == "__main__":
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
