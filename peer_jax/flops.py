"""Analytical FLOPs, parameter counts, peak FLOP/s and MFU for peer_jax models.

Everything but the CPU peak measurement is plain Python arithmetic on the `model` config
section (configs/base.py); nothing is built or compiled, so a sweep planner can call it
for thousands of configs. This module counts the shared transformer parts (embedding,
attention, dense FFWs); each FFW kind's own terms and parameters come from its entry in
`peer_jax.kinds` (`flop_terms`, `param_counts`, `gathered`). docs/flops.md writes out every formula and convention;
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

from peer_jax import kinds
from peer_jax.kinds.moe import moe_capacity, moe_choices_per_token, moe_experts_per_token  # noqa: F401
from peer_jax.layers.peer import exact_sqrt, query_norm_params
from peer_jax.model import expert_layer_indices

# --------------------------------------------------------------------------- helpers


def _expert_layers(m) -> tuple[int, ...]:
  return expert_layer_indices(m.ffw_layers, m.num_layers)


def _isqrt_exact(num: int, what: str) -> int:
  return exact_sqrt(int(num), what)


def _dense_blocks(m, kind, n_exp: int) -> int:
  """Blocks holding a dense FFW: those outside model.ffw_layers, plus those the kind keeps."""
  return m.num_layers - n_exp + n_exp * kind.dense_ffws(m)


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
  kind = kinds.get(m.ffw)
  n_exp = len(_expert_layers(m))

  t: dict[str, float] = {}
  t["attention_qkvo"] = L * 8 * d * inner
  # Per query: QKᵀ against T keys (2·T·inner) and probs·V (2·T·inner).
  t["attention_scores"] = L * 4 * seq_len * inner
  t["attention_scores_causal"] = L * 4 * inner * (seq_len + 1) / 2
  t["dense_ffw"] = _dense_blocks(m, kind, n_exp) * _ffw_width_flops(d, m.d_ff, m.ffw_activation)
  t.update(kind.flop_terms(m, n_exp, seq_len))
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
    memory_plus_{query, subkey_scores, candidate_sums, values, gate, out} (the kind's terms),
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
  kind_keys = set(kinds.get(m.ffw).flop_terms(m, len(_expert_layers(m)), seq_len))
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

  expert_keys = [k for k in out if k in kind_keys and not is_ops(k)]
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
    pkm, memory_plus: h·k·D per layer; total.
  """
  m = model_cfg
  n_exp = len(_expert_layers(m))
  out = {"embedding": m.d_model}
  out.update(kinds.get(m.ffw).gathered(m, n_exp))
  out["total"] = sum(out.values())
  return out


# ------------------------------------------------------------------------- parameters


_norm_params = query_norm_params


def param_counts(model_cfg, seq_len: int | None = None) -> dict[str, int]:
  """Parameter counts of Transformer(model_cfg).

    total: every nnx.Param (equals the model's actual count; BatchNorm statistics are
      nnx.BatchStat, not counted).
    embedding: the input embedding V·D, plus the unembedding D·V when untied.
    expert_tables: the sparse tables: PEER u, v (and g with GLU), N·D each; MoE expert
      weights E·(2 or 3)·D·F; PKM and Memory+ values N·D (a shared Memory+ pool once).
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
  kind = kinds.get(m.ffw)
  n_exp = len(_expert_layers(m))
  dense_ffw = (3 if m.ffw_activation == "swiglu" else 2) * d * m.d_ff
  n_dense = _dense_blocks(m, kind, n_exp)

  embedding = v * d * (1 if m.tie_embeddings else 2)
  dense = (L * (2 * d + 4 * d * inner)  # two RMSNorm scales + attention per block
           + d                          # final norm
           + n_dense * dense_ffw)
  kind_dense, tables, active_tables = kind.param_counts(m, n_exp, seq_len)
  dense += kind_dense

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
