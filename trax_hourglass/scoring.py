"""Scoring: the bits a language model needs for its data.

`Scorer` runs a model's jitted forward pass and gives log2 p(token | the tokens
before it) for every token of a batch. `score_bytes` adds them up over a byte
stream (strided windows: each byte scored once, with context), `score_images`
over images (each on its own). Bits per byte (per dimension, for images) is
the total bits over the number of tokens scored.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def token_log_probs(logits, targets):
  """log p(targets) in nats: [..., vocab] logits, [...] ids -> [...] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


class Scorer:
  """Batched, jitted forward passes of an LM returning log2 p of each token."""

  def __init__(self, model):
    """`model`: an initialized trax LM (mode 'eval') mapping tokens to logits
    (or to (logits, boundary_loss), as HourglassLM with learned boundaries)."""
    self._model = model
    self._rng = jax.random.PRNGKey(0)  # Unused: no dropout in 'eval' mode.

    def log_probs(inputs, targets, weights, state, rng):
      logits, _ = model.pure_fn(inputs, weights, state, rng)
      if isinstance(logits, (tuple, list)):  # Learned boundaries: their loss.
        logits = logits[0]
      return token_log_probs(logits, targets)

    self._log_probs = jax.jit(log_probs)

  def log2_probs(self, x, weights=None, targets=None):
    """log2 p(x[:, t] | x[:, <t]): int32 [batch, length] -> float [batch, length].

    Args:
      x: int32 [batch, length] tokens the model reads (it shifts them right).
      weights: the model's weights to score with (default its own).
      targets: int32 [batch, length] tokens scored at each position instead
        of `x`'s, e.g. when `x` hides part of them.
    """
    weights = self._model.weights if weights is None else weights
    logp = self._log_probs(x, x if targets is None else targets, weights,
                           self._model.state, self._rng)
    return np.asarray(logp, np.float64) / math.log(2)


def score_bytes(scorer, data, sequence_length, stride, batch_size,
                progress=None):
  """Total bits of `data` (uint8), each byte scored once with context.

  Window k covers data[end - L, end) with end = min(n, L + k*stride), and
  scores its last `stride` bytes (all of them for the first window).

  Returns:
    (total_bits, n_bytes_scored); `progress` as in `_score_rows`.
  """
  n, length = len(data), sequence_length
  if n < 2:
    raise ValueError(f'need at least 2 bytes to score, got {n}')
  length = min(length, n)
  windows = [(0, 0)]  # (start, first scored offset within window)
  end = length
  while end < n:
    new_end = min(n, end + stride)
    windows.append((new_end - length, length - (new_end - end)))
    end = new_end
  starts, firsts = zip(*windows)
  bits, _ = _score_rows(scorer, lambda i: data[starts[i]:starts[i] + length],
                        firsts, batch_size, progress)
  return bits, n


def score_images(scorer, tokens, batch_size, progress=None):
  """Total bits of every subpixel of `tokens` (int [N, D]); returns (bits, N*D).

  Each image is scored on its own; `progress` as in `_score_rows`.
  """
  return _score_rows(scorer, lambda i: tokens[i], [0] * len(tokens),
                     batch_size, progress)


def _score_rows(scorer, row, firsts, batch_size, progress):
  """(Total bits, tokens) of `row(i)[firsts[i]:]` for every i, all rows of one
  length, through `scorer.log2_probs` `batch_size` rows at a time (the last
  batch padded: one compilation); `progress`, if given, is called after each
  batch with (batches done, of total, bits so far, tokens scored so far)."""
  total, scored = 0.0, 0
  n_batches = -(-len(firsts) // batch_size)
  for b in range(0, len(firsts), batch_size):
    x = np.stack([np.asarray(row(i)) for i in range(
        b, min(b + batch_size, len(firsts)))]).astype(np.int32)
    real, length = x.shape
    x = np.concatenate([x, np.zeros((batch_size - real, length), np.int32)])
    lp = scorer.log2_probs(x)
    for j, first in enumerate(firsts[b:b + real]):
      total -= float(lp[j, first:].sum())
      scored += length - first
    if progress:
      progress(b // batch_size + 1, n_batches, total, scored)
  return total, scored
