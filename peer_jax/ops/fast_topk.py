"""A faster top-k on CPU: a multi-threaded XLA FFI kernel (cpu_topk.cc) behind `top_k`.

XLA:CPU's TopK is single-threaded with a fixed ~2 us cost per row; at the PEER reference
size (T·h = 16384 rows of n = 1024 sub-key scores, three top-k's per layer) it is the
largest part of the retrieval. `top_k(x, k)` returns exactly what `lax.top_k(x, k)` does
(same order, ties to the lower index) and uses the kernel when it can:

* f32 input, 1 <= k <= n, traced for the CPU (`lax.platform_dependent`: on GPU and TPU the
  program uses `lax.top_k`, so AOT compiles for TPU never see the custom call);
* the kernel library builds: it is compiled at first use with the system C++ compiler
  against the FFI headers that ship with jaxlib, into a per-user cache
  ($PEER_JAX_CACHE, default ~/.cache/peer_jax); set PEER_JAX_FAST_TOPK=0 to turn it off.

If the build fails (no compiler, say), `top_k` warns once and falls back to `lax.top_k`.
The custom call has no partitioning rule, so callers use it only on single-device
programs (see `peer_jax.layers.peer`); GSPMD would otherwise replicate its operand.
"""

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax import lax

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_topk.cc")
_TARGET = "peer_jax_topk_f32"
_SYMBOL = "PeerJaxTopKF32"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")


def _cache_dir() -> str:
  root = os.environ.get("PEER_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "peer_jax")
  return os.path.join(root, "ffi")


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def _library_path() -> str:
  """Cache file name: changes with the source, jaxlib (its FFI headers) and compiler."""
  import jaxlib
  digest = hashlib.sha256()
  with open(_SOURCE, "rb") as f:
    digest.update(f.read())
  digest.update(jaxlib.__version__.encode())
  digest.update(" ".join((_compiler(),) + _FLAGS).encode())
  return os.path.join(_cache_dir(), f"cpu_topk_{digest.hexdigest()[:16]}.so")


def build(verbose: bool = False) -> str:
  """Compiles the kernel into the cache if it is not there yet; returns the .so path."""
  path = _library_path()
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Build into a private file and rename: concurrent processes (pytest -n, several
  # hosts' workers on one NFS home) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = [_compiler(), *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"building the CPU top-k kernel failed ({' '.join(cmd)}):\n"
                         f"{proc.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  if verbose:
    print(f"built {path}", file=sys.stderr)
  return path


_registered = False


@functools.cache
def available() -> bool:
  """Builds and registers the kernel once per process; False (with a warning) if it fails."""
  global _registered
  if os.environ.get("PEER_JAX_FAST_TOPK", "1").lower() in ("0", "false", "no", "off"):
    return False
  if _registered:
    return True
  try:
    lib = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(lib, _SYMBOL)),
                                platform="cpu")
    _registered = True
    return True
  except (OSError, RuntimeError, AttributeError, FileNotFoundError) as e:
    logging.warning("peer_jax: fast CPU top-k unavailable, using lax.top_k (%s)", e)
    return False


def _ffi_top_k(x, k):
  shape = x.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(
      _TARGET,
      (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32)),
      # Rows are independent: a vmapped call is the same kernel over more rows.
      vmap_method="broadcast_all")
  values, indices = call(x)
  return values, indices


def top_k(x, k: int):
  """`lax.top_k(x, k)` over the last axis: (values, int32 indices), descending.

  Not differentiable (callers stop gradients and route them through the indices, as
  `product_key_topk` does).
  """
  k = int(k)
  if x.dtype != jnp.float32 or x.ndim == 0 or not 1 <= k <= x.shape[-1] or not available():
    return lax.top_k(x, k)
  x = lax.stop_gradient(x)
  return lax.platform_dependent(
      x, cpu=lambda a: _ffi_top_k(a, k), default=lambda a: tuple(lax.top_k(a, k)))
