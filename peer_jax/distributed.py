"""Multi-host start-up: one call before anything touches a jax device.

    from peer_jax import distributed
    distributed.initialize()                       # auto: TPU pod, SLURM, Open MPI, env vars
    distributed.initialize("10.0.0.1:1234", 2, 0)  # explicit: coordinator, processes, this id

Auto-detection: on a Cloud TPU pod slice (several workers), under SLURM with more than
one task, under Open MPI, or when JAX_COORDINATOR_ADDRESS is set, `jax.distributed.
initialize()` finds the coordinator and process ids itself. A single process on one
machine needs nothing and `initialize()` does nothing.

On CPU (tests: several local processes, each with simulated devices) cross-process
collectives go through gloo (`jax_cpu_collectives_implementation`).

After initialisation every process sees all devices (`jax.devices()`) and its own
(`jax.local_devices()`); the mesh spans all of them, each process feeds its share of the
batch (`peer_jax.data.global_batch`), and only process 0 writes logs and metrics
(`is_primary()`).
"""

import os

import jax

_initialized = False


def _cluster_detected() -> str | None:
  """Name of the multi-process environment jax can auto-configure, or None."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU pod"
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               cpu_collectives: str = "gloo") -> bool:
  """Start jax's distributed runtime if this is (or is told to be) a multi-process run.

  Explicit arguments win; with none, a detected cluster (see `_cluster_detected`) is
  auto-configured; otherwise this is a single-process run and nothing happens.
  Returns True when the distributed runtime is (now) running. Call once, first.
  """
  global _initialized
  if _initialized:
    return True
  explicit = coordinator_address is not None or num_processes is not None
  if explicit:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError("multi-process: give all of --coordinator_address, --num_processes and "
                       "--process_id (or none of them, to auto-detect a TPU pod / SLURM)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    if num_processes == 1:
      return False
  elif _cluster_detected() is None:
    return False
  # CPU processes exchange collectives through gloo (harmless on TPU/GPU).
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
  else:
    jax.distributed.initialize(local_device_ids=local_device_ids)
  _initialized = True
  return True


def is_primary() -> bool:
  """True on the process that writes logs, metrics and config files (process 0)."""
  return jax.process_index() == 0


def local_batch_rows(sharding, global_batch_size: int) -> slice:
  """Rows of the global batch this process feeds, for a batch sharding over the mesh.

  The mesh is laid out process-major, so each process's devices hold a contiguous block
  of rows; raises if they do not (a mesh that interleaves processes along the batch).
  """
  rows = set()
  for idx in sharding.addressable_devices_indices_map((global_batch_size, 1)).values():
    s = idx[0]
    rows.update(range(*s.indices(global_batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows")
  return slice(lo, hi)
