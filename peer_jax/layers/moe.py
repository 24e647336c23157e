"""Coarse-grained MoE: expert-choice routing (the paper's baseline) or causal token choice.

    y_BTD, aux = MoE(...)(x_BTD, train=bool, segment_ids_BT=None, decode=False)

Router: probs_BTE = softmax(x W_r) over the E experts, in f32. Each expert is a dense FFW
(d_ff hidden units, gelu/relu/swiglu as DenseFFW). Each sequence is one routing group.
Padding (segment id 0) never takes an expert's slot and gets no output.

* `expert_choice` (Zhou et al. 2022; the paper's MoE baseline): expert e takes the
  C = min(T, ceil(T·capacity_factor/E)) tokens of the sequence with the highest
  probs[:, :, e] (capacity_factor 2 is Zhou et al.'s standard), and adds gate·FFW_e(x) at
  those positions. A token may be picked by several experts or by none. **Not causal**:
  whether token t is processed depends on the router scores of later tokens, so its
  perplexity is not comparable to a causal model's, and it cannot decode one token at a
  time. At decode (`decode=True`, T = 1) each token goes to its top-round(capacity_factor)
  experts by router probability, the number it averages in training: an approximation,
  since the training forward cannot be reproduced causally.
* `token_choice` (GShard / Switch style, causal): each token picks its top_k experts,
  gates renormalised to sum to one. Expert e has C = min(T·top_k, ceil(T·top_k·
  capacity_factor/E)) slots per sequence, filled in token order (all choices of token t
  before those of token t+1): whether a choice of token t is kept depends only on tokens
  ≤ t, so the layer is causal. (The common choice-major order, every top-1 choice before
  any top-2 choice, would let later tokens push out earlier ones.) Dropped choices are
  counted (`aux['dropped_fraction']`); a Switch load-balancing loss
  E·Σ_e f_e·P_e (f_e: fraction of choices routed to e, P_e: mean router probability) is
  returned as `aux['aux_loss']`, already multiplied by `aux_loss_coef`, for the trainer
  to add. At decode (T = 1) no choice is ever dropped.

The gather of tokens and the scatter of outputs use indices, not one-hot (B, E, C, T)
dispatch tensors. Expert weights are stacked: w_in (E, D, F), w_out (E, F, D) with logical
names ('experts', 'embed', 'mlp') / ('experts', 'mlp', 'embed'). Each expert is
initialised like DenseFFW, including the block's depth-dependent output scale; with
token choice the gates sum to one per token, so the layer starts at the dense FFW's
output scale. With expert choice the gates are raw probabilities (≈ 1/E each at init),
so the layer starts about E/capacity_factor times quieter than the dense FFW, as in
Zhou et al. (tests/test_layers.py checks both).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peer_jax.layers.common import ACTIVATIONS, fan_in_normal, param
from peer_jax.layers.ffw import FFW_ACTIVATIONS

MOE_ROUTINGS = ("expert_choice", "token_choice")
CAUSAL_ROUTINGS = ("token_choice",)


def expert_capacity(seq_len: int, num_experts: int, capacity_factor: float,
                    top_k: int = 1) -> int:
  """Slots per expert per sequence: ceil(T·top_k·capacity_factor / E), in [1, T·top_k]."""
  slots = seq_len * top_k
  return max(1, min(slots, math.ceil(slots * capacity_factor / num_experts)))


class MoE(nnx.Module):
  """MoE of `num_experts` dense FFWs of width d_ff, expert-choice or token-choice routed."""

  def __init__(self, d_model: int, *, num_experts: int, d_ff: int,
               routing: str = "expert_choice", capacity_factor: float = 2.0, top_k: int = 2,
               aux_loss_coef: float = 0.01, activation: str = "gelu", out_scale: float = 1.0,
               rngs: nnx.Rngs, dtype=jnp.float32):
    if activation not in FFW_ACTIVATIONS:
      raise ValueError(f"unknown FFW activation {activation!r}; expected one of {FFW_ACTIVATIONS}")
    if routing not in MOE_ROUTINGS:
      raise ValueError(f"unknown MoE routing {routing!r}; expected one of {MOE_ROUTINGS}")
    if capacity_factor <= 0:
      raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if routing == "token_choice" and not 1 <= top_k <= num_experts:
      raise ValueError(f"need 1 <= top_k <= num_experts={num_experts}, got {top_k}")
    E, D, F = num_experts, d_model, d_ff
    self.num_experts, self.capacity_factor, self.routing = num_experts, capacity_factor, routing
    self.top_k, self.aux_loss_coef = top_k, aux_loss_coef
    self.activation, self.dtype = activation, dtype
    self.w_router_DE = param(rngs, fan_in_normal(D), (D, E), ("embed", "experts"))
    self.w_in_EDF = param(rngs, fan_in_normal(D), (E, D, F), ("experts", "embed", "mlp"))
    if activation == "swiglu":
      self.w_gate_EDF = param(rngs, fan_in_normal(D), (E, D, F), ("experts", "embed", "mlp"))
    self.w_out_EFD = param(rngs, fan_in_normal(F, out_scale), (E, F, D), ("experts", "mlp", "embed"))

  def _experts(self, x_BECD):
    """Every expert's FFW on its (B, E, C, D) slots."""
    cast = lambda p: p[...].astype(self.dtype)
    h_BECF = jnp.einsum("becd,edf->becf", x_BECD, cast(self.w_in_EDF))
    if self.activation == "swiglu":
      g_BECF = jnp.einsum("becd,edf->becf", x_BECD, cast(self.w_gate_EDF))
      h_BECF = jax.nn.silu(g_BECF) * h_BECF
    else:
      h_BECF = ACTIVATIONS[self.activation](h_BECF)
    return jnp.einsum("becf,efd->becd", h_BECF, cast(self.w_out_EFD)).astype(jnp.float32)

  def __call__(self, x_BTD, *, train: bool = False, segment_ids_BT=None, decode: bool = False):
    del train
    B, T, _ = x_BTD.shape
    x_BTD = x_BTD.astype(self.dtype)
    valid_BT = (jnp.ones((B, T), bool) if segment_ids_BT is None else segment_ids_BT > 0)
    logits_BTE = (x_BTD @ self.w_router_DE[...].astype(self.dtype)).astype(jnp.float32)
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    if self.routing == "token_choice":
      y_BTD, aux = self._token_choice(x_BTD, probs_BTE, valid_BT)
    elif decode:
      k = max(1, min(self.num_experts, round(self.capacity_factor)))
      gate_BTK, exp_BTK = jax.lax.top_k(probs_BTE, k)
      y_BTD, aux = self._dispatch_by_choice(x_BTD, gate_BTK, exp_BTK, valid_BT, capacity=T * k)
    else:
      y_BTD, aux = self._expert_choice(x_BTD, probs_BTE, valid_BT)
    aux["router_probs"] = probs_BTE
    return y_BTD.astype(self.dtype), aux

  def _expert_choice(self, x_BTD, probs_BTE, valid_BT):
    B, T, D = x_BTD.shape
    C = expert_capacity(T, self.num_experts, self.capacity_factor)
    # Padding ranks below every real token, and its gate is zeroed if it is still picked.
    rank_BET = jnp.where(valid_BT[:, None, :], jnp.swapaxes(probs_BTE, 1, 2), -1.0)
    _, tok_BEC = jax.lax.top_k(rank_BET, C)
    gate_BEC = jnp.take_along_axis(jnp.swapaxes(probs_BTE, 1, 2), tok_BEC, axis=-1)
    gate_BEC = gate_BEC * jnp.take_along_axis(valid_BT[:, None, :], tok_BEC, axis=-1)
    x_BECD = jax.vmap(lambda xb, tb: xb[tb])(x_BTD, tok_BEC)
    out_BECD = self._experts(x_BECD) * gate_BEC[..., None]

    def combine(out_ECD, tok_EC):
      return jnp.zeros((T, D), jnp.float32).at[tok_EC.reshape(-1)].add(out_ECD.reshape(-1, D))

    y_BTD = jax.vmap(combine)(out_BECD, tok_BEC)
    picked_BEC = (gate_BEC > 0).astype(jnp.int32)
    count_BT = jax.vmap(lambda t, p: jnp.zeros((T,), jnp.int32).at[t.reshape(-1)].add(
        p.reshape(-1)))(tok_BEC, picked_BEC)
    n_valid = jnp.maximum(jnp.sum(valid_BT), 1)
    return y_BTD, {
        "experts_per_token": count_BT,                                            # (B, T)
        "dropped_fraction": jnp.sum((count_BT == 0) & valid_BT) / n_valid,       # tokens no expert took
    }

  def _token_choice(self, x_BTD, probs_BTE, valid_BT):
    T, E, K = x_BTD.shape[1], self.num_experts, self.top_k
    gate_BTK, exp_BTK = jax.lax.top_k(probs_BTE, K)
    gate_BTK = gate_BTK / jnp.sum(gate_BTK, axis=-1, keepdims=True)
    C = expert_capacity(T, E, self.capacity_factor, K)
    y_BTD, aux = self._dispatch_by_choice(x_BTD, gate_BTK, exp_BTK, valid_BT, capacity=C)
    # Switch load balancing over the real tokens: f_e from the choices before dropping.
    valid_f = valid_BT.astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid_f), 1.0)
    chosen_E = jnp.sum(jax.nn.one_hot(exp_BTK, E) * valid_f[..., None, None], axis=(0, 1, 2))
    frac_E = chosen_E / (n_valid * K)
    mean_prob_E = jnp.sum(probs_BTE * valid_f[..., None], axis=(0, 1)) / n_valid
    balance = E * jnp.sum(frac_E * mean_prob_E)
    aux["load_balance_loss"] = balance
    aux["aux_loss"] = self.aux_loss_coef * balance
    return y_BTD, aux

  def _dispatch_by_choice(self, x_BTD, gate_BTK, exp_BTK, valid_BT, *, capacity: int):
    """Token t's k-th choice goes to slot (expert, position) in token order; over capacity
    (or padding) it is dropped."""
    B, T, D = x_BTD.shape
    E, K = self.num_experts, exp_BTK.shape[-1]
    exp_BM = exp_BTK.reshape(B, T * K)  # m = t·K + k: token-major order
    valid_BM = jnp.repeat(valid_BT, K, axis=1)
    onehot_BME = jax.nn.one_hot(exp_BM, E, dtype=jnp.int32) * valid_BM[..., None]
    pos_BM = jnp.sum((jnp.cumsum(onehot_BME, axis=1) - 1) * onehot_BME, axis=-1)
    keep_BM = valid_BM & (pos_BM < capacity)
    slot_BM = jnp.where(keep_BM, exp_BM * capacity + pos_BM, E * capacity)  # E·C: dropped
    tok_BM = jnp.broadcast_to(jnp.arange(T * K) // K, (B, T * K))

    def gather(x_TD, slot_M, tok_M):
      return jnp.zeros((E * capacity, D), x_TD.dtype).at[slot_M].set(x_TD[tok_M], mode="drop")

    x_BECD = jax.vmap(gather)(x_BTD, slot_BM, tok_BM).reshape(B, E, capacity, D)
    out_BSD = self._experts(x_BECD).reshape(B, E * capacity, D)
    out_BMD = jax.vmap(lambda o, s: o.at[s].get(mode="fill", fill_value=0))(out_BSD, slot_BM)
    gate_BM = gate_BTK.reshape(B, T * K) * keep_BM
    y_BTD = jnp.sum((out_BMD * gate_BM[..., None]).reshape(B, T, K, D), axis=2)
    kept_BT = jnp.sum(keep_BM.reshape(B, T, K), axis=-1).astype(jnp.int32)
    n_choices = jnp.maximum(jnp.sum(valid_BM), 1)
    return y_BTD, {
        "experts_per_token": kept_BT,                                            # (B, T)
        "dropped_fraction": jnp.sum(valid_BM & ~keep_BM) / n_choices,            # choices dropped
    }
