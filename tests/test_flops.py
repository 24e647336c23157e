"""peer_jax.flops: analytic FLOPs vs XLA's cost_analysis(), exact parameter counts, peaks, MFU.

XLA tolerance. HloCostAnalysis counts every elementwise op (norms, GELU, softmax, RoPE,
masking) as FLOPs, counts top-k sorts' comparisons, and counts one FLOP per element
gathered by jnp.take (the bounds `select` of its fill mode). The analytic model counts
matmul FLOPs (+ the k² candidate sums) only. The test adds the gathered elements
(`gathered_elements_per_token`) back and then requires |XLA / analytic − 1| <= 10 %.
Measured on CPU, jax 0.10.2: +3.3 % .. +6.4 % forward, +1.7 % .. +2.3 % training (3×),
−4.7 % training with remat (3× + blocks' forward; XLA skips dead recomputation).
"""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx


from configs import base
from peer_jax.sweep_config import apply_overrides
from peer_jax import kinds
from peer_jax.kinds import memory_plus
from peer_jax.flops import (PEAK_FLOPS, device_peak_flops, flops_per_token,
                            gathered_elements_per_token, measure_matmul_peak, mfu,
                            param_counts, peak_flops_for_kind)
from peer_jax.model import Transformer
from peer_jax.ops import cpu_kernels


@pytest.fixture(autouse=True)
def xla_paths_only(monkeypatch):
  """XLA cannot see inside the CPU FFI kernels (its cost analysis counts a custom call as
  0 FLOPs), so the comparisons with XLA's counts run the pure-XLA paths, as on TPU/GPU."""
  monkeypatch.setenv("PEER_JAX_CPU_KERNELS", "0")
  cpu_kernels.available.cache_clear()
  yield
  monkeypatch.undo()
  cpu_kernels.available.cache_clear()

TOL = 0.10
B, T = 2, 64


def small(ffw="dense", **overrides):
  """d_model 64, 2 blocks, vocab 512; expert layers small enough to compile in ~1 s."""
  m = base.get_config().model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.d_ff = 512, 64, 2, 4, 256
  m.ffw, m.tie_embeddings = ffw, True
  m.peer.num_experts, m.peer.heads, m.peer.top_k, m.peer.query_dim = 16**2, 4, 8, 32
  m.moe.num_experts, m.moe.capacity_factor = 4, 1.0
  m.pkm.num_memories, m.pkm.heads, m.pkm.top_k, m.pkm.key_dim = 16**2, 4, 8, 32
  mp = m.memory_plus
  mp.num_memories, mp.heads, mp.top_k, mp.key_dim, mp.kernel = 16**2, 4, 8, 32, "xla"
  return apply_overrides(m, overrides)


def _split(m):
  model = Transformer(m, rngs=nnx.Rngs(0))
  return nnx.split(model, nnx.Param, ...)


def xla_flops_per_token(m, *, training=False):
  """cost_analysis()['flops'] / tokens of the jitted forward (or loss + gradient)."""
  graphdef, params, rest = _split(m)
  tokens = jnp.zeros((B, T), jnp.int32)

  def forward(params, rest, tokens):
    # train=False: BatchNorm would otherwise mutate its statistics inside the trace; the
    # difference (batch vs running statistics) is elementwise.
    return nnx.merge(graphdef, params, rest)(tokens, train=False)[0]

  def loss(params, rest, tokens):
    logits = forward(params, rest, tokens)
    gold = jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - gold)

  fn = jax.value_and_grad(loss) if training else forward
  cost = jax.jit(fn).lower(params, rest, tokens).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
    cost = cost[0]
  return cost["flops"] / (B * T)


def xla_comparable(m, *, training=False):
  """Analytic total plus the gathered elements XLA counts as FLOPs (see module doc)."""
  f = flops_per_token(m, T, training=training)
  gathers = gathered_elements_per_token(m)["total"] * (3 if training else 1)
  return f, f["total"] + gathers


# ------------------------------------------------------------------ vs XLA, forward


@pytest.mark.parametrize("ffw", kinds.names())
def test_forward_flops_match_xla(ffw):
  m = small(ffw)
  f, expected = xla_comparable(m)
  measured = xla_flops_per_token(m)
  assert abs(measured / expected - 1) <= TOL, (ffw, measured, expected, f)
  # XLA counts the elementwise work too, so the analytic count should not exceed it.
  assert measured >= 0.99 * expected


