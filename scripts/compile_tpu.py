#!/usr/bin/env python
"""Compile the train step ahead of time for a TPU topology, without the TPU.

  python scripts/compile_tpu.py --config=configs/c4_peer.py:6e18 --topology=v5p-32 \\
      [--config.mesh.tensor=4 ...] [--json=out.json]
  # several slices joined over the data-centre network (DCN): the config's mesh.dcn_* sizes
  python scripts/compile_tpu.py --config=configs/c4_peer.py:6e18 --topology=v5p-32 \\
      --num_slices=2 --config.mesh.dcn_data=2 --config.mesh.tensor=4

Needs libtpu (the `jax[tpu]` extra, in its own virtualenv: see docs/scaling.md); nothing
runs on a device. Prints per-chip memory (and whether it fits the chip's HBM), XLA's cost
estimate (FLOPs and bytes per chip), a roofline step time max(FLOPs/peak, bytes/HBM
bandwidth) and the MFU that step time implies for the model's FLOPs
(3 x `peer_jax.flops.flops_per_token`). Collective time over ICI/DCN is not in XLA's
estimate: treat the step time as a lower bound.

Topology names: Cloud TPU slice names (v4-8, v5p-32, v5litepod-16 / v5e-16, v6e-8, ...:
the number counts TensorCores for v4/v5p and chips for v5e/v6e) or libtpu's own
`v5p:2x2x4` form. `--num_slices=N` compiles for N such slices (libtpu's multi-slice
topology); the product of the config's `mesh.dcn_*` sizes must then be N, and `mesh.data` etc.
are sizes within one slice.
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compile-only: no TPU is opened, so several compiles may share the machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from absl import app, flags
from ml_collections import config_flags



def _define_flags():
  """Flags are defined only when run as a script (importing this module defines none)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/...).", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-32, v4-8, v5e-16.")
  flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")
  flags.DEFINE_string("hlo_out", None, "Also write the optimized HLO text (per device) here "
                      "(scripts/tpu_bytes.py reads it).")
  flags.DEFINE_bool("breakdown", False, "Also attribute XLA's bytes per device to categories "
                    "(gathers, scatters, table buffers, optimizer, ...; peer_jax/hlo_bytes.py).")
  flags.DEFINE_integer("num_slices", 1, "Number of slices of --topology, joined over DCN "
                       "(multi-slice); must equal the product of the config's mesh.dcn_* sizes.")
  flags.mark_flags_as_required(["config", "topology"])

