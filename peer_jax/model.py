"""Decoder-only transformer whose blocks hold a feed-forward layer of any registered kind.

Which FFW each block uses comes from the config (`model.ffw`, `model.ffw_layers`); how a
kind is built comes from its entry in `peer_jax.kinds`. The layers themselves know
nothing of configs or training.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax import kinds, sharding
from peer_jax.layers.attention import Attention
from peer_jax.layers.common import DTYPES, RMSNorm, fan_in_normal, param

FFW_KINDS = kinds.names()
DENSE = kinds.DENSE  # the kind of the blocks outside model.ffw_layers


def expert_layer_indices(ffw_layers: str, num_layers: int) -> tuple[int, ...]:
  """Blocks that use `model.ffw`: 'middle', 'all', 'none' or comma-separated indices.

  'middle' is block (L-1)//2 (0-based), i.e. block 6 of 12 counting from one, as in the
  paper's comparisons.
  """
  spec = str(ffw_layers).strip().lower()
  if spec == "middle":
    return ((num_layers - 1) // 2,)
  if spec == "all":
    return tuple(range(num_layers))
  if spec in ("none", ""):
    return ()
  try:
    layers = tuple(sorted({int(s) for s in spec.replace(" ", "").strip("()[]").split(",") if s}))
  except ValueError:
    raise ValueError(
        f"model.ffw_layers: expected 'middle', 'all', 'none' or comma-separated block indices, "
        f"got {ffw_layers!r}") from None
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"model.ffw_layers: block indices {bad} outside 0..{num_layers - 1}")
  return layers


def is_causal(cfg) -> bool:
  """Whether the model's output at position t depends only on tokens <= t (in eval mode;
  in training, query batch-norm pools statistics over the whole batch, as in the paper).

  The kind decides (expert-choice MoE ranks each expert's tokens over the whole sequence,
  so it is not).
  """
  if expert_layer_indices(cfg.ffw_layers, cfg.num_layers):
    return kinds.get(cfg.ffw).causal(cfg)
  return True


def make_ffw(cfg, kind: str, *, rngs: nnx.Rngs, dtype, out_scale: float,
             shared: dict | None = None) -> nnx.Module:
  """The FFW layer of one block, built by its kind from the `model` config section.

  `shared`: one dict per model, where a kind keeps modules its blocks share.
  """
  return kinds.get(kind).build(cfg, rngs=rngs, dtype=dtype, out_scale=out_scale,
                               shared={} if shared is None else shared)


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + ffw(norm(x)) (+ a dense FFW in parallel)."""

  def __init__(self, cfg, kind: str, *, rngs: nnx.Rngs, dtype, shared: dict | None = None):
    out_scale = (2 * cfg.num_layers) ** -0.5  # keeps the residual stream's scale with depth
    self.attn_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.attn = Attention(cfg.d_model, cfg.num_heads, rngs=rngs, dtype=dtype,
                          rope_theta=cfg.rope_theta, out_scale=out_scale)
    self.ffw_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.ffw = make_ffw(cfg, kind, rngs=rngs, dtype=dtype, out_scale=out_scale, shared=shared)
    # A kind whose blocks keep a dense FFW beside it (PEER placement='parallel').
    parallel = kinds.get(kind).parallel_dense(cfg)
    self.parallel_ffw = (make_ffw(cfg, DENSE, rngs=rngs, dtype=dtype, out_scale=out_scale)
                         if parallel else None)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, train: bool):
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
    h_BTD = self.ffw_norm(x_BTD)
    y_BTD, aux = self.ffw(h_BTD, train=train, segment_ids_BT=segment_ids_BT)
    if self.parallel_ffw is not None:
      y_BTD = y_BTD + self.parallel_ffw(h_BTD, train=train)[0]
    return x_BTD + y_BTD.astype(x_BTD.dtype), aux


  def extend(self, x_BTD, positions_BT, cache: dict):
    """Decoding: the block applied to new tokens given the attention cache of earlier ones."""
    attn_out, cache = self.attn.extend(self.attn_norm(x_BTD), positions_BT, cache)
    x_BTD = x_BTD + attn_out
    h_BTD = self.ffw_norm(x_BTD)
    y_BTD, _ = self.ffw(h_BTD, train=False, decode=True)
    if self.parallel_ffw is not None:
      y_BTD = y_BTD + self.parallel_ffw(h_BTD, train=False)[0]
    return x_BTD + y_BTD.astype(x_BTD.dtype), cache


