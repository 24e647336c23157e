"""Pure-JAX PEER kernels and their naive references (no Flax, configs or meshes)."""

from peer_jax.ops.experts import (
    DEFAULT_CHUNK_SIZE,
    peer_experts,
    peer_experts_glu,
    peer_experts_glu_reference,
    peer_experts_reference,
)
from peer_jax.ops.pallas_experts import peer_experts_pallas
from peer_jax.ops.pallas_experts_gpu import peer_experts_pallas_gpu
from peer_jax.ops.product_keys import product_key_topk, product_key_topk_reference

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "peer_experts",
    "peer_experts_glu",
    "peer_experts_glu_reference",
    "peer_experts_reference",
    "product_key_topk",
    "product_key_topk_reference",
]