# Per chip: HBM bytes, peak bf16 FLOP/s, HBM bandwidth bytes/s (public datasheets).
CHIPS = {
    "v4": dict(hbm=32 * 2**30, peak=275e12, bw=1.2e12, cores_per_chip=2, dims=3),
    "v5p": dict(hbm=95 * 2**30, peak=459e12, bw=2.765e12, cores_per_chip=2, dims=3),
    "v5e": dict(hbm=16 * 2**30, peak=197e12, bw=0.819e12, cores_per_chip=1, dims=2),
    "v6e": dict(hbm=32 * 2**30, peak=918e12, bw=1.64e12, cores_per_chip=1, dims=2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


class TopologyError(ValueError):
  pass


def _grid(chips: int, dims: int) -> str:
  """Chip grid of a slice as libtpu spells it: v5p-32 -> 2x2x4, v5e-32 -> 4x8."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{chips} chips is not a power of two")
  if dims == 2:
    e = int(math.log2(chips))
    return f"{2 ** (e // 2)}x{2 ** (e - e // 2)}"
  if chips < 4:
    return f"1x{chips}x1"
  sizes = [2, 2, 1]  # one host's 2x2x1 chips; 2x2x2, then z, y, x double in turn
  order = (2, 2, 1, 0)
  i = 0
  while math.prod(sizes) < chips:
    sizes[order[i] if i < 2 else order[1 + (i - 1) % 3]] *= 2
    i += 1
  return "x".join(map(str, sizes))


def parse_topology(name: str) -> tuple[str, str, int]:
  """'v5p-32' -> ('v5p', 'v5p:2x2x4', 16 chips); 'v5p:2x2x4' passes through."""
  valid = ("Cloud TPU names like v4-8, v4-32, v5p-8, v5p-32, v5p-128, v5e-16 (v5litepod-16), "
           "v6e-8, or libtpu's GEN:AxBxC form like v5p:2x2x4")
  raw = name.strip().lower()
  if ":" in raw:
    gen, _, dims = raw.partition(":")
    gen = ALIASES.get(gen, gen)
    try:
      chips = math.prod(int(x) for x in dims.split("x"))
    except ValueError:
      raise TopologyError(f"--topology={name}: bad chip grid {dims!r}; expected {valid}") from None
    if gen not in CHIPS:
      raise TopologyError(f"--topology={name}: unknown TPU generation {gen!r}; expected {valid}")
    return gen, f"{gen}:{dims}", chips
  gen, sep, count = raw.rpartition("-")
  gen = ALIASES.get(gen, gen)
  if not sep or gen not in CHIPS or not count.isdigit():
    raise TopologyError(f"--topology={name}: not a TPU slice name; expected {valid}")
  spec = CHIPS[gen]
  n = int(count)
  if n % spec["cores_per_chip"]:
    raise TopologyError(f"--topology={name}: {gen} slices count TensorCores, "
                        f"{spec['cores_per_chip']} per chip; {n} is not a slice size")
  chips = n // spec["cores_per_chip"]
  try:
    grid = _grid(chips, spec["dims"])
  except TopologyError as e:
    raise TopologyError(f"--topology={name}: {e}; expected {valid}") from None
  return gen, f"{gen}:{grid}", chips


def check_num_slices(mesh: dict, num_slices: int) -> tuple[int, ...]:
  """The config's DCN sizes (mesh.dcn_data, dcn_fsdp, dcn_tensor), checked against --num_slices.

  Raises TopologyError unless their product is `num_slices`; needs no libtpu.
  """
  from peer_jax.sharding import DCN_KEYS, MeshError, dcn_shape
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices}: must be a positive integer")
  try:
    dcn = dcn_shape(dict(mesh))
  except MeshError as e:
    raise TopologyError(str(e)) from None
  sizes = ", ".join(f"mesh.{k}={v}" for k, v in zip(DCN_KEYS, dcn))
  if math.prod(dcn) != num_slices:
    hint = (f"pass --num_slices={math.prod(dcn)}" if num_slices == 1 else
            f"set the DCN sizes to multiply to {num_slices}, e.g. "
            f"--config.mesh.dcn_data={num_slices} (data parallelism across slices)")
    raise TopologyError(f"--num_slices={num_slices}: the config's mesh spans {math.prod(dcn)} "
                        f"slice(s) ({sizes}); {hint}")
  return dcn


def topology_devices(name: str, num_slices: int = 1):
  gen, libtpu_name, chips = parse_topology(name)
  from jax.experimental import topologies
  # Only ask for slices when there are several: the one-slice call stays libtpu's default.
  extra = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    topo = topologies.get_topology_desc(libtpu_name, "tpu", **extra)
  except Exception as e:  # libtpu missing, or a shape libtpu does not know
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"{num_slices} x {libtpu_name}" if num_slices > 1 else libtpu_name
    raise TopologyError(f"--topology={name} ({where}): libtpu cannot describe it: {msg}. "
                        f"Is libtpu installed (pip install 'jax[tpu]', see docs/scaling.md)?"
                        ) from None
  return gen, libtpu_name, list(topo.devices)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def table_rows(model_cfg) -> int | None:
  """Rows N of the model's expert tables (PEER experts, PKM memories); None without tables."""
  if model_cfg.ffw == "peer":
    return model_cfg.peer.num_experts
  if model_cfg.ffw == "pkm":
    return model_cfg.pkm.num_memories
  return None


def breakdown_report(hlo_text: str, xla_bytes_once: float, rows_n, accum: int = 1) -> dict:
  """Bytes per device by category (peer_jax/hlo_bytes.py), scaled like the XLA total."""
  from peer_jax import hlo_bytes
  once = hlo_bytes.attribute(hlo_text, table_rows=rows_n, loop_mode="once")
  trips = hlo_bytes.attribute(hlo_text, table_rows=rows_n, loop_mode="trips")
  cats = {k: accum * v for k, v in hlo_bytes.summarize(once).items()}
  ours = sum(cats.values())
  trips_total = accum * sum(hlo_bytes.summarize(trips).values())
  # XLA counts a while body once; the chunked expert path loops over its chunks, so the
  # traffic XLA leaves out is our (trips - once) difference.
  return {"categories": cats, "attributed_bytes": ours,
          "unattributed_bytes": accum * xla_bytes_once - ours,
          "loop_bytes_not_in_xla": trips_total - ours,
          "categories_with_loop_trips": {k: accum * v for k, v in
                                         hlo_bytes.summarize(trips).items()},
          "top_instructions": hlo_bytes.top_rows(once, 12)}


def compile_train_step(cfg, devices):
  """(trainer, compiled): the real train step compiled ahead of time for `devices` (any
  platform: TPU topology devices here, CPU devices in the tests), on abstract inputs."""
  import jax
  from peer_jax import sharding
  from peer_jax.train import BATCH_KEYS, Trainer
  trainer = Trainer.build(cfg, devices=devices)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, t), "float32" if k == "mask" else "int32",
                                   sharding=trainer.batch_sharding(2)) for k in BATCH_KEYS}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       trainer.abstract_state, trainer.state_shardings)
  with sharding.use_rules(trainer.mesh, tuple(cfg.sharding.rules)):
    return trainer, trainer.train_step.lower(state, batch).compile()


