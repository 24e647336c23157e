"""KV-cache decoding equals full recomputation; sampling respects temperature and top-p."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peer_jax.model import Transformer
from peer_jax.sampling import generate, sample_next
from tests.conftest import REPO, tiny_config


@pytest.mark.parametrize("ffw", ["dense", "peer"])
def test_cached_decoding_matches_full_forward(ffw):
  cfg = tiny_config(ffw)
  cfg.model.ffw_layers = "all"
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.model.vocab_size)
  full, _ = model(tokens)
  caches = model.init_cache(2, 12)
  prefill, caches = model.extend(tokens[:, :7], caches)
  np.testing.assert_allclose(prefill, full[:, :7], atol=2e-4, rtol=1e-4)
  for t in range(7, 12):
    step, caches = model.extend(tokens[:, t:t + 1], caches)
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=2e-4, rtol=1e-4)


def test_greedy_generation_matches_argmax_loop():
  cfg = tiny_config("peer")
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  prompt = jnp.asarray([[5, 17, 300, 42]])
  out = np.asarray(generate(graphdef, (params, rest), prompt, 6))
  seq = prompt
  for _ in range(6):
    logits, _ = model(seq)
    seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
  np.testing.assert_array_equal(out, np.asarray(seq[:, 4:]))


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(sample_next(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
  assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn
  draws = {int(sample_next(logits, jax.random.key(i), 1.0, 1.0)[0]) for i in range(400)}
  assert draws == {0, 1, 2, 3}
  assert int(sample_next(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


@pytest.mark.slow  # the script's loader is test_run's; generation is tested in-process here
def test_sample_script_on_a_trained_run(tmp_path):
  from tests.test_checkpoint import TINY
  train = subprocess.run(
      [sys.executable, f"{REPO}/scripts/train.py", f"--config={REPO}/configs/default.py",
       f"--workdir={tmp_path}", *TINY, "--config.train.steps=2"],
      capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-2000:]
  # The workdir as a user types it: relative to the directory sample.py runs from.
  result = subprocess.run(
      [sys.executable, f"{REPO}/scripts/sample.py", f"--workdir={tmp_path.name}",
       "--prompt=The game", "--max_new_tokens=5", "--temperature=0.8", "--top_p=0.9"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path.parent)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("The game")
  missing = subprocess.run(
      [sys.executable, f"{REPO}/scripts/sample.py", f"--workdir={tmp_path}/nothing",
       "--prompt=x"], capture_output=True, text=True, timeout=600)
  assert missing.returncode == 2 and "error:" in missing.stderr
  assert "Traceback" not in missing.stderr
