"""Analytical FLOPs, parameter counts, peak FLOP/s and MFU for peer_jax models.

Everything but the CPU peak measurement is plain Python arithmetic on the `model` config
section (configs/base.py); nothing is built or compiled, so a sweep planner can call it
for thousands of configs. docs/flops.md writes out every formula and convention;
tests/test_flops.py checks them against XLA's `cost_analysis()` and the real model.

    flops_per_token(model_cfg, seq_len, training=False) -> dict of per-token terms + 'total'
    param_counts(model_cfg)                             -> total / active / embedding / tables
    gathered_elements_per_token(model_cfg)              -> table elements read by index
    device_peak_flops(device=None)                      -> peak FLOP/s of one chip (or None)
    mfu(tokens_per_sec, flops_per_token_training, peak_flops, num_devices) -> fraction

Conventions (see docs/flops.md):
* A multiply-add is 2 FLOPs; only matmul-like work (and the k² product-key candidate
  sums) is counted. Norms, activations, softmaxes, RoPE and the router's softmax are
  elementwise and left out (XLA counts them; they are a few % of the total at the sizes
  tested).
* Attention scores: 'attention_scores' counts the full T×T score and value matmuls, as
  XLA (and the code: a dense masked T×T einsum) does; 'attention_scores_causal' counts
  only the (T+1)/2 keys an average query may attend to. 'total' uses the full count;
  'total_causal' the causal one.
* Top-k selections are comparisons, not FLOPs: reported as '*_topk_ops' (elements fed to
  a top-k), never added to the totals.
* Training = 3 × forward (forward + backward, the backward costing two forwards: one
  matmul for the input gradient, one for the weight gradient). With model.remat the
  blocks (not the embedding/unembedding) are recomputed once more in the backward: the
  block terms are multiplied by 4.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

from peer_jax.layers.moe import expert_capacity
from peer_jax.model import expert_layer_indices

# --------------------------------------------------------------------------- helpers


def _expert_layers(m) -> tuple[int, ...]:
  return expert_layer_indices(m.ffw_layers, m.num_layers)


def _isqrt_exact(num: int, what: str) -> int:
  n = math.isqrt(int(num))
  if n * n != num:
    raise ValueError(f"{what} must be a perfect square, got {num}")
  return n


def moe_choices_per_token(e) -> int:
  """Expert slots a token asks for: 1 with expert choice, top_k with token choice."""
  return int(e.get("top_k", 2)) if e.get("routing", "expert_choice") == "token_choice" else 1


def moe_capacity(seq_len: int, num_experts: int, capacity_factor: float, top_k: int = 1) -> int:
  """Slots each MoE expert computes per sequence: min(T·k, ceil(T·k·capacity_factor/E)), >= 1."""
  return expert_capacity(seq_len, num_experts, capacity_factor, top_k)


def moe_experts_per_token(m, seq_len: int | None = None) -> float:
  """Expert FFWs computed per token: E·C/T slots (≈ capacity_factor, × top_k with token
  choice). Every slot is computed whether or not a token fills it, so this is the cost.

  Without seq_len, the value the ceil/clip rounding tends to.
  """
  e = m.moe
  k = moe_choices_per_token(e)
  if seq_len is None:
    return float(min(e.capacity_factor * k, e.num_experts * k))
  return e.num_experts * moe_capacity(seq_len, e.num_experts, e.capacity_factor, k) / seq_len


def _ffw_width_flops(d: int, f: int, activation: str) -> int:
  """Forward FLOPs per token of a dense FFW D -> F -> D (SwiGLU: two input matmuls)."""
  return (6 if activation == "swiglu" else 4) * d * f


def _attn_inner(m) -> int:
  """H · head_dim (head_dim = D // H, as in Attention)."""
  return m.num_heads * (m.d_model // m.num_heads)


# ------------------------------------------------------------------------------ FLOPs


def _block_terms(m, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token summed over all blocks, split by component."""
  d, L = m.d_model, m.num_layers
  inner = _attn_inner(m)
  expert_layers = _expert_layers(m)
  kind = m.ffw
  n_exp = len(expert_layers)
  n_dense = L - n_exp if kind != "dense" else L
  if kind == "peer" and m.peer.placement == "parallel":
    n_dense += n_exp  # the parallel dense FFW beside each PEER layer

  t: dict[str, float] = {}
  t["attention_qkvo"] = L * 8 * d * inner
  # Per query: QKᵀ against T keys (2·T·inner) and probs·V (2·T·inner).
  t["attention_scores"] = L * 4 * seq_len * inner
  t["attention_scores_causal"] = L * 4 * inner * (seq_len + 1) / 2
  t["dense_ffw"] = n_dense * _ffw_width_flops(d, m.d_ff, m.ffw_activation)

  if kind == "peer" and n_exp:
    p = m.peer
    n = _isqrt_exact(p.num_experts, "model.peer.num_experts")
    h, k, q = p.heads, p.top_k, p.query_dim
    t["peer_query"] = n_exp * 2 * d * h * q
    # Each head's two query halves (q/2 dims) against √N sub-keys each: 2·2·√N·q/2.
    t["peer_subkey_scores"] = n_exp * 2 * h * n * q
    t["peer_candidate_sums"] = n_exp * h * k * k  # s1[a] + s2[b] for the k×k candidates
    # u_i·x for h·k experts (2·h·k·D; GLU adds g_i·x), then Σ w·σ·v_i (2·h·k·D).
    t["peer_experts_in"] = n_exp * (4 if p.glu else 2) * h * k * d
    t["peer_experts_out"] = n_exp * 2 * h * k * d
    t["peer_topk_ops"] = n_exp * h * (2 * n + k * k)
  elif kind == "moe" and n_exp:
    e = m.moe
    f = e.d_ff or m.d_ff
    t["moe_router"] = n_exp * 2 * d * e.num_experts
    t["moe_experts"] = (n_exp * moe_experts_per_token(m, seq_len)
                        * _ffw_width_flops(d, f, m.ffw_activation))
    t["moe_topk_ops"] = n_exp * e.num_experts  # expert choice: each expert ranks the T tokens
    # (E·T / T); token choice: each token ranks the E experts
  elif kind == "pkm" and n_exp:
    p = m.pkm
    n = _isqrt_exact(p.num_memories, "model.pkm.num_memories")
    h, k, q = p.heads, p.top_k, p.key_dim
    t["pkm_query"] = n_exp * 2 * d * h * q
    t["pkm_subkey_scores"] = n_exp * 2 * h * n * q
    t["pkm_candidate_sums"] = n_exp * h * k * k
    t["pkm_values"] = n_exp * 2 * h * k * d  # weighted sum of h·k value rows (value_dim = D)
    t["pkm_topk_ops"] = n_exp * h * (2 * n + k * k)
  return t


def flops_per_token(model_cfg, seq_len: int, *, training: bool = False) -> dict[str, float]:
  """FLOPs per token of the forward pass (or of a training step), split by component.

  Keys (all summed over the blocks that have them; absent kinds are omitted):
    embedding (0: a gather), unembedding (2·D·V),
    attention_qkvo (8·D·H·d_head per block), attention_scores (4·T·H·d_head per block,
    full T×T as computed), attention_scores_causal ((T+1)/2 keys per query instead of T),
    dense_ffw (4·D·F, SwiGLU 6·D·F, per dense block),
    peer_query, peer_subkey_scores, peer_candidate_sums, peer_experts_in, peer_experts_out,
    moe_router, moe_experts, pkm_query, pkm_subkey_scores, pkm_candidate_sums, pkm_values,
    *_topk_ops (comparisons: elements fed to top-k; not FLOPs, not in the totals),
    expert_layer (the expert-layer FLOPs, summed), total (full attention scores),
    total_causal (causal attention scores), blocks (the per-block part of total).
  With training=True every FLOP term is for a training step: 3× forward, and the
  block terms 4× when model.remat (the blocks are recomputed in the backward).
  """
  m = model_cfg
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  blocks = _block_terms(m, seq_len)
  out: dict[str, float] = {"embedding": 0.0, "unembedding": float(2 * m.d_model * m.vocab_size)}
  out.update({k: float(v) for k, v in blocks.items()})

  is_ops = lambda key: key.endswith("_ops")
  block_flop_keys = [k for k in blocks if not is_ops(k) and k != "attention_scores_causal"]
  if training:
    block_mult = 4.0 if m.remat else 3.0
    for key in out:
      if is_ops(key):
        continue  # selections are redone in the backward only under remat; not FLOPs anyway
      out[key] *= block_mult if key in blocks else 3.0
    if m.remat:
      for key in blocks:
        if is_ops(key):
          out[key] *= 2.0  # recomputed forward repeats the top-k selections

  expert_keys = [k for k in out if k.split("_")[0] in ("peer", "moe", "pkm") and not is_ops(k)]
  out["expert_layer"] = sum(out[k] for k in expert_keys)
  out["blocks"] = sum(out[k] for k in block_flop_keys)
  out["total"] = out["embedding"] + out["unembedding"] + out["blocks"]
  out["total_causal"] = out["total"] - out["attention_scores"] + out["attention_scores_causal"]
  return out


def gathered_elements_per_token(model_cfg) -> dict[str, int]:
  """Table elements a token's forward pass gathers (reads by index), per component.

  Not FLOPs: a measure of the memory traffic of the sparse layers (multiply by the table's
  bytes per element). XLA's cost analysis counts one FLOP per gathered element (the
  out-of-bounds `select` of jnp.take's fill mode), which tests/test_flops.py adds back
  when it compares with cost_analysis().
    embedding: D (one row); peer: h·k·D per table (u, v, and g with GLU) per layer;
    pkm: h·k·D per layer; total.
  """
  m = model_cfg
  n_exp = len(_expert_layers(m))
  out = {"embedding": m.d_model}
  if n_exp and m.ffw == "peer":
    p = m.peer
    out["peer"] = n_exp * (3 if p.glu else 2) * p.heads * p.top_k * m.d_model
  elif n_exp and m.ffw == "pkm":
    out["pkm"] = n_exp * m.pkm.heads * m.pkm.top_k * m.d_model
  out["total"] = sum(out.values())
  return out


# ------------------------------------------------------------------------- parameters


def _norm_params(query_norm: str, q_dim: int) -> int:
  """Learned parameters of the query norm (BatchNorm's running stats are not Params)."""
  return {"batchnorm": 2, "layernorm": 2, "rmsnorm": 1, "none": 0}[query_norm] * q_dim


def param_counts(model_cfg, seq_len: int | None = None) -> dict[str, int]:
  """Parameter counts of Transformer(model_cfg).

    total: every nnx.Param (equals the model's actual count; BatchNorm statistics are
      nnx.BatchStat, not counted).
    embedding: the input embedding V·D, plus the unembedding D·V when untied.
    expert_tables: the sparse tables: PEER u, v (and g with GLU), N·D each; MoE expert
      weights E·(2 or 3)·D·F; PKM values N·D.
    active: parameters a token's forward pass reads: total − expert_tables + the table
      rows it uses: PEER h·k·(2 or 3)·D per layer (an upper bound: one row per retrieved
      expert, counting duplicates across heads), PKM h·k·D per layer, MoE the weights of
      E·C/T experts (≈ capacity_factor experts; exactly E·C/T when seq_len is given).
      Embeddings, routers, queries and sub-keys count fully (all are read per token).
    non_embedding / active_non_embedding: the same without the embedding.
  """
  m = model_cfg
  d, v, L = m.d_model, m.vocab_size, m.num_layers
  inner = _attn_inner(m)
  expert_layers = _expert_layers(m)
  n_exp = len(expert_layers)
  dense_ffw = (3 if m.ffw_activation == "swiglu" else 2) * d * m.d_ff
  n_dense = L - n_exp if m.ffw != "dense" else L
  if m.ffw == "peer" and m.peer.placement == "parallel":
    n_dense += n_exp

  embedding = v * d * (1 if m.tie_embeddings else 2)
  dense = (L * (2 * d + 4 * d * inner)  # two RMSNorm scales + attention per block
           + d                          # final norm
           + n_dense * dense_ffw)
  tables = 0
  active_tables = 0.0
  if n_exp and m.ffw == "peer":
    p = m.peer
    n = _isqrt_exact(p.num_experts, "model.peer.num_experts")
    q_dim = p.heads * p.query_dim
    keys = 2 * n * (p.query_dim // 2) * (p.heads if p.per_head_keys else 1)
    dense += n_exp * (d * q_dim + _norm_params(p.query_norm, q_dim) + keys)
    rows = 3 if p.glu else 2
    tables = n_exp * rows * p.num_experts * d
    active_tables = n_exp * rows * p.heads * p.top_k * d
  elif n_exp and m.ffw == "moe":
    e = m.moe
    f = e.d_ff or m.d_ff
    per_expert = (3 if m.ffw_activation == "swiglu" else 2) * d * f
    dense += n_exp * d * e.num_experts
    tables = n_exp * e.num_experts * per_expert
    active_tables = n_exp * moe_experts_per_token(m, seq_len) * per_expert
  elif n_exp and m.ffw == "pkm":
    p = m.pkm
    n = _isqrt_exact(p.num_memories, "model.pkm.num_memories")
    q_dim = p.heads * p.key_dim
    keys = 2 * p.heads * n * (p.key_dim // 2)  # PKM always uses per-head sub-keys
    dense += n_exp * (d * q_dim + _norm_params(p.query_norm, q_dim) + keys)
    tables = n_exp * p.num_memories * d
    active_tables = n_exp * p.heads * p.top_k * d

  total = embedding + dense + tables
  active = int(round(embedding + dense + active_tables))
  return {"total": int(total), "active": active, "embedding": int(embedding),
          "expert_tables": int(tables), "non_embedding": int(total - embedding),
          "active_non_embedding": active - int(embedding)}


# ---------------------------------------------------------------------- peak and MFU

# Dense (no sparsity) bf16 peak FLOP/s per chip, vendor datasheet numbers (docs/flops.md).
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
}

# jax `device_kind` spellings -> PEAK_FLOPS key, checked in order (most specific first).
_KIND_ALIASES: tuple[tuple[str, str], ...] = (
    ("tpu v5 lite", "TPU v5e"), ("tpu v5e", "TPU v5e"), ("tpu v5p", "TPU v5p"),
    ("tpu v5", "TPU v5p"),
    ("tpu v6 lite", "TPU v6e"), ("tpu v6e", "TPU v6e"),
    ("tpu v4", "TPU v4"),
    ("h100 pcie", "H100 PCIe"), ("h100", "H100 SXM"),
    ("h200", "H200"),
)


def peak_flops_for_kind(device_kind: str) -> float | None:
  """PEAK_FLOPS entry for a jax device_kind string ('TPU v5 lite', 'NVIDIA H100 80GB HBM3')."""
  kind = " ".join(str(device_kind).lower().split())
  for alias, key in _KIND_ALIASES:
    if alias in kind:
      return PEAK_FLOPS[key]
  return None


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
  """Measured FLOP/s of a jitted n×n @ n×n matmul on the default device (best of `repeats`).

  Cached per (n, repeats, dtype). Used as the CPU 'peak', where no datasheet number applies.
  """
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()  # compile and warm up
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def device_peak_flops(device: Any = None) -> float | None:
  """Peak FLOP/s of one device: the PEAK_FLOPS table (bf16 dense) for known TPUs/GPUs,
  a measured f32 matmul rate on CPU, None for anything else.

  device: a jax Device, a device_kind string, or None for jax.devices()[0].
  """
  if device is None:
    import jax
    device = jax.devices()[0]
  if isinstance(device, str):
    kind, platform = device, ("cpu" if device.strip().lower() == "cpu" else "")
  else:
    kind, platform = getattr(device, "device_kind", ""), getattr(device, "platform", "")
  peak = peak_flops_for_kind(kind)
  if peak is not None:
    return peak
  if platform == "cpu" or str(kind).strip().lower() == "cpu":
    return measure_matmul_peak()
  return None


def mfu(tokens_per_sec: float, flops_per_token_training: float, peak_flops: float | None,
        num_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved training FLOP/s over the devices' summed peak.

  tokens_per_sec: global (all devices) training throughput; flops_per_token_training:
  flops_per_token(cfg, T, training=True)['total']; peak_flops: per device. Returns nan
  when the peak is unknown (None or <= 0).
  """
  if not peak_flops or peak_flops <= 0 or num_devices < 1:
    return float("nan")
  return tokens_per_sec * flops_per_token_training / (peak_flops * num_devices)
