"""The dense FFW (the baseline, and every block outside `model.ffw_layers`).

Its FLOPs and parameters are the shared transformer parts of peer_jax.flops (one dense
FFW per block), so it declares no terms of its own.
"""

from peer_jax.kinds.base import FFWKind
from peer_jax.layers.ffw import DenseFFW


def build(m, *, rngs, dtype, out_scale, shared=None):
  return DenseFFW(m.d_model, m.d_ff, m.ffw_activation, rngs=rngs, dtype=dtype,
                  out_scale=out_scale)


KIND = FFWKind(name="dense", label="Dense", build=build, dense_ffws=lambda m: 1,
               color="tab:gray")
