"""The set-up choices a PEER-vs-baselines comparison depends on (docs/ablations.md).

* causality: for every FFW kind claimed causal, a change to a future token leaves every
  earlier logit unchanged; expert-choice MoE is the one kind that is not, and says so;
* init scale: every expert layer starts with the output RMS of the dense FFW it replaces,
  *with* the block's depth-dependent output scale;
* every expert-table optimizer option trains end to end, on one device and on a mesh;
* the new config keys are validated with one-line errors naming the key.

Mesh checks run in a subprocess with 8 host devices (this file is also its worker script:
`python tests/test_fairness.py WORKER ARGS_JSON`).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAUSAL_KINDS = [("dense", {}), ("peer", {}), ("pkm", {}),
                ("moe", {"routing": "token_choice", "capacity_factor": 1.0})]
TABLE_OPTIONS = {
    "adamw_lr4_follow": {"table_lr_scale": 4.0},
    "adamw_lr4_decay": {"table_lr_scale": 4.0, "table_lr_schedule": "decay_to_base"},
    "adamw_constant": {"table_lr_schedule": "constant"},
    "adamw_no_wd": {"table_weight_decay": 0.0},
    "lazy_adam": {"table_optimizer": "lazy_adam"},
    "sgd": {"table_optimizer": "sgd", "table_lr_scale": 4.0},
    "adafactor": {"table_optimizer": "adafactor"},
}


def small_model(kind: str, moe: dict | None = None, num_layers: int = 2):
  from configs import default
  m = default.get_config().model
  m.vocab_size, m.d_model, m.num_heads, m.d_ff, m.num_layers = 256, 32, 2, 128, num_layers
  m.ffw = kind
  m.peer.num_experts, m.peer.query_dim = 16**2, 16
  m.pkm.num_memories, m.pkm.key_dim = 16**2, 16
  m.moe.num_experts = 4
  for key, value in (moe or {}).items():
    m.moe[key] = value
  return m


# ----------------------------------------------------------------------------- causality


def changed_positions(model_cfg, seed=0):
  """Earlier positions whose logits move when the last token changes (eval mode)."""
  import jax
  from flax import nnx
  from peer_jax.model import Transformer
  model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, model_cfg.vocab_size)
  other = tokens.at[:, -1].set((tokens[:, -1] + 1) % model_cfg.vocab_size)
  a, _ = model(tokens, train=False)
  b, _ = model(other, train=False)
  diff = np.abs(np.asarray(a[:, :-1] - b[:, :-1])).max(axis=-1)
  return int((diff > 1e-6).sum())


@pytest.mark.parametrize("kind,moe", CAUSAL_KINDS, ids=[k for k, _ in CAUSAL_KINDS])
def test_causal_kinds_never_see_the_future(kind, moe):
  from peer_jax.model import is_causal
  cfg = small_model(kind, moe)
  assert is_causal(cfg)
  assert changed_positions(cfg) == 0


def test_expert_choice_moe_sees_the_future_and_is_labelled_so():
  from peer_jax.model import is_causal
  cfg = small_model("moe", {"routing": "expert_choice", "capacity_factor": 1.0})
  assert not is_causal(cfg)
  assert changed_positions(cfg) > 0  # if this ever fails, the label is wrong, not the test


@pytest.mark.slow  # the default suite checks cached decoding for dense and PEER (test_sampling)
def test_token_choice_moe_decodes_like_its_training_forward():
  """Incremental decoding (one token at a time) gives the full forward's logits."""
  import jax
  from flax import nnx
  from peer_jax.model import Transformer
  cfg = small_model("moe", {"routing": "token_choice", "capacity_factor": 4.0})
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, cfg.vocab_size)
  full, aux = model(tokens, train=False)
  assert float(aux["block_0"]["dropped_fraction"]) == 0.0
  caches = model.init_cache(1, 12)
  steps = []
  for t in range(12):
    logits, caches = model.extend(tokens[:, t:t + 1], caches)
    steps.append(np.asarray(logits[:, 0]))
  np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), rtol=2e-4, atol=2e-4)


def test_token_choice_drops_late_choices_first_and_reports_them():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from peer_jax.layers.moe import MoE
  layer = MoE(16, num_experts=4, d_ff=32, routing="token_choice", top_k=2,
              capacity_factor=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 32, 16))
  y, aux = layer(x)
  assert 0 < float(aux["dropped_fraction"]) < 1
  kept = np.asarray(aux["experts_per_token"])
  # Slots fill in token order: the first token always keeps both of its choices.
  assert (kept[:, 0] == 2).all()
  assert float(aux["aux_loss"]) > 0 and np.isfinite(np.asarray(y)).all()
  # Padding takes no slot and gets no output.
  seg = jnp.concatenate([jnp.ones((2, 16), jnp.int32), jnp.zeros((2, 16), jnp.int32)], 1)
  y_pad, aux_pad = layer(x, segment_ids_BT=seg)
  assert np.all(np.asarray(y_pad[:, 16:]) == 0)
  assert np.all(np.asarray(aux_pad["experts_per_token"])[:, 16:] == 0)