def test_peer_expert_term_is_resolved_by_the_xla_check():
  """A PEER-heavy model (every block PEER, h·k = 128) where the expert term is ~18 % of
  the total: dropping it (or the query, or the unembedding) would fail the tolerance."""
  m = small("peer", d_model=128, d_ff=512, ffw_layers="all", **{"peer.heads": 8,
                                                                  "peer.top_k": 16})
  f, expected = xla_comparable(m)
  measured = xla_flops_per_token(m)
  assert abs(measured / expected - 1) <= TOL, (measured, expected, f)
  experts = f["peer_experts_in"] + f["peer_experts_out"]
  assert experts / f["total"] > 0.15
  # The same comparison without the expert term (and its gathers) fails.
  without = expected - experts - gathered_elements_per_token(m)["peer"]
  assert abs(measured / without - 1) > TOL
  assert abs(measured / (expected - experts) - 1) > TOL


def test_moe_expert_term_is_resolved_by_the_xla_check():
  m = small("moe", ffw_layers="all")
  f, expected = xla_comparable(m)
  measured = xla_flops_per_token(m)
  assert abs(measured / expected - 1) <= TOL
  assert abs(measured / (expected - f["moe_experts"]) - 1) > TOL
  # Capacity factor 2 doubles the expert FLOPs.
  f2 = flops_per_token(small("moe", ffw_layers="all", **{"moe.capacity_factor": 2.0}), T)
  assert f2["moe_experts"] == pytest.approx(2 * f["moe_experts"])


# ----------------------------------------------------------------- vs XLA, training


def test_training_flops_match_xla_gradient():
  """Loss + gradient of a PEER model (PEER's hand-written VJP included) ≈ 3 × forward."""
  m = small("peer", d_model=128, d_ff=512)
  f, expected = xla_comparable(m, training=True)
  measured = xla_flops_per_token(m, training=True)
  assert abs(measured / expected - 1) <= TOL, (measured, expected)
  fwd = flops_per_token(m, T)
  assert f["total"] == pytest.approx(3 * fwd["total"])


def test_remat_training_flops_match_xla_gradient():
  """With model.remat the blocks' forward is recomputed: XLA sees ≈ 3·F + F_blocks.

  XLA eliminates the recomputation of each block's last projections (W_o, W_out: their
  outputs are not needed by the backward), so it lands a few % below (measured −4.7 %).
  (Dense only: merging a BatchNorm model inside jax.grad + nnx.remat needs nnx transforms.)
  """
  m = small("dense", d_model=128, d_ff=512, remat=True)
  f, expected = xla_comparable(m, training=True)
  measured = xla_flops_per_token(m, training=True)
  assert abs(measured / expected - 1) <= TOL, (measured, expected)
  no_remat = 3 * flops_per_token(m, T)["total"]
  assert measured > no_remat * (1 + TOL)  # the recomputation is visible


# ----------------------------------------------------------------- analytic numbers


def _paper_peer_layer():
  m = base.get_config().model
  m.d_model, m.num_layers, m.ffw, m.ffw_layers = 1024, 1, "peer", "all"
  m.peer.num_experts, m.peer.heads, m.peer.top_k, m.peer.query_dim = 1024**2, 8, 16, 256
  return m


def test_peer_md_example():
  """docs PEER.md: D=1024, d=256, h=8, k=16, N=1024²: ≈ 4.2 + 4.2 + 0.5 MFLOP; dense 16.8."""
  f = flops_per_token(_paper_peer_layer(), 128)
  assert f["peer_query"] == 2 * 1024 * 8 * 256 == 4_194_304
  assert f["peer_subkey_scores"] == 2 * 8 * 1024 * 256 == 4_194_304
  assert f["peer_experts_in"] + f["peer_experts_out"] == 4 * 8 * 16 * 1024 == 524_288
  assert round(f["peer_query"] / 1e6, 1) == 4.2
  assert round(f["peer_subkey_scores"] / 1e6, 1) == 4.2
  assert round((f["peer_experts_in"] + f["peer_experts_out"]) / 1e6, 1) == 0.5
  assert f["peer_candidate_sums"] == 8 * 16 * 16
  assert f["peer_topk_ops"] == 8 * (2 * 1024 + 16 * 16)
  assert "dense_ffw" in f and f["dense_ffw"] == 0  # the one block is the PEER layer
  dense = _paper_peer_layer()
  dense.ffw, dense.d_ff = "dense", 4 * 1024
  fd = flops_per_token(dense, 128)
  assert fd["dense_ffw"] == 16 * 1024**2 == 16_777_216
  assert round(fd["dense_ffw"] / 1e6, 1) == 16.8
  # 2·N·D table parameters for that one layer.
  assert param_counts(_paper_peer_layer())["expert_tables"] == 2 * 1024**2 * 1024


