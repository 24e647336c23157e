"""FLOPs and parameters of product-key retrieval (layers/peer.ProductKeyRetrieval), which
PEER, PKM and Memory+ share; each kind adds the terms of what it does with the retrieved
rows."""

from peer_jax.layers.peer import exact_sqrt, query_norm_params


def retrieval_flop_terms(prefix: str, n_exp: int, d: int, heads: int, top_k: int,
                         key_dim: int, num_rows: int, rows_key: str) -> tuple[dict, dict]:
  """({prefix_query, _subkey_scores, _candidate_sums}, {prefix_topk_ops}): forward FLOPs per
  token of n_exp retrieval layers over num_rows = n² rows (the top-k ops go last in a
  kind's terms)."""
  n = exact_sqrt(num_rows, rows_key)
  h, k, q = heads, top_k, key_dim
  first = {
      f"{prefix}_query": n_exp * 2 * d * h * q,
      # Each head's two query halves (q/2 dims) against √N sub-keys each: 2·2·√N·q/2.
      f"{prefix}_subkey_scores": n_exp * 2 * h * n * q,
      f"{prefix}_candidate_sums": n_exp * h * k * k,  # s1[a] + s2[b] for the k×k candidates
  }
  return first, {f"{prefix}_topk_ops": n_exp * h * (2 * n + k * k)}


def retrieval_params(d: int, heads: int, key_dim: int, num_rows: int, rows_key: str,
                     query_norm: str, key_sets: int) -> int:
  """Parameters of one retrieval layer: the query projection, its norm and key_sets sets of
  two √N × key_dim/2 sub-key tables (one set per head, or one shared)."""
  n = exact_sqrt(num_rows, rows_key)
  q_dim = heads * key_dim
  return d * q_dim + query_norm_params(query_norm, q_dim) + 2 * key_sets * n * (key_dim // 2)
