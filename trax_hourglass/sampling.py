"""Temperature sampling from a predict-mode LM, as pure functions.

    state = decoding.fresh_state(model, batch_size=2)
    tokens, state = jax.jit(lambda w, s, p, k: temperature_sample(
        model, w, s, p, k, n_tokens=50, temperature=0.8, top_k=40))(
            weights, state, prompt, jax.random.PRNGKey(0))

Weights, state, prompt and random key go in; tokens and the state after them
come out. Nothing here reads or writes `model.weights` or `model.state`,
times, prints or picks chunk sizes: `decoding.sample` drives these functions
in chunks (`prefill`, then `decode` per chunk) and keeps the bookkeeping. The
key is split once per token, in the same order on either path, so a seed
gives the same tokens however the decoding is chunked.

The model follows trax's decoding convention: each call takes the previous
tokens (the start token 0 first) and returns the logits of the next ones,
updating its caches in the state.
"""

import jax
import jax.numpy as jnp

# Predict mode has no dropout: the model's own rng is a constant.
_MODEL_RNG_SEED = 0


def choose(logits, key, temperature, top_k):
  """logits (batch, vocab) -> tokens (batch,) int32.

  temperature 0 is argmax; top_k in 1..vocab keeps the k largest logits (0:
  all). Both may be traced: other values do not recompile.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  top_k = jnp.where((top_k < 1) | (top_k > vocab), vocab, top_k)
  # Sorting a large vocabulary costs: only when some tokens are cut.
  kth = jax.lax.cond(
      top_k < vocab,
      lambda x: jnp.sort(x, axis=-1)[:, vocab - top_k][:, None],
      lambda x: jnp.full((x.shape[0], 1), -jnp.inf, x.dtype), logits)
  kept = jnp.where(logits < kth, -jnp.inf, logits)
  drawn = jax.random.categorical(key, kept / jnp.maximum(temperature, 1e-6),
                                 axis=-1)
  return jnp.where(temperature == 0, jnp.argmax(logits, axis=-1),
                   drawn).astype(jnp.int32)


def _step(model, weights, state, tokens, key, temperature, top_k):
  """tokens (batch, n) -> (the token after them (batch,), state, key)."""
  logits, state = model.pure_fn(tokens, weights, state,
                                jax.random.PRNGKey(_MODEL_RNG_SEED))
  key, sub = jax.random.split(key)
  return choose(logits[:, -1], sub, temperature, top_k), state, key


def prefill(model, weights, state, prompt, key, temperature, top_k):
  """Feeds the start token and `prompt` in one call; draws the first token.

  Args:
    model: a trax LM in 'predict' mode (its weights and state are not used).
    weights: its weights, e.g. `predict_weights.decoding_weights(model)`.
    state: its state before any token, for `batch` sequences.
    prompt: int (batch, P), P >= 0.
    key: a jax random key.
    temperature, top_k: as in `choose`.

  Returns:
    (first new token (batch,) int32, state after the prompt, next key).
  """
  start = jnp.zeros((prompt.shape[0], 1), jnp.int32)
  tokens = jnp.concatenate([start, prompt.astype(jnp.int32)], axis=1)
  return _step(model, weights, state, tokens, key, temperature, top_k)


def decode(model, weights, state, token, key, temperature, top_k, n,
           max_n):
  """Feeds `token`, then n - 1 drawn ones, in one `lax.fori_loop`.

  Args:
    model, weights, temperature, top_k: as in `prefill`.
    state: the state after the tokens before `token`.
    token: int32 (batch,), the last token drawn.
    key: the key after that token's.
    n: tokens to draw, 0..max_n (may be traced: other values do not
      recompile).
    max_n: the size of the output buffer (static).

  Returns:
    (out (batch, max_n) int32: out[:, :n] the n new tokens, state after them
    but the last, the last token, next key): the arguments of the next call.
  """
  def body(i, carry):
    state, token, key, out = carry
    token, state, key = _step(model, weights, state, token[:, None], key,
                              temperature, top_k)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    return state, token, key, out

  out = jnp.zeros((token.shape[0], max_n), jnp.int32)
  state, token, key, out = jax.lax.fori_loop(0, n, body,
                                             (state, token, key, out))
  return out, state, token, key


def temperature_sample(model, weights, state, prompt, key, n_tokens,
                       temperature=1.0, top_k=None):
  """Samples `n_tokens` tokens after `prompt`: a pure function (jit it).

  Args:
    model: a trax LM in 'predict' mode.
    weights: its weights (`predict_weights.decoding_weights(model)`).
    state: its state before any token, for the prompt's batch
      (`decoding.fresh_state`).
    prompt: int (batch, P), P >= 0.
    key: a jax random key: the same key gives the same tokens.
    n_tokens: how many new tokens (static, >= 1).
    temperature: softmax temperature; 0 is greedy (argmax) decoding.
    top_k: if set, sample only among the `top_k` most likely tokens.

  Returns:
    (tokens (batch, n_tokens) int32, the state after them but the last), as
    `decoding.sample` returns and leaves in `model.state`.
  """
  top_k = 0 if top_k is None else top_k  # 0: all tokens.
  token, state, key = prefill(model, weights, state, prompt, key,
                              temperature, top_k)
  rest, state, _, _ = decode(model, weights, state, token, key, temperature,
                             top_k, n_tokens - 1, n_tokens - 1)
  return jnp.concatenate([token[:, None], rest], axis=1), state
