"""Build and register peer_jax's XLA FFI CPU kernels (cpu_topk.cc, cpu_experts.cc).

The kernels are compiled at first use with the system C++ compiler against the FFI
headers that ship with jaxlib, into a per-user cache ($PEER_JAX_CACHE, default
~/.cache/peer_jax), keyed by the sources, jaxlib's version, the compiler and the flags.
`available()` is False (with one warning) when the build fails, and callers then use
their pure-XLA paths; PEER_JAX_CPU_KERNELS=0 turns the kernels off.

The custom calls have no partitioning rule, so callers use them only in single-device
programs (see `peer_jax.layers.peer`); GSPMD would otherwise replicate their operands.
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

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("cpu_topk.cc", "cpu_experts.cc")
_HEADERS = ("cpu_parallel.h",)
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> exported handler symbol.
TARGETS = {
    "peer_jax_topk_f32": "PeerJaxTopKF32",
    "peer_jax_gather_dot_f32": "PeerJaxGatherDotF32",
    "peer_jax_gather_wsum_f32": "PeerJaxGatherWsumF32",
    "peer_jax_scatter_outer_f32": "PeerJaxScatterOuterF32",
}

_registered = False


def _cache_dir() -> str:
  root = os.environ.get("PEER_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "peer_jax")
  return os.path.join(root, "ffi")


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def _library_path() -> str:
  import jaxlib
  digest = hashlib.sha256()
  for name in _SOURCES + _HEADERS:
    with open(os.path.join(_HERE, name), "rb") as f:
      digest.update(f.read())
  digest.update(jaxlib.__version__.encode())
  digest.update(" ".join((_compiler(),) + _FLAGS).encode())
  return os.path.join(_cache_dir(), f"peer_jax_cpu_{digest.hexdigest()[:16]}.so")


def build() -> str:
  """Compiles the kernels into the cache if they are not there yet; returns the .so path."""
  path = _library_path()
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Build into a private file and rename: concurrent processes (pytest -n, several
  # hosts' workers on one NFS home) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  print(f"peer_jax: compiling the CPU kernels into {path} (once per machine, ~10 s)",
        file=sys.stderr, flush=True)
  cmd = [_compiler(), *_FLAGS, "-I", jax.ffi.include_dir(), "-I", _HERE,
         *(os.path.join(_HERE, name) for name in _SOURCES), "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n"
                         f"{proc.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def available() -> bool:
  """Builds and registers the kernels once per process; False (with a warning) if it fails."""
  global _registered
  if os.environ.get("PEER_JAX_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
    return False
  if _registered:
    return True
  try:
    lib = ctypes.cdll.LoadLibrary(build())
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
    _registered = True
    return True
  except (OSError, RuntimeError, AttributeError) as e:
    logging.warning("peer_jax: CPU FFI kernels unavailable, using the XLA paths (%s)", e)
    return False
