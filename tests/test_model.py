"""Transformer shapes, causality, document isolation under packing, remat and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax.model import Transformer, expert_layer_indices
from tests.conftest import tiny_config


def _model(cfg, seed=0):
  return Transformer(cfg.model, rngs=nnx.Rngs(seed))


def _tokens(shape, seed=0, vocab=32768):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_logits_shape_and_dtype(cfg):
  logits, aux = _model(cfg)(_tokens((3, 16)))
  assert logits.shape == (3, 16, cfg.model.vocab_size)
  assert logits.dtype == jnp.float32
  assert aux == {}


def test_future_tokens_do_not_change_past_logits(cfg):
  model = _model(cfg)
  tokens = _tokens((2, 24))
  changed = tokens.at[:, 15:].set((tokens[:, 15:] + 7) % cfg.model.vocab_size)
  a, _ = model(tokens)
  b, _ = model(changed)
  np.testing.assert_allclose(a[:, :15], b[:, :15], atol=1e-5)
  assert not np.allclose(a[:, 15:], b[:, 15:], atol=1e-3)  # the test can see a change


def test_packed_documents_do_not_see_each_other(cfg):
  model = _model(cfg)
  tokens = _tokens((1, 20))
  segments = jnp.asarray([[1] * 8 + [2] * 12])
  positions = jnp.asarray([list(range(8)) + list(range(12))])
  other = tokens.at[:, :8].set((tokens[:, :8] + 3) % cfg.model.vocab_size)
  a, _ = model(tokens, positions, segments)
  b, _ = model(other, positions, segments)
  np.testing.assert_allclose(a[:, 8:], b[:, 8:], atol=1e-5)
  # The second document alone, at positions 0.., gives the same logits as when packed.
  alone, _ = model(tokens[:, 8:])
  np.testing.assert_allclose(a[:, 8:], alone, atol=1e-4)


def _remat_against_plain(cfg):
  """(plain model, remat model, loss fn), after checking that both give the same loss and
  gradients."""
  tokens = _tokens((2, 16), vocab=cfg.model.vocab_size)
  plain = _model(cfg)
  cfg.model.remat = True
  remat = _model(cfg)

  def loss(model):
    logits, _ = model(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  la, ga = nnx.value_and_grad(loss)(plain)
  lb, gb = nnx.value_and_grad(loss)(remat)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  return plain, remat, loss


def test_remat_matches_plain(cfg):
  _remat_against_plain(cfg)


def test_bfloat16_compute_keeps_f32_params(cfg):
  cfg.model.dtype = "bfloat16"
  model = _model(cfg)
  logits, _ = model(_tokens((2, 8)))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_untied_output_and_swiglu(cfg):
  cfg.model.tie_embeddings = False
  cfg.model.ffw_activation = "swiglu"
  model = _model(cfg)
  assert model.unembed_DV is not None
  assert hasattr(model.block_0.ffw, "w_gate_DF")
  logits, _ = model(_tokens((1, 8)))
  assert logits.shape == (1, 8, cfg.model.vocab_size)


def test_every_parameter_has_logical_axis_names(cfg):
  state = nnx.state(_model(cfg), nnx.Param)
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.value.ndim, (path, names)


@pytest.mark.parametrize("spec,expected", [
    ("middle", (5,)), ("all", tuple(range(12))), ("none", ()), ("0, 11", (0, 11)), ("3", (3,)),
])
def test_expert_layer_indices(spec, expected):
  assert expert_layer_indices(spec, 12) == expected


def test_expert_layer_indices_rejects_out_of_range():
  with pytest.raises(ValueError, match="model.ffw_layers"):
    expert_layer_indices("12", 12)


def _count(jaxpr_text: str, prim: str) -> int:
  return jaxpr_text.count(f" {prim}[")


def _grad_jaxpr(model, loss) -> str:
  graphdef, params = nnx.split(model)
  return str(jax.make_jaxpr(lambda p: jax.grad(lambda q: loss(nnx.merge(graphdef, q)))(p))(
      params))


def test_remat_keeps_the_routing_of_expert_layers():
  # model.remat recomputes the blocks' forward, but not PEER's retrieval: the policy keeps
  # the product-key top-k outputs, so the gradient has as many top-k ops as without remat,
  # and the same values and gradients.
  cfg = tiny_config("peer")
  cfg.model.peer.query_norm = "rmsnorm"
  plain, remat, loss = _remat_against_plain(cfg)
  remat_text = _grad_jaxpr(remat, loss)
  assert "checkpoint" in remat_text or "remat" in remat_text  # remat is really on
  assert _count(remat_text, "top_k") == _count(_grad_jaxpr(plain, loss), "top_k") > 0


def test_remat_policy_keeps_the_sharded_banks_pre_activations():
  # Under the policy the backward of the D-sharded bank does not re-gather u rows.
  from jax.sharding import Mesh
  from peer_jax.model import remat_policy
  from peer_jax.ops.sharded_experts import sharded_peer_experts
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 64, size=(8, 2, 4)), jnp.int32)
  w = jnp.asarray(rng.random((8, 2, 4)), jnp.float32)
  u, v = (jnp.asarray(rng.normal(size=(64, 16)), jnp.float32) for _ in range(2))
  probe = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  # As in a block: the bank's output only feeds the residual sum, so its backward needs
  # the residuals of the bank, not its output.
  bank = lambda x, u, v: x + sharded_peer_experts(jnp.tanh(x), idx, w, u, v, mesh=mesh,
                                                  chunk_size=4)
  def gathers(policy):
    f = jax.checkpoint(bank, policy=policy)
    g = jax.grad(lambda *a: jnp.sum(f(*a) * probe), argnums=(0, 1, 2))
    return _count(str(jax.make_jaxpr(g)(x, u, v)), "gather"), g(x, u, v)
  n_saved, g_saved = gathers(remat_policy())
  n_full, g_full = gathers(None)
  assert n_saved < n_full
  for a, b in zip(g_saved, g_full):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