def remat_policy():
  """What model.remat keeps from a block's forward: only the expert layers' small routing
  arrays (product-key top-k values and indices) and the sharded bank's (T, h·k)
  pre-activations, ~12 bytes per token and retrieval. Everything else is recomputed; with
  these kept the backward repeats neither the sub-key scores and sorts nor the u-row
  gathers (docs/scaling.md)."""
  from peer_jax.ops.product_keys import ROUTING_NAME
  from peer_jax.ops.sharded_experts import PRE_NAME
  return jax.checkpoint_policies.save_only_these_names(ROUTING_NAME, PRE_NAME)


def _run_block(block: Block, x_BTD, positions_BT, segment_ids_BT, train: bool):
  return block(x_BTD, positions_BT, segment_ids_BT, train)


class Transformer(nnx.Module):
  """tokens (B, T) -> logits (B, T, V) in f32, plus a dict of per-block FFW aux outputs."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    # Only plain values are kept on the module: its static attributes become part of the
    # graph definition, which jit hashes.
    self.dtype = DTYPES[cfg.dtype]
    self.num_layers = cfg.num_layers
    self.d_model = cfg.d_model
    self.remat = bool(cfg.remat)
    expert_layers = expert_layer_indices(cfg.ffw_layers, cfg.num_layers)
    self.embed_VD = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                          ("vocab", "embed"))
    shared: dict = {}  # modules the blocks of one kind share (Memory+'s value pool)
    for i in range(cfg.num_layers):
      kind = cfg.ffw if i in expert_layers else DENSE
      setattr(self, f"block_{i}", Block(cfg, kind, rngs=rngs, dtype=self.dtype, shared=shared))
    self.final_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.unembed_DV = (None if cfg.tie_embeddings else
                       param(rngs, fan_in_normal(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                             ("embed", "vocab")))

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(self.dtype)
    # Block boundaries carry the residual stream sharded by the rules (no-op off a mesh).
    act_names = ("batch", "length", "embed")
    x_BTD = sharding.constrain(x_BTD, act_names)
    # Rematerialise each block: its activations are recomputed in the backward pass.
    run = (nnx.remat(_run_block, static_argnums=(4,), policy=remat_policy()) if self.remat
           else _run_block)
    aux = {}
    for i in range(self.num_layers):
      x_BTD, block_aux = run(getattr(self, f"block_{i}"), x_BTD, positions_BT, segment_ids_BT,
                             train)
      x_BTD = sharding.constrain(x_BTD, act_names)
      if block_aux:
        aux[f"block_{i}"] = block_aux
    return self._logits(x_BTD), aux

  def _logits(self, x_BTD: jax.Array) -> jax.Array:
    h_BTD = self.final_norm(x_BTD)
    if self.unembed_DV is None:
      # Tied output: the embedding has unit-variance rows, so scale logits by 1/sqrt(D).
      w_DV = self.embed_VD[...].T * self.d_model**-0.5
    else:
      w_DV = self.unembed_DV[...]
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, w_DV.astype(self.dtype),
                            preferred_element_type=jnp.float32)
    return logits_BTV

  def init_cache(self, batch: int, max_len: int) -> list[dict]:
    """Empty attention caches (one per block) for decoding up to `max_len` tokens."""
    return [getattr(self, f"block_{i}").attn.init_cache(batch, max_len)
            for i in range(self.num_layers)]

  def extend(self, tokens_BT: jax.Array, caches: list[dict]) -> tuple[jax.Array, list[dict]]:
    """Logits of T new tokens that follow the cached ones (eval mode; no packing)."""
    start = caches[0]["length"]
    positions_BT = jnp.broadcast_to(start + jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(self.dtype)
    new_caches = []
    for i in range(self.num_layers):
      x_BTD, cache = getattr(self, f"block_{i}").extend(x_BTD, positions_BT, caches[i])
      new_caches.append(cache)
    return self._logits(x_BTD), new_caches
