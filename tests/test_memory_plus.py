"""Memory+ (peer_jax/kinds/memory_plus.py): shapes, a naive reference in values and
gradients, causality, the shared value pool, FLOPs/params, training and save/restore."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from peer_jax import flops, optim
from peer_jax.kinds import memory_plus
from peer_jax.kinds.memory_plus import MemoryPlus
from peer_jax.layers.common import rms_norm
from peer_jax.model import Transformer, is_causal
from tests.conftest import tiny_config

D, N, H, K, KD = 32, 8**2, 2, 4, 16


def mp_config(shared: bool = False, ffw_layers: str = "middle"):
  """conftest's tiny config with a tiny Memory+ layer (16² memories, 2 heads, top-4)."""
  c = tiny_config("memory_plus")
  c.model.memory_plus = s = ml_collections.ConfigDict(memory_plus.default_config())
  s.num_memories, s.heads, s.top_k, s.key_dim = 16**2, 2, 4, 16
  s.shared_values, s.kernel = shared, "xla"
  c.model.ffw_layers = ffw_layers
  return c


def _layer(seed=0, **kw):
  return MemoryPlus(D, num_memories=N, heads=H, top_k=K, key_dim=KD, kernel="xla",
                    rngs=nnx.Rngs(seed), **kw)


def _x(shape=(2, 5, D), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def reference(layer, x_BTD):
  """Brute force: scores against all N = n² full keys, top-k, softmax, gather, gate."""
  r = layer.retrieval
  q_BTHd = r.queries(x_BTD, train=False)
  half = KD // 2
  c1, c2 = (rms_norm(c, None, eps=1e-6) * KD ** -0.5 for c in (r.keys1[...], r.keys2[...]))
  n = c1.shape[1]
  s1 = jnp.einsum("bthd,hnd->bthn", q_BTHd[..., :half], c1)
  s2 = jnp.einsum("bthd,hnd->bthn", q_BTHd[..., half:], c2)
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
  scores, idx = jax.lax.top_k(full, K)
  w = jax.nn.softmax(scores, axis=-1)
  values = layer.pool.values_NV[...]
  y = jnp.einsum("bthk,bthkd->btd", w, values[idx])
  gate = jax.nn.silu(x_BTD @ layer.w_gate_DD[...])
  return (y * gate) @ layer.w_out_DD[...], idx


def test_shapes_and_aux():
  y, aux = _layer()(_x())
  assert y.shape == (2, 5, D) and y.dtype == jnp.float32
  assert aux["expert_indices"].shape == (2, 5, H, K) == aux["expert_weights"].shape
  assert int(aux["expert_indices"].max()) < N
  np.testing.assert_allclose(aux["expert_weights"].sum(-1), 1.0, rtol=1e-5)


def test_matches_naive_reference_in_values_and_gradients():
  layer = _layer()
  x = _x()
  y, aux = layer(x)
  y_ref, idx_ref = reference(layer, x)
  np.testing.assert_array_equal(np.sort(aux["expert_indices"], -1), np.sort(idx_ref, -1))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)

  graphdef, params = nnx.split(layer, nnx.Param)
  cot = jax.random.normal(jax.random.key(7), y.shape)

  def loss(params, x, ref):
    mod = nnx.merge(graphdef, params)
    out = reference(mod, x)[0] if ref else mod(x)[0]
    return jnp.sum(out * cot)

  g, gx = jax.grad(loss, argnums=(0, 1))(params, x, False)
  g_ref, gx_ref = jax.grad(loss, argnums=(0, 1))(params, x, True)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(g["pool"]["values_NV"].value).sum()) > 0


def test_output_at_t_ignores_later_tokens_in_training_too():
  c = mp_config()
  model = Transformer(c.model, rngs=nnx.Rngs(0))
  assert is_causal(c.model)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, c.model.vocab_size)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 11) % c.model.vocab_size)
  for train in (False, True):
    a, _ = model(tokens, train=train)
    b, _ = model(changed, train=train)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5)
    assert not np.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


def _leaves(state):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