def test_glu_adds_one_expert_matmul():
  f = flops_per_token(small("peer"), T)
  g = flops_per_token(small("peer", **{"peer.glu": True}), T)
  assert g["peer_experts_in"] == 2 * f["peer_experts_in"]
  assert g["peer_experts_out"] == f["peer_experts_out"]


def test_attention_causal_convention():
  m = small()
  f = flops_per_token(m, T)
  inner = m.d_model  # num_heads · head_dim
  assert f["attention_scores"] == m.num_layers * 4 * T * inner
  assert f["attention_scores_causal"] == pytest.approx(f["attention_scores"] * (T + 1) / (2 * T))
  assert f["total"] - f["total_causal"] == pytest.approx(
      f["attention_scores"] - f["attention_scores_causal"])
  assert f["attention_qkvo"] == m.num_layers * 8 * m.d_model * inner
  assert f["unembedding"] == 2 * m.d_model * m.vocab_size and f["embedding"] == 0


def test_totals_exclude_ops_and_sum_components():
  for ffw in ("dense", "peer", "moe", "pkm"):
    f = flops_per_token(small(ffw), T)
    parts = [k for k in f if not k.endswith("_ops") and k not in (
        "attention_scores_causal", "expert_layer", "blocks", "total", "total_causal")]
    assert f["total"] == pytest.approx(sum(f[k] for k in parts)), ffw
    assert f["blocks"] == pytest.approx(f["total"] - f["unembedding"])
    if ffw != "dense":
      assert any(k.endswith("_topk_ops") for k in f)


def test_training_convention_and_remat():
  m = small("peer")
  fwd = flops_per_token(m, T)
  tr = flops_per_token(m, T, training=True)
  assert tr["total"] == pytest.approx(3 * fwd["total"])
  assert tr["peer_topk_ops"] == fwd["peer_topk_ops"]
  m.remat = True
  rm = flops_per_token(m, T, training=True)
  # Remat recomputes the blocks' forward (not the unembedding) in the backward.
  assert rm["total"] == pytest.approx(3 * fwd["total"] + fwd["blocks"])
  assert rm["unembedding"] == tr["unembedding"]


def test_moe_capacity_rounding():
  m = small("moe", **{"moe.num_experts": 8, "moe.capacity_factor": 1.0})
  f = flops_per_token(m, 60)  # C = ceil(60/8) = 8 tokens per expert: 64/60 experts per token
  assert f["moe_experts"] == pytest.approx(8 * 8 / 60 * 4 * m.d_model * m.d_ff)
  assert f["moe_router"] == 2 * m.d_model * 8


def test_default_config_command_runs():
  from configs import default
  f = flops_per_token(default.get_config().model, 128)
  assert f["total"] > 0 and f["peer_query"] > 0


# ------------------------------------------------------------------------- parameters


def _actual_params(m):
  model = Transformer(m, rngs=nnx.Rngs(0))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


PARAM_VARIANTS = [
    ("dense", {}),
    ("dense", {"tie_embeddings": False}),
    ("dense", {"ffw_activation": "swiglu"}),
    ("peer", {}),
    ("peer", {"tie_embeddings": False}),
    ("peer", {"peer.per_head_keys": True}),
    ("peer", {"peer.glu": True}),
    ("peer", {"peer.placement": "parallel"}),
    ("peer", {"peer.placement": "parallel", "ffw_activation": "swiglu"}),
    ("peer", {"peer.query_norm": "layernorm"}),
    ("peer", {"peer.query_norm": "rmsnorm", "peer.router": "sigmoid"}),
    ("peer", {"peer.query_norm": "none", "ffw_layers": "all"}),
    ("moe", {}),
    ("moe", {"ffw_activation": "swiglu", "moe.d_ff": 96, "ffw_layers": "0,1"}),
    ("pkm", {}),
    ("pkm", {"pkm.query_norm": "layernorm", "ffw_layers": "all"}),
    ("peer", {"ffw_layers": "none"}),
    ("memory_plus", {}),
    ("memory_plus", {"ffw_layers": "all"}),
    ("memory_plus", {"ffw_layers": "all", "memory_plus.shared_values": True}),
]


