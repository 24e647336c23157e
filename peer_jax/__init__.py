"""peer_jax: language models with PEER layers (Mixture of A Million Experts) in JAX/Flax NNX."""

import flax

# Parameters carry logical axis names as metadata only; peer_jax maps them to mesh
# axes itself (peer_jax.sharding) and places them with jit out_shardings, so Flax
# must not try to shard variables eagerly at construction time.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
