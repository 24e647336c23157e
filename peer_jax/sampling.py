"""Text generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

The prompt fills every block's attention cache in one forward pass; each new token is then
one cached step (`Transformer.extend`), all inside one jitted `lax.scan`.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_next(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_p: float
                ) -> jax.Array:
  """One token per row: argmax at temperature 0, else a draw from the top-p nucleus."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
    keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate(graphdef, state, prompt_BT, max_new_tokens: int, temperature: float,
              top_p: float, rng):
  model = nnx.merge(graphdef, *state, copy=True)
  batch, prompt_len = prompt_BT.shape
  caches = model.init_cache(batch, prompt_len + max_new_tokens)
  logits_BTV, caches = model.extend(prompt_BT, caches)
  keys = jax.random.split(rng, max_new_tokens)
  first_B = sample_next(logits_BTV[:, -1], keys[0], temperature, top_p)

  def step(carry, key):
    token_B, caches = carry
    logits_B1V, caches = model.extend(token_B[:, None], caches)
    return (sample_next(logits_B1V[:, -1], key, temperature, top_p), caches), token_B

  (last_B, _), tokens_NB = jax.lax.scan(step, (first_B, caches), keys[1:])
  return jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1)


def generate(graphdef, state, prompt_BT, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> jax.Array:
  """(B, max_new_tokens) tokens continuing each prompt row; `state` = (params, model_state)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  return _generate(graphdef, tuple(state), jnp.asarray(prompt_BT, jnp.int32), max_new_tokens,
                   float(temperature), float(top_p), jax.random.key(seed))


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
  return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
