"""PKM (peer_jax.layers.pkm): product-key memory, Lample et al. 2019. `model.pkm`."""

from peer_jax.kinds.base import FFWKind
from peer_jax.kinds.retrieval_cost import retrieval_flop_terms, retrieval_params
from peer_jax.layers.peer import QUERY_NORMS, VALUE_INITS
from peer_jax.layers.pkm import PKM


def build(m, *, rngs, dtype, out_scale, shared=None):
  p = m.pkm
  return PKM(m.d_model, num_memories=p.num_memories, heads=p.heads, top_k=p.top_k,
             key_dim=p.key_dim, query_norm=p.query_norm,
             value_init=p.get("value_init", "match_dense"), out_scale=out_scale,
             kernel=p.get("kernel", "auto"), rngs=rngs, dtype=dtype)


def validate(cfg, checks):
  checks.product_keys(cfg, "model.pkm", "num_memories", "key_dim")
  checks.choice(cfg, "model.pkm.query_norm", QUERY_NORMS)
  checks.choice(cfg, "model.pkm.value_init", VALUE_INITS)
  checks.kernel(cfg, "model.pkm.kernel")


def validate_bag_kernel(kernel: str, key: str, *, num_devices, platform):
  """The embedding bag's kernel setting can run (KernelError naming `key` if not)."""
  from peer_jax.layers.common import DTYPES
  from peer_jax.layers.pkm import resolve_bag_kernel
  from peer_jax.ops.kernels import KernelError
  try:
    resolve_bag_kernel(kernel, num_devices=num_devices, table_dtype=DTYPES["float32"],
                       platform=platform)
  except KernelError as e:
    raise KernelError(str(e).replace("model.pkm.kernel", key)) from None


def validate_kernel(cfg, *, sizes, rules, num_devices, platform):
  if "kernel" in cfg.model.pkm:
    validate_bag_kernel(cfg.model.pkm.kernel, "model.pkm.kernel", num_devices=num_devices,
                        platform=platform)


def flop_terms(m, n_exp: int, seq_len: int) -> dict:
  if not n_exp:
    return {}
  p = m.pkm
  first, topk = retrieval_flop_terms("pkm", n_exp, m.d_model, p.heads, p.top_k, p.key_dim,
                                     p.num_memories, "model.pkm.num_memories")
  # the weighted sum of h·k value rows (V = D)
  return {**first, "pkm_values": n_exp * 2 * p.heads * p.top_k * m.d_model, **topk}


def param_counts(m, n_exp: int, seq_len):
  if not n_exp:
    return 0, 0, 0.0
  p, d = m.pkm, m.d_model
  retrieval = retrieval_params(d, p.heads, p.key_dim, p.num_memories, "model.pkm.num_memories",
                               p.query_norm, p.heads)  # PKM always uses per-head sub-keys
  return n_exp * retrieval, n_exp * p.num_memories * d, n_exp * p.heads * p.top_k * d


KIND = FFWKind(
    name="pkm", label="PKM", section="pkm", build=build, validate=validate,
    validate_kernel=validate_kernel, flop_terms=flop_terms, param_counts=param_counts,
    gathered=lambda m, n: ({"pkm": n * m.pkm.heads * m.pkm.top_k * m.d_model} if n else {}),
    pool_size=lambda m: m.pkm.num_memories,
    table_shape=lambda m, n: (m.pkm.num_memories, m.pkm.heads * m.pkm.top_k),
    table_names=("values_NV",), unsharded_names=("experts",),
    kernel_key="model.pkm.kernel", color="tab:green")
