"""Causal multi-head self-attention with rotary position embeddings.

Packed sequences carry `segment_ids`: a token attends only to earlier tokens of its
own document, so packing never lets documents see each other.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers.common import fan_in_normal, param


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form) applied to the last axis of x."""
  half = x_BTHK.shape[-1] // 2
  freqs_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTK = positions_BT[..., None].astype(jnp.float32) * freqs_K
  sin_BT1K = jnp.sin(angles_BTK)[:, :, None, :]
  cos_BT1K = jnp.cos(angles_BTK)[:, :, None, :]
  x1, x2 = x_BTHK[..., :half].astype(jnp.float32), x_BTHK[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos_BT1K - x2 * sin_BT1K, x2 * cos_BT1K + x1 * sin_BT1K], axis=-1)
  return out.astype(x_BTHK.dtype)


def causal_mask(segment_ids_BT: jax.Array | None, length: int) -> jax.Array:
  """(B or 1, 1, T, T) boolean mask: causal, and within one segment when packed."""
  mask_TT = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
  if segment_ids_BT is None:
    return mask_TT
  same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return mask_TT & same_BTT[:, None]


class Attention(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               rope_theta: float = 10_000.0, out_scale: float = 1.0):
    head_dim = d_model // num_heads
    self.num_heads, self.head_dim, self.rope_theta, self.dtype = num_heads, head_dim, rope_theta, dtype
    init_in = fan_in_normal(d_model)
    names_in = ("embed", "heads", "head_dim")
    self.wq_DHK = param(rngs, init_in, (d_model, num_heads, head_dim), names_in)
    self.wk_DHK = param(rngs, init_in, (d_model, num_heads, head_dim), names_in)
    self.wv_DHK = param(rngs, init_in, (d_model, num_heads, head_dim), names_in)
    self.wo_HKD = param(rngs, fan_in_normal(d_model, out_scale), (num_heads, head_dim, d_model),
                        ("heads", "head_dim", "embed"))

  def _w(self, p: nnx.Param) -> jax.Array:
    return p[...].astype(self.dtype)

  def _qkv(self, x_BTD, positions_BT):
    x_BTD = x_BTD.astype(self.dtype)
    q_BTHK = rope(jnp.einsum("btd,dhk->bthk", x_BTD, self._w(self.wq_DHK)), positions_BT,
                  self.rope_theta)
    k_BTHK = rope(jnp.einsum("btd,dhk->bthk", x_BTD, self._w(self.wk_DHK)), positions_BT,
                  self.rope_theta)
    v_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, self._w(self.wv_DHK))
    return q_BTHK, k_BTHK, v_BTHK

  def _attend(self, q_BTHK, k_BSHK, v_BSHK, mask) -> jax.Array:
    # Scores and softmax in f32: bf16 logits lose the small differences softmax amplifies.
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                             preferred_element_type=jnp.float32) / jnp.sqrt(self.head_dim)
    logits_BHTS = jnp.where(mask, logits_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(self.dtype)
    out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
    return jnp.einsum("bthk,hkd->btd", out_BTHK, self._w(self.wo_HKD))

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               segment_ids_BT: jax.Array | None = None) -> jax.Array:
    q_BTHK, k_BTHK, v_BTHK = self._qkv(x_BTD, positions_BT)
    return self._attend(q_BTHK, k_BTHK, v_BTHK, causal_mask(segment_ids_BT, x_BTD.shape[1]))

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    shape = (batch, max_len, self.num_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "length": jnp.zeros((), jnp.int32)}

  def extend(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: dict
             ) -> tuple[jax.Array, dict]:
    """Attend T new tokens to the cached ones and themselves; returns the grown cache.

    Used for decoding: a prompt fills the cache once (T = prompt length), then each
    generated token is one call with T = 1. Same math as __call__ on the whole sequence.
    """
    q_BTHK, k_BTHK, v_BTHK = self._qkv(x_BTD, positions_BT)
    start = cache["length"]
    k_BSHK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BTHK.astype(self.dtype), start, 1)
    v_BSHK = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BTHK.astype(self.dtype), start, 1)
    t = x_BTD.shape[1]
    query_pos_T = start + jnp.arange(t)
    key_pos_S = jnp.arange(k_BSHK.shape[1])
    mask = (key_pos_S[None, :] <= query_pos_T[:, None])[None, None]  # (1, 1, T, S)
    out = self._attend(q_BTHK, k_BSHK, v_BSHK, mask)
    return out, {"k": k_BSHK, "v": v_BSHK, "length": start + t}
