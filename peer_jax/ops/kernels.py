"""Which implementation of the PEER expert path runs: the `model.peer.kernel` switch.

    impl, why = resolve_kernel("auto", glu=False, d_model=1024, slots=128)
    y_TD = expert_mixture(impl, x_TD, idx_THK, w_THK, (u_ND,), v_ND, act, chunk_size=512)

Settings (`KERNELS`):

* `xla`: the chunked XLA kernel (ops/experts.py), every platform.
* `cpu_ffi`: the fused multi-threaded FFI kernels (ops/cpu_experts.cc); CPU only, f32
  tables (bf16 activations are upcast: a (T, D) copy, not a table copy).
* `pallas`: the Pallas kernels: TPU Mosaic (ops/pallas_experts.py) on TPU, GPU Triton
  (ops/pallas_experts_gpu.py) on GPU; no GLU variant; compiled shapes need D % 128 == 0
  and H·K % 8 == 0 on TPU, D % 16 == 0 on GPU (D of one shard under the sharded bank).
  On CPU only in Pallas interpret mode (`interpret="tpu"` or `"gpu"`, or
  $PEER_JAX_PALLAS_INTERPRET): that is for tests, slow.
* `auto`: Pallas on TPU and GPU when the rules above allow it, else XLA with ONE logged
  line saying why; on one CPU device the FFI kernels for f32 (today's behaviour: bf16
  inputs take XLA), and XLA on a CPU mesh.

An impossible explicit setting raises `KernelError`, one line naming `model.peer.kernel`;
config validation calls `resolve_kernel` so this happens before anything is built.

Resolved implementations (`IMPLS`): "xla", "cpu_ffi", "pallas_tpu", "pallas_gpu".
"""

import contextlib
import logging
import os

import jax
import jax.numpy as jnp

KERNELS = ("auto", "xla", "pallas", "cpu_ffi")
IMPLS = ("xla", "cpu_ffi", "pallas_tpu", "pallas_gpu")
INTERPRETS = ("tpu", "gpu")
INTERPRET_ENV = "PEER_JAX_PALLAS_INTERPRET"

_log = logging.getLogger("peer_jax")
_logged: set = set()


class KernelError(ValueError):
  """An explicit kernel setting that cannot run here; str() is one line naming the key."""


_target_platforms: list[str] = []


@contextlib.contextmanager
def target_platform(platform: str):
  """Pick kernels for `platform` ('tpu' | 'gpu' | 'cpu') instead of the default backend:
  ahead-of-time compiles for devices this host does not have (scripts/compile_tpu.py
  compiles for a TPU topology from a CPU host)."""
  _target_platforms.append(platform)
  try:
    yield
  finally:
    _target_platforms.pop()