def test_shared_pool_is_one_param_with_summed_gradient():
  shared = Transformer(mp_config(True, "all").model, rngs=nnx.Rngs(0))
  assert shared.block_0.ffw.pool is shared.block_1.ffw.pool
  params = nnx.state(shared, nnx.Param)
  tables = [k for k in _leaves(params) if "values_NV" in k]
  assert tables == ["['block_0']['ffw']['pool']['values_NV'].value"]

  # The same model untied: both pools hold the shared table, everything else equal.
  untied = Transformer(mp_config(False, "all").model, rngs=nnx.Rngs(0))
  flat = nnx.to_pure_dict(params)
  pure = nnx.to_pure_dict(nnx.state(untied, nnx.Param))
  pure = jax.tree_util.tree_map_with_path(
      lambda p, _: _get(flat, p) if _has(flat, p) else flat["block_0"]["ffw"]["pool"]["values_NV"],
      pure)
  untied_params = nnx.state(untied, nnx.Param)
  nnx.replace_by_pure_dict(untied_params, pure)
  nnx.update(untied, untied_params)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 32768)

  def loss(model):
    return jnp.mean(jax.nn.logsumexp(model(tokens)[0], -1))

  np.testing.assert_allclose(loss(shared), loss(untied), rtol=1e-6)
  g_shared = _leaves(nnx.grad(loss)(shared))
  g_untied = _leaves(nnx.grad(loss)(untied))
  key = "['block_{}']['ffw']['pool']['values_NV'].value"
  both = g_untied[key.format(0)] + g_untied[key.format(1)]
  assert float(jnp.abs(g_untied[key.format(1)]).sum()) > 0  # layer 1 contributes
  np.testing.assert_allclose(g_shared[key.format(0)], both, rtol=1e-4, atol=1e-7)


def _has(d, path):
  try:
    _get(d, path)
    return True
  except (KeyError, TypeError):
    return False


def _get(d, path):
  for entry in path:
    d = d[getattr(entry, "key", getattr(entry, "idx", None))]
  return d


@pytest.mark.parametrize("shared,layers", [(False, "middle"), (False, "all"), (True, "all")])
def test_param_counts_match_the_built_module(shared, layers):
  c = mp_config(shared, layers)
  model = Transformer(c.model, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  counts = flops.param_counts(c.model)
  assert counts["total"] == sum(x.size for x in jax.tree.leaves(params))
  tables = [x for k, x in _leaves(params).items() if "values_NV" in k]
  assert counts["expert_tables"] == sum(x.size for x in tables)
  assert len(tables) == (1 if shared or layers == "middle" else 2)
  n_layers = 2 if layers == "all" else 1
  assert counts["active"] == counts["total"] - counts["expert_tables"] + n_layers * 2 * 4 * 32
  # One table for the table optimizer; a shared one is read by every layer.
  assert optim.expert_table_shape(c.model) == (256, 2 * 4 * (n_layers if shared else 1))
  labels = jax.tree.leaves(optim.table_labels(nnx.to_pure_dict(params)))
  assert labels.count("table") == len(tables)


def test_flops_terms():
  c = mp_config()
  f = flops.flops_per_token(c.model, 32)
  d, h, k, q, n = 32, 2, 4, 16, 16
  assert f["memory_plus_query"] == 2 * d * h * q
  assert f["memory_plus_subkey_scores"] == 2 * h * n * q
  assert f["memory_plus_values"] == 2 * h * k * d
  assert f["memory_plus_gate"] == f["memory_plus_out"] == 2 * d * d
  assert f["expert_layer"] == sum(v for key, v in f.items()
                                  if key.startswith("memory_plus_") and not key.endswith("_ops"))
  assert flops.gathered_elements_per_token(c.model)["memory_plus"] == h * k * d


def _trainer(c):
  from peer_jax.train import Trainer, prepare
  prepare(c)
  return Trainer.build(c)


def _batch(trainer, seed=0):
  from peer_jax.data import global_batch
  tokens = np.random.RandomState(seed).randint(0, 32768, (4, 33)).astype(np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               positions=np.tile(np.arange(32, dtype=np.int32), (4, 1)),
               segment_ids=np.ones((4, 32), np.int32), mask=np.ones((4, 32), np.float32))
  return global_batch(batch, trainer.batch_sharding)


def test_few_steps_lower_the_loss_and_checkpoint_round_trips(tmp_path):
  from peer_jax.checkpoint import Checkpointer
  c = mp_config(True, "all")
  c.train.steps, c.train.warmup_steps = 8, 1
  trainer = _trainer(c)
  state = trainer.init_state()
  batch = _batch(trainer)
  losses = []
  for _ in range(6):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["train/loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
  assert any(k.startswith("experts/block_1/") for k in metrics)

  ckpt = Checkpointer(str(tmp_path), c.checkpoint)
  ckpt.save(6, state, {}, {}, force=True)
  ckpt.wait()
  ckpt.close()
  restored = Checkpointer(str(tmp_path), c.checkpoint, read_only=True).restore_latest(
      trainer.abstract_state, trainer.state_shardings)
  a, b = _leaves(jax.device_get(state.params)), _leaves(jax.device_get(restored.state.params))
  assert a.keys() == b.keys() and sum("values_NV" in k for k in a) == 1
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  # The restored state trains on, the shared pool still shared after merging.
  model = nnx.merge(trainer.graphdef, restored.state.params, restored.state.model_state)
  assert model.block_0.ffw.pool is model.block_1.ffw.pool
  state2, m2 = trainer.train_step(restored.state, batch)
  assert np.isfinite(float(m2["train/loss"]))