def compile_report(cfg, topology: str, num_slices: int = 1, hlo_out: str | None = None,
                   breakdown: bool = False) -> dict:
  import jax
  from peer_jax import flops
  from peer_jax.config_validation import validate_config
  from peer_jax.train import Trainer

  _, _, chips_per_slice = parse_topology(topology)
  check_num_slices(cfg.mesh, num_slices)
  gen, libtpu_name, devices = topology_devices(topology, num_slices)
  chips = chips_per_slice * num_slices
  if num_slices > 1:
    topology = f"{num_slices} x {topology}"
    libtpu_name = f"{num_slices} x {libtpu_name}"
  # libtpu may expose each TensorCore as a device (v4: 2 per chip, 16 GiB each): scale the
  # per-chip numbers to per-device ones.
  share = chips / len(devices)
  chip = {k: (v * share if k in ("hbm", "peak", "bw") else v) for k, v in CHIPS[gen].items()}
  validate_config(cfg, num_devices=len(devices), check_files=False)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  try:
    trainer, compiled = compile_train_step(cfg, devices)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # XLA refuses programs that do not fit the chip: report that, with its numbers.
    trainer = Trainer.build(cfg, devices=devices)
    return {"topology": topology, "libtpu_topology": libtpu_name, "chips": chips,
            "num_slices": num_slices, "devices": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(trainer.mesh.shape),
            "config_model": f"{cfg.model.ffw} d{cfg.model.d_model} L{cfg.model.num_layers}",
            "params": flops.param_counts(cfg.model)["total"], "fits": False,
            "hbm_per_device_bytes": chip["hbm"],
            "compiler_message": str(e).splitlines()[0][:400]}
  hlo_text = compiled.as_text() if (hlo_out or breakdown) else ""
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(hlo_text)
  mem = compiled.memory_analysis()
  # Donated state: outputs alias the arguments, so count arguments + temporaries (+ code).
  per_chip = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  cost = _cost(compiled)
  # XLA counts a loop body once: with gradient accumulation (a scan over microbatches) scale
  # by their number (this over-counts the optimizer update, small next to the model).
  accum = cfg.train.grad_accum_steps
  xla_flops = accum * float(cost.get("flops", float("nan")))
  xla_bytes = accum * float(cost.get("bytes accessed", float("nan")))
  step_s = max(xla_flops / chip["peak"], xla_bytes / chip["bw"])
  model_flops = 3 * flops.flops_per_token(cfg.model, t)["total"] * b * t
  n = len(devices)
  extra = {}
  if breakdown:
    extra["bytes_breakdown"] = breakdown_report(hlo_text, xla_bytes / accum,
                                                table_rows(cfg.model), accum)
  return {
      "topology": topology, "libtpu_topology": libtpu_name, "chips": chips,
      "num_slices": num_slices, "devices": n,
      "device_kind": devices[0].device_kind,
      "mesh": dict(trainer.mesh.shape), "config_model": f"{cfg.model.ffw} d{cfg.model.d_model} "
      f"L{cfg.model.num_layers}",
      "params": flops.param_counts(cfg.model)["total"],
      "memory_per_device_bytes": int(per_chip),
      "memory_breakdown": {"arguments": mem.argument_size_in_bytes,
                           "outputs": mem.output_size_in_bytes,
                           "aliased": mem.alias_size_in_bytes,
                           "temporaries": mem.temp_size_in_bytes},
      "hbm_per_device_bytes": chip["hbm"], "fits": bool(per_chip <= chip["hbm"]),
      "xla_flops_per_device": xla_flops, "xla_bytes_per_device": xla_bytes,
      "est_step_time_s": step_s, "model_flops_per_step": model_flops,
      "implied_mfu": model_flops / (n * chip["peak"] * step_s) if step_s > 0 else float("nan"),
      "tokens_per_sec": b * t / step_s if step_s > 0 else float("nan"),
      "peer_kernel": cfg.model.peer.kernel if cfg.model.ffw == "peer" else None,
      "table_optimizer": cfg.train.table_optimizer, "grad_accum_steps": accum,
      **extra,
  }


