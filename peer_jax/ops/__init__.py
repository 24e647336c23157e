"""PEER kernels and their naive references (no Flax, configs or meshes).

The Pallas versions are imported from their modules (`peer_jax.ops.pallas_experts`,
`peer_jax.ops.pallas_experts_gpu`), so that training does not load Pallas."""

from peer_jax.ops.experts import (
    DEFAULT_CHUNK_SIZE,
    peer_experts,
    peer_experts_glu,
    peer_experts_glu_reference,
    peer_experts_reference,
)
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
