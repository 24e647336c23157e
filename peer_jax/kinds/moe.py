"""Coarse-grained MoE (peer_jax.layers.moe): expert choice (the paper's baseline, not
causal) or causal token choice. `model.moe`."""

from peer_jax.kinds.base import FFWKind
from peer_jax.layers.moe import CAUSAL_ROUTINGS, MOE_ROUTINGS, MoE, expert_capacity


def _routing(e) -> str:
  return e.get("routing", "expert_choice")


def build(m, *, rngs, dtype, out_scale, shared=None):
  e = m.moe
  return MoE(m.d_model, num_experts=e.num_experts, d_ff=e.d_ff or m.d_ff,
             routing=_routing(e), capacity_factor=e.capacity_factor,
             top_k=e.get("top_k", 2), aux_loss_coef=e.get("aux_loss_coef", 0.01),
             activation=m.ffw_activation, out_scale=out_scale, rngs=rngs, dtype=dtype)


def validate(cfg, checks):
  checks.positive_int(cfg, "model.moe.num_experts")
  checks.positive_int(cfg, "model.moe.d_ff", allow_zero=True)
  checks.positive_float(cfg, "model.moe.capacity_factor")
  routing = checks.choice(cfg, "model.moe.routing", MOE_ROUTINGS)
  if routing == "token_choice":
    k = checks.positive_int(cfg, "model.moe.top_k")
    if k > cfg.model.moe.num_experts:
      checks.fail("model.moe.top_k", f"{k} exceeds model.moe.num_experts={cfg.model.moe.num_experts}")
    checks.positive_float(cfg, "model.moe.aux_loss_coef", allow_zero=True)


def moe_choices_per_token(e) -> int:
  """Expert slots a token asks for: 1 with expert choice, top_k with token choice."""
  return int(e.get("top_k", 2)) if _routing(e) == "token_choice" else 1


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
  return (6 if activation == "swiglu" else 4) * d * f


def flop_terms(m, n: int, seq_len: int) -> dict:
  if not n:
    return {}
  e = m.moe
  f = e.d_ff or m.d_ff
  return {
      "moe_router": n * 2 * m.d_model * e.num_experts,
      "moe_experts": n * moe_experts_per_token(m, seq_len) * _ffw_width_flops(
          m.d_model, f, m.ffw_activation),
      # Expert choice: each expert ranks the T tokens (E·T / T); token choice: each token
      # ranks the E experts.
      "moe_topk_ops": n * e.num_experts,
  }


def param_counts(m, n: int, seq_len):
  if not n:
    return 0, 0, 0.0
  e = m.moe
  f = e.d_ff or m.d_ff
  per_expert = (3 if m.ffw_activation == "swiglu" else 2) * m.d_model * f
  return (n * m.d_model * e.num_experts, n * e.num_experts * per_expert,
          n * moe_experts_per_token(m, seq_len) * per_expert)


def _label(routing: str) -> str:
  routing = routing or "expert_choice"
  return ("MoE (expert choice, non-causal)" if routing == "expert_choice"
          else f"MoE ({routing.replace('_', ' ')})")


KIND = FFWKind(
    name="moe", label="MoE", section="moe", build=build, validate=validate,
    flop_terms=flop_terms, param_counts=param_counts,
    # Expert choice ranks each expert's tokens over the whole sequence: not causal.
    causal=lambda m: _routing(m.moe) in CAUSAL_ROUTINGS,
    variant=lambda m: _routing(m.moe), label_for=_label, color="tab:blue")