def test_expert_choice_padding_takes_no_capacity():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from peer_jax.layers.moe import MoE
  layer = MoE(16, num_experts=4, d_ff=32, routing="expert_choice", capacity_factor=1.0,
              rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 32, 16))
  seg = jnp.concatenate([jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 24), jnp.int32)], 1)
  y, aux = layer(x, segment_ids_BT=seg)
  # Capacity 8 per expert and 8 real tokens: every real token is taken by every expert.
  assert np.all(np.asarray(aux["experts_per_token"])[0, :8] == 4)
  assert np.all(np.asarray(y)[0, 8:] == 0)
  # Decoding one token routes it to round(capacity_factor) experts, not to all of them.
  _, aux1 = layer(x[:, :1], decode=True)
  assert int(np.asarray(aux1["experts_per_token"])[0, 0]) == 1


# ----------------------------------------------------------------------------- init scale


def ffw_output_rms(model_cfg, kind: str, moe: dict | None = None, seed=0):
  """RMS of a freshly built FFW layer of `kind`, as a block at this depth builds it."""
  import jax
  from flax import nnx
  from peer_jax.model import make_ffw
  cfg = model_cfg.copy_and_resolve_references()
  for key, value in (moe or {}).items():
    cfg.moe[key] = value
  out_scale = (2 * cfg.num_layers) ** -0.5
  layer = make_ffw(cfg, kind, rngs=nnx.Rngs(seed), dtype=np.float32, out_scale=out_scale)
  x = jax.random.normal(jax.random.key(seed + 7), (4, 64, cfg.d_model))
  y, _ = layer(x, train=True)
  return float(np.sqrt(np.mean(np.square(np.asarray(y)))))


@pytest.mark.parametrize("kind,moe,low,high", [
    ("peer", None, 0.6, 1.6), ("pkm", None, 0.6, 1.6),
    ("moe", {"routing": "token_choice"}, 0.6, 1.6),
    # Expert choice weighs outputs by raw router probabilities (~1/E): quieter by design.
    ("moe", {"routing": "expert_choice"}, 0.0, 1.0)])
def test_every_expert_layer_starts_at_the_depth_scaled_dense_rms(kind, moe, low, high):
  from configs import default
  m = default.get_config().model
  m.num_layers, m.d_model, m.d_ff = 12, 128, 512
  m.peer.num_experts, m.pkm.num_memories = 64**2, 64**2
  dense = ffw_output_rms(m, "dense")
  assert dense == pytest.approx(0.65 * (2 * 12) ** -0.5, rel=0.15)  # a·out_scale, GELU a≈0.65
  ratio = ffw_output_rms(m, kind, moe) / dense
  assert low <= ratio <= high, f"{kind} {moe}: output RMS {ratio:.2f}x the dense FFW's"


def test_value_init_rules():
  from peer_jax.layers.peer import table_init_std
  assert table_init_std("match_dense", 2.0, 64, 0.25) == pytest.approx(0.5)
  assert table_init_std("match_dense_unscaled", 2.0, 64, 0.25) == pytest.approx(2.0)
  assert table_init_std("embed", 2.0, 64, 0.25) == pytest.approx(1 / 8)
  with pytest.raises(ValueError, match="value_init"):
    table_init_std("xavier", 2.0, 64, 0.25)


# ----------------------------------------------------------------------------- optimizer


def table_losses(kind: str, options: dict, mesh_shape=(1, 1, 1), steps: int = 3, devices=None):
  """Losses of `steps` train steps of a tiny `kind` model with table options."""
  import jax
  from tests.test_sharding import equivalence_config, train_losses
  cfg = equivalence_config(kind)
  for key, value in options.items():
    cfg.train[key] = value
  losses, _ = train_losses(cfg, mesh_shape, steps, devices=devices)
  return losses


# The default suite trains the default table setting and the row-sparse optimizer for PEER,
# and the default for PKM (its tables go through the same optimizer code); the other
# options run with the slow tests (test_table_options_are_really_applied checks each one's
# effect on the optimizer in the default suite).
FAST = {"peer": ("adamw_lr4_decay", "lazy_adam"), "pkm": ("adamw_lr4_decay",)}
ONE_DEVICE_CASES = [
    pytest.param(kind, o, id=f"{kind}-{o}", marks=() if o in FAST[kind] else pytest.mark.slow)
    for kind in ("peer", "pkm") for o in sorted(TABLE_OPTIONS)]


