"""Pallas GPU (Triton) expert kernels (peer_jax/ops/pallas_experts_gpu.py) vs the reference.

Values and gradients run in Pallas interpret mode on CPU (what `interpret=None` picks
there); each interpreted shape costs seconds of XLA compile, so the default suite keeps one
forward case, the argument checks, and the Triton lowering check (`jax.export` for
platforms=["cuda"] at paper scale: Pallas lowers the kernels to Triton IR in Python, no GPU
needed). Values + gradients over the case matrix are `slow`
(`pytest -m slow tests/test_pallas_gpu.py`).

Tolerances: the kernels compute in f32 whatever the table dtype, so against the f32
reference (bf16 tables upcast) values and gradients agree to f32 rounding of sums of a few
dozen terms: rtol = atol = 1e-4 relative to max |ref| (observed ~1e-6). Table gradients
of bf16 tables come back in bf16: rtol 1e-2 / atol 1e-2 · max |ref|.
"""

import re

import pytest

import jax
import jax.numpy as jnp

from tests.expert_cases import assert_close, check_values_and_gradients, expert_inputs
from peer_jax.ops import peer_experts_reference
from peer_jax.ops.pallas_experts_gpu import peer_experts_pallas_gpu


def test_forward_matches_reference():
  # T = 20 is not a multiple of the 8-token block; N = 64 with 8 slots per token repeats
  # experts within and across tokens; D = 64 in two column blocks of 32.
  x, idx, w, u, v = expert_inputs(0, 20, 64, 2, 4, 64)
  fn = jax.jit(lambda *a: peer_experts_pallas_gpu(*a, block_tokens=8, block_pairs=16,
                                                   block_d=32))
  y = fn(x, idx, w, u, v)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert_close(y, peer_experts_reference(x, idx, w, u, v))


def test_argument_checks():
  x, idx, w, u, v = expert_inputs(0, 8, 40, 1, 8, 16)
  with pytest.raises(ValueError, match="must be"):
    peer_experts_pallas_gpu(x, idx, w[:, :, :4], u, v)
  with pytest.raises(ValueError, match="powers of 2"):
    peer_experts_pallas_gpu(x, idx, w, u, v, block_tokens=12)
  with pytest.raises(ValueError, match="D % 16"):
    peer_experts_pallas_gpu(x, idx, w, u, v, interpret=False)


def _triton_calls(fn, args):
  exported = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args)
  return re.findall(r'custom_call @__gpu\$xla\.gpu\.triton\(.*name = "(\w+)"',
                    exported.mlir_module())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_to_triton_for_cuda(dtype):
  # Paper scale: T = 4096, D = 1024, h·k = 128, N = 1024² (tables > 2³² bytes in f32, so
  # the table offsets are 64-bit). Lowering only: no GPU, no PTX.
  s = jax.ShapeDtypeStruct
  t, d, h, k, n = 4096, 1024, 8, 16, 1024**2
  args = (s((t, d), jnp.float32), s((t, h, k), jnp.int32), s((t, h, k), jnp.float32),
          s((n, d), dtype), s((n, d), dtype))
  fwd = lambda *a: peer_experts_pallas_gpu(*a, interpret=False)

  def fwd_bwd(x, idx, w, u, v):
    loss = lambda x, w, u, v: jnp.sum(fwd(x, idx, w, u, v))
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, u, v)

  assert _triton_calls(fwd, args) == ["_pair_kernel", "_rows_kernel"]
  assert sorted(_triton_calls(fwd_bwd, args)) == ["_pair_kernel", "_rows_kernel",
                                                   "_segment_kernel"]


_CASES = [
    # (T, D, H, K, N, table dtype, block_tokens, block_pairs, block_rows, block_d,
    #  chunk_pairs, activation)
    (16, 32, 2, 4, 64, jnp.float32, 8, 16, 16, 32, 16, jax.nn.gelu),    # T divisible
    (20, 32, 2, 4, 72, jnp.float32, 8, 16, 16, 32, 16, jax.nn.relu),    # T, N not divisible
    (40, 128, 1, 8, 512, jnp.float32, 16, 32, 32, 64, 16, jax.nn.gelu),  # 2 column blocks
    (10, 48, 1, 3, 40, jnp.float32, 8, 16, 16, 128, 16, jax.nn.gelu),   # M = 3, D = 3·16
    (24, 32, 2, 4, 64, jnp.bfloat16, 8, 16, 16, 32, 16, jax.nn.gelu),   # bf16 tables
    (18, 128, 2, 4, 256, jnp.bfloat16, 16, 32, 16, 128, 16, jax.nn.gelu),  # bf16, defaults
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-M{c[2] * c[3]}-"
                         f"N{c[4]}-{jnp.dtype(c[5]).name}-{c[11].__name__}")
def test_values_and_gradients_match_reference(case):
  t, d, h, k, n, dt, bt, bp, br, bd, chunk, act = case
  gpu = lambda *a: peer_experts_pallas_gpu(*a, block_tokens=bt, block_pairs=bp,
                                           block_rows=br, block_d=bd, chunk_pairs=chunk)
  check_values_and_gradients(gpu, expert_inputs(1, t, d, h, k, n, dt), dt, act)