def backend_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform programs are built for (`target_platform`, else
  the default backend)."""
  if _target_platforms:
    return _target_platforms[-1]
  b = jax.default_backend()
  return "gpu" if b in ("gpu", "cuda", "rocm") else b


def interpret_mode(interpret=None):
  """The Pallas interpret mode asked for: the argument, else $PEER_JAX_PALLAS_INTERPRET."""
  mode = interpret if interpret is not None else (os.environ.get(INTERPRET_ENV) or None)
  if mode is not None and mode not in INTERPRETS:
    raise KernelError(f"Pallas interpret mode must be one of {INTERPRETS}, got {mode!r}")
  return mode


def _pallas_problem(platform, *, glu, d_local, slots, interpret):
  """Why the Pallas kernel of `platform` cannot run these shapes, or None."""
  if glu:
    return "the Pallas kernels have no GLU variant (model.peer.glu=True)"
  if interpret:
    return None
  if platform == "tpu" and (d_local % 128 or slots % 8):
    return (f"the compiled TPU kernels need D % 128 == 0 and heads*top_k % 8 == 0, got "
            f"D={d_local} (per shard), heads*top_k={slots}")
  if platform == "gpu" and d_local % 16:
    return f"the compiled GPU kernels need D % 16 == 0, got D={d_local} (per shard)"
  return None


def resolve_kernel(kernel: str, *, glu: bool, d_model: int, slots: int, model_shards: int = 1,
                   num_devices: int = 1, table_dtype=jnp.float32, interpret=None,
                   platform: str | None = None, key: str = "model.peer.kernel"):
  """(impl, reason): the implementation `kernel` selects here, and why (for `auto`).

  Args:
    kernel: one of KERNELS.
    glu: GLU experts (Pallas has no GLU kernel).
    d_model: D of the tables; `model_shards` splits it under the sharded bank.
    slots: heads * top_k.
    num_devices: devices of the program (auto picks the FFI kernels on one CPU device).
    table_dtype: dtype of the expert tables (the FFI kernels take f32).
    interpret: None, "tpu" or "gpu": run that Pallas kernel in interpret mode (tests).
    platform: 'cpu' | 'gpu' | 'tpu'; default: the default backend.
  Raises KernelError (one line naming `key`) for an explicit setting that cannot run.
  """
  if kernel not in KERNELS:
    raise KernelError(f"{key}: unknown value {kernel!r}; expected one of {', '.join(KERNELS)}")
  platform = platform or backend_platform()
  interpret = interpret_mode(interpret)
  d_local = d_model // max(1, model_shards)
  f32_tables = jnp.dtype(table_dtype) == jnp.float32
  if kernel == "xla":
    return "xla", "requested"
  if kernel == "cpu_ffi":
    if platform != "cpu":
      raise KernelError(f"{key}: cpu_ffi runs only on CPU, this backend is {platform}")
    if not f32_tables:
      raise KernelError(f"{key}: cpu_ffi takes f32 expert tables, got {jnp.dtype(table_dtype)}")
    from peer_jax.ops import cpu_kernels
    if not cpu_kernels.available():
      raise KernelError(f"{key}: cpu_ffi: the CPU FFI kernels could not be built or are "
                        "disabled (PEER_JAX_CPU_KERNELS=0); see the warning above")
    return "cpu_ffi", "requested"
  if kernel == "pallas":
    target = interpret or platform
    if target == "cpu":
      raise KernelError(f"{key}: pallas needs a TPU or GPU backend, this one is cpu (on CPU "
                        f"the kernels run only in Pallas interpret mode, for tests: "
                        f"{INTERPRET_ENV}=tpu|gpu)")
    problem = _pallas_problem(target, glu=glu, d_local=d_local, slots=slots,
                              interpret=interpret)
    if problem:
      raise KernelError(f"{key}: pallas: {problem}")
    return f"pallas_{target}", "requested"
  # auto
  if interpret:
    problem = _pallas_problem(interpret, glu=glu, d_local=d_local, slots=slots, interpret=True)
    return ("xla", problem) if problem else (f"pallas_{interpret}", "interpret mode")
  if platform == "cpu":
    if num_devices > 1:
      return "xla", "a CPU mesh (the FFI kernels per shard only with kernel=cpu_ffi)"
    if not f32_tables:
      return "xla", f"the CPU FFI kernels take f32 tables, got {jnp.dtype(table_dtype)}"
    return "cpu_ffi", "one CPU device"
  problem = _pallas_problem(platform, glu=glu, d_local=d_local, slots=slots, interpret=None)
  if problem:
    return "xla", problem
  return f"pallas_{platform}", f"{platform} backend"


def log_choice(impl: str, reason: str, kernel: str, what: str = "PEER expert path"):
  """Logs once per distinct message when `auto` falls back to XLA on an accelerator."""
  if kernel != "auto" or impl != "xla" or reason.startswith("a CPU mesh"):
    return
  msg = f"peer_jax: {what}: model.peer.kernel=auto takes XLA: {reason}"
  if msg not in _logged:
    _logged.add(msg)
    _log.warning(msg)


def expert_mixture(impl: str, x_TD, idx_THK, w_THK, ins, v_ND, activation, *,
                   chunk_size: int, interpret: bool = False, auto: bool = False):
  """y (T, D) = Σ w · hidden(ins[i]·x) · v[i] with implementation `impl` on one device.

  `ins` is (u,) or (u, g) (GLU). `interpret` runs a Pallas impl in interpret mode. `auto`
  keeps the CPU FFI kernels behind `lax.platform_dependent` (XLA if traced for another
  platform, and for non-f32 inputs), as before the switch existed.
  """
  from peer_jax.ops import chunking, experts
  if impl == "xla" or (impl == "cpu_ffi" and auto):
    return experts._call(x_TD, idx_THK, w_THK, tuple(ins), v_ND, activation, chunk_size,
                         fast_cpu=impl == "cpu_ffi")
  if impl == "cpu_ffi":
    from peer_jax.ops.cpu_experts import peer_experts_cpu
    chunking.check_expert_args(x_TD, idx_THK, w_THK, *ins, v_ND)
    idx_TM, w_TM = chunking.flat_routing(idx_THK, w_THK)
    out_dtype = jnp.result_type(x_TD, w_THK, v_ND, *ins)
    y = peer_experts_cpu(activation, x_TD.astype(jnp.float32),
                         idx_TM, w_TM.astype(jnp.float32), tuple(ins), v_ND)
    return y.astype(out_dtype)
  if len(ins) != 1:
    raise KernelError(f"model.peer.kernel: {impl} has no GLU variant")
  if impl == "pallas_tpu":
    from peer_jax.ops.pallas_experts import peer_experts_pallas
    return peer_experts_pallas(x_TD, idx_THK, w_THK, ins[0], v_ND, activation,
                               interpret=interpret)
  if impl == "pallas_gpu":
    from peer_jax.ops.pallas_experts_gpu import peer_experts_pallas_gpu
    return peer_experts_pallas_gpu(x_TD, idx_THK, w_THK, ins[0], v_ND, activation,
                                   interpret=interpret)
  raise KernelError(f"unknown expert implementation {impl!r}; expected one of {IMPLS}")