@pytest.mark.parametrize("kind,option", ONE_DEVICE_CASES)
def test_every_table_option_trains_on_one_device(kind, option):
  losses = table_losses(kind, TABLE_OPTIONS[option])
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_table_options_are_really_applied():
  """A table LR multiplier changes the tables' update, and nothing else's."""
  import jax
  from tests.test_sharding import equivalence_config, fixed_batch
  from peer_jax.train import Trainer
  out = {}
  shared = {"table_lr_scale": 1.0, "table_lr_schedule": "follow"}  # the one shared AdamW
  lr4 = {"table_lr_scale": 4.0, "table_lr_schedule": "follow"}
  for name, opts in {"base": shared, "lr4": lr4}.items():
    cfg = equivalence_config("peer")
    for key, value in opts.items():
      cfg.train[key] = value
    trainer = Trainer.build(cfg, devices=jax.devices()[:1])
    state = trainer.init_state()
    before = jax.device_get(state.params)
    state, _ = trainer.train_step(state, fixed_batch(cfg))
    after = jax.device_get(state.params)
    ffw = lambda p: p["block_1"]["ffw"]
    out[name] = {
        "v": np.abs(np.asarray(ffw(after)["v_ND"].value) - np.asarray(ffw(before)["v_ND"].value)).max(),
        "q": np.abs(np.asarray(ffw(after)["retrieval"]["w_q_DQ"].value)
                    - np.asarray(ffw(before)["retrieval"]["w_q_DQ"].value)).max()}
  # First Adam step moves every touched entry by ~lr: 4x for the tables, 1x elsewhere.
  assert out["lr4"]["v"] == pytest.approx(4 * out["base"]["v"], rel=0.05)
  assert out["lr4"]["q"] == pytest.approx(out["base"]["q"], rel=1e-5)


def run_worker(worker: str, args: dict, devices: int = 8, timeout: int = 900) -> dict:
  """This file as the worker script of test_sharding's subprocess runner."""
  from tests.test_sharding import run_worker as run_script_worker
  return run_script_worker(worker, args, devices, timeout, script=__file__)


def worker_tables_on_mesh(args):
  import jax
  out = {}
  for kind, option in args["cases"]:
    ref = table_losses(kind, TABLE_OPTIONS[option], devices=jax.devices()[:1])
    mesh = table_losses(kind, TABLE_OPTIONS[option], mesh_shape=tuple(args["mesh"]))
    out[f"{kind}/{option}"] = {"one": ref, "mesh": mesh}
  return out


def check_tables_on_mesh(cases):
  res = run_worker("tables_on_mesh", {"cases": cases, "mesh": (2, 2, 2)})
  for name, r in res.items():
    assert r["one"][-1] < r["one"][0], name
    np.testing.assert_allclose(r["mesh"], r["one"], rtol=1e-4, err_msg=name)


@pytest.mark.slow  # on a mesh the default table branch runs in test_sharding's mesh-vs-one-device test
def test_row_sparse_table_optimizer_trains_the_same_on_a_mesh():
  """lazy_adam finds touched rows of D-sharded tables (the default table branch, 4x decaying,
  is on every mesh test of test_sharding.py)."""
  check_tables_on_mesh([("peer", "lazy_adam")])


@pytest.mark.slow
def test_table_options_train_the_same_on_a_mesh():
  cases = [("peer", o) for o in ("adamw_lr4_decay", "sgd", "adafactor", "adamw_constant")]
  check_tables_on_mesh(cases + [("pkm", "adamw_no_wd"), ("pkm", "lazy_adam")])


# ----------------------------------------------------------------------------- config keys


@pytest.mark.parametrize("key,value,message", [
    ("model.peer.value_init", "xavier", "model.peer.value_init: unknown value 'xavier'"),
    ("model.pkm.value_init", "big", "model.pkm.value_init: unknown value 'big'"),
    ("model.moe.routing", "hash", "model.moe.routing: unknown value 'hash'"),
    ("model.moe.top_k", 9, "model.moe.top_k: 9 exceeds model.moe.num_experts=8"),
    ("model.moe.aux_loss_coef", -1.0, "model.moe.aux_loss_coef"),
    ("train.table_lr_schedule", "cosine2", "train.table_lr_schedule: unknown value 'cosine2'"),
    ("train.table_weight_decay", -0.5, "train.table_weight_decay: must be >= 0"),
])
def test_new_config_keys_are_validated(key, value, message):
  from configs import default
  from peer_jax.config_validation import ConfigError, validate_config
  cfg = default.get_config()
  section, *_ = key.split(".")
  if key.startswith("model.pkm"):
    cfg.model.ffw = "pkm"
  if key.startswith("model.moe"):
    cfg.model.ffw, cfg.model.moe.routing = "moe", "token_choice"
  node = cfg
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  node[last] = value
  with pytest.raises(ConfigError) as e:
    validate_config(cfg, num_devices=1, check_files=False)
  assert message in str(e.value) and "\n" not in str(e.value)


WORKERS = {"tables_on_mesh": worker_tables_on_mesh}

if __name__ == "__main__":
  sys.path.insert(0, REPO)
  import peer_jax  # noqa: F401  (Flax flags)
  print(json.dumps(WORKERS[sys.argv[1]](json.loads(sys.argv[2]))))