def format_report(r: dict) -> str:
  gib = 2**30
  if "compiler_message" in r:
    return (f"topology {r['topology']} ({r['libtpu_topology']}, {r['chips']} chips, "
            f"{r['devices']} x {r['device_kind']} devices), mesh {r['mesh']}, model {r['config_model']}, "
            f"{r['params'] / 1e6:.0f}M parameters\nDOES NOT FIT: {r['compiler_message']}")
  return "\n".join([
      f"topology {r['topology']} ({r['libtpu_topology']}, {r['chips']} chips, {r['devices']} x "
      f"{r['device_kind']} devices), "
      f"mesh {r['mesh']}, model {r['config_model']}, {r['params'] / 1e6:.0f}M parameters",
      f"memory per device: {r['memory_per_device_bytes'] / gib:.2f} GiB of "
      f"{r['hbm_per_device_bytes'] / gib:.0f} GiB HBM: {'fits' if r['fits'] else 'DOES NOT FIT'}",
      f"XLA cost per device: {r['xla_flops_per_device']:.3e} FLOPs, "
      f"{r['xla_bytes_per_device']:.3e} bytes accessed",
      f"estimated step time (roofline, no collectives): {r['est_step_time_s'] * 1e3:.1f} ms; "
      f"model FLOPs/step {r['model_flops_per_step']:.3e}; implied MFU "
      f"{100 * r['implied_mfu']:.1f}%; {r['tokens_per_sec']:.3g} tokens/s",
  ])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from peer_jax.config_validation import ConfigError
  from peer_jax.ops import kernels
  FLAGS = flags.FLAGS
  try:
    # Kernels are chosen for the TPU compiled for, not for this (CPU) host: `auto` and
    # `pallas` mean the Mosaic kernels, as on the TPU itself.
    with kernels.target_platform("tpu"):
      report = compile_report(FLAGS.config, FLAGS.topology, FLAGS.num_slices, FLAGS.hlo_out,
                              FLAGS.breakdown)
  except (TopologyError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(report))
  if "bytes_breakdown" in report:
    from peer_jax.hlo_bytes import format_breakdown
    print(format_breakdown(report["bytes_breakdown"], report["xla_bytes_per_device"]))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=2)
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  _define_flags()
  from peer_jax.cli import parse_flags
  app.run(main, flags_parser=parse_flags)
