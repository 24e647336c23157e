"""Shared building blocks for the layers: parameters with logical axis names, norms, dtypes.

Every parameter is created through `param`, which records its logical axis names
(`embed`, `mlp`, `heads`, `vocab`, `experts`, ...) as `out_sharding` metadata. The
mapping of logical names to mesh axes lives in one rules table in the config
(`peer_jax.sharding`), so a new parallelism is a config change, not a code change.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
  """A parameter initialised with `init`, annotated with one logical axis name per dim."""
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} axis names {tuple(names)} for a {len(shape)}-d shape")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


def fan_in_normal(fan_in: int, scale: float = 1.0) -> Initializer:
  """Normal init with std scale/sqrt(fan_in): keeps activation scale through a matmul."""
  return nnx.initializers.normal(stddev=scale / fan_in**0.5)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float = 1e-6) -> jax.Array:
  """RMSNorm computed in f32 (bf16 mean-of-squares loses too much precision)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned per-feature scale (initialised to one)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, name: str = "embed", eps: float = 1e-6):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), (name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)
