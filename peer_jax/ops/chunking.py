"""The shared core of the chunked expert ops: token chunking, dtypes, argument checks.

Every XLA expert op (`experts.peer_experts`, `sharded_experts.sharded_peer_experts`,
`embedding_bag.embedding_bag`) walks the tokens in chunks of C so that no (T, M, D) gather
exists at once; the CPU FFI ops (`cpu_experts`) share the hidden-value rule. These helpers
are that common part, written once:

* `to_chunks` / `from_chunks`: (T, ...) <-> (T_pad / C, C, ...) with a zero-padded tail.
* `map_chunks`: a `lax.map` over token chunks, results back to (T, ...).
* `clamp_chunk`: the chunk size actually used for T tokens.
* `flat_routing`: (T, H, K) indices / weights -> (T, M) int32 ids and weights.
* `acc_dtype`: the compute / accumulation dtype (never below f32).
* `hidden`: the expert hidden value from its pre-activations, σ(a) or GLU's σ(g) · a.
* `check_expert_args`: the shapes every expert implementation needs.
* `round_up`: n rounded up to a multiple of m (the Pallas kernels' block padding).
"""

import jax
import jax.numpy as jnp
from jax import lax


def acc_dtype(*arrays):
  """Compute/accumulation dtype: the inputs' float type, but never below f32."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def to_chunks(a, chunk_size):
  """(T, ...) -> (T_pad / C, C, ...), zero-padding the tail.

  Zero padding is inert: padded tokens have weight 0 and cotangent 0, so they add
  nothing to y or to any table gradient, and their dx / dweights rows are sliced away.
  """
  num_tokens = a.shape[0]
  pad = -num_tokens % chunk_size
  if pad:
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
  return a.reshape(-1, chunk_size, *a.shape[1:])


def from_chunks(a, num_tokens):
  """(T_pad / C, C, ...) -> (T, ...)."""
  return a.reshape(-1, *a.shape[2:])[:num_tokens]


def clamp_chunk(chunk_size, num_tokens):
  """The chunk size for `num_tokens` tokens: a chunk larger than T would only add padding."""
  return max(1, min(int(chunk_size), num_tokens))


def flat_routing(indices, weights):
  """(T, ...) expert ids and weights -> (T, M) int32 ids and (T, M) weights."""
  num_tokens = indices.shape[0]
  return (indices.reshape(num_tokens, -1).astype(jnp.int32),
          weights.reshape(num_tokens, -1))


def hidden(activation, pre_tuple):
  """Expert hidden value from the pre-activations: σ(a) or, for GLU, σ(g) · a."""
  if len(pre_tuple) == 1:
    return activation(pre_tuple[0])
  up, gate = pre_tuple
  return activation(gate) * up


def check_routing(num_tokens, indices, weights):
  """indices and weights (T, H, K) of one shape with T = num_tokens, else ValueError."""
  if indices.shape != weights.shape or indices.shape[0] != num_tokens:
    raise ValueError(f"indices {indices.shape} / weights {weights.shape} must be (T, H, K), "
                     f"T = {num_tokens}")


def check_expert_args(x, indices, weights, *tables):
  """The shapes every expert-path implementation needs: x (T, D), indices and weights
  (T, H, K), tables (N, D) of one shape. Raises ValueError naming what is wrong."""
  num_tokens, d = x.shape
  check_routing(num_tokens, indices, weights)
  shapes = [t.shape for t in tables]
  if any(s != shapes[0] or len(s) != 2 or s[1] != d for s in shapes):
    raise ValueError(f"tables {shapes} must all be (N, {d})")


def map_chunks(body, arrays, chunk_size):
  """`lax.map` of `body` over token chunks of `arrays` (all (T, ...)); every output leaf
  back to (T, ...)."""
  num_tokens = arrays[0].shape[0]
  out = lax.map(body, tuple(to_chunks(a, chunk_size) for a in arrays))
  return jax.tree.map(lambda o: from_chunks(o, num_tokens), out)


def round_up(n, m):
  """n rounded up to a multiple of m."""
  return -(-n // m) * m