@pytest.mark.parametrize("ffw,overrides", PARAM_VARIANTS,
                         ids=[f"{k}-{','.join(f'{a}={b}' for a, b in o.items())}"
                              for k, o in PARAM_VARIANTS])
def test_param_counts_total_is_exact(ffw, overrides):
  m = small(ffw, **overrides)
  assert param_counts(m)["total"] == _actual_params(m)


def test_param_counts_parts():
  m = small("peer", tie_embeddings=False)
  p = param_counts(m)
  D, h, k, N = 64, 4, 8, 256
  assert p["embedding"] == 2 * 512 * D
  assert p["expert_tables"] == 2 * N * D
  assert p["active"] == p["total"] - 2 * N * D + 2 * h * k * D
  assert p["non_embedding"] == p["total"] - p["embedding"]
  g = param_counts(small("peer", **{"peer.glu": True}))
  assert g["expert_tables"] == 3 * N * D
  assert g["active"] == g["total"] - 3 * N * D + 3 * h * k * D

  moe = small("moe")
  pm = param_counts(moe)
  per_expert = 2 * D * 256
  assert pm["expert_tables"] == 4 * per_expert
  assert pm["active"] == pm["total"] - 4 * per_expert + 1 * per_expert  # capacity factor 1
  pm60 = param_counts(moe, seq_len=60)  # C = 15 of 60 tokens per expert: exactly 1 expert
  assert pm60["active"] == pm["active"]
  pm62 = param_counts(moe, seq_len=62)  # C = 16: 64/62 experts per token
  assert pm62["active"] == round(pm["total"] - 4 * per_expert + 64 / 62 * per_expert)

  pk = param_counts(small("pkm"))
  assert pk["expert_tables"] == N * D
  assert pk["active"] == pk["total"] - N * D + h * k * D

  dense = param_counts(small("dense"))
  assert dense["active"] == dense["total"] and dense["expert_tables"] == 0


# ---------------------------------------------------------------------- peaks and MFU


def test_peak_table_and_device_kinds():
  assert PEAK_FLOPS["TPU v4"] == 275e12
  assert PEAK_FLOPS["TPU v5e"] == 197e12
  assert PEAK_FLOPS["TPU v5p"] == 459e12
  assert PEAK_FLOPS["TPU v6e"] == 918e12
  assert PEAK_FLOPS["H100 SXM"] == 989e12
  assert PEAK_FLOPS["H200"] == 989e12
  kinds = {
      "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
      "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
      "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
      "NVIDIA H200": 989e12,
  }
  for kind, peak in kinds.items():
    assert peak_flops_for_kind(kind) == peak, kind
    assert device_peak_flops(kind) == peak, kind
  assert peak_flops_for_kind("NVIDIA A100-SXM4-80GB") is None
  assert device_peak_flops("NVIDIA GeForce RTX 4090") is None


def test_cpu_peak_is_measured_and_cached():
  if jax.devices()[0].platform != "cpu":
    pytest.skip("CPU-only check")
  peak = device_peak_flops()
  assert 1e8 < peak < 1e14  # a plausible f32 matmul rate for a CPU
  assert device_peak_flops() == peak == measure_matmul_peak()  # cached: same number
  assert device_peak_flops("cpu") == peak


def test_mfu():
  assert mfu(1000.0, 6e9, 1e13, 1) == pytest.approx(0.6)
  assert mfu(1000.0, 6e9, 1e13, 4) == pytest.approx(0.15)
  assert math.isnan(mfu(1000.0, 6e9, None, 1))
  assert math.isnan(mfu(1000.0, 6e9, 0.0, 1))
  m = small("peer")
  tr = flops_per_token(m, T, training=True)["total"]
  assert mfu(2.0e4, tr, 1e12, 2) == pytest.approx(2.0e4 * tr / 2e12)

