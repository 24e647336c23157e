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


def test_remat_matches_plain(cfg):
  tokens = _tokens((2, 16))
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
