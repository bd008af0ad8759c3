"""Key/value caches of predict mode, shared by every attention of ours.

A cache holds one level's keys (and values) along an axis of `max_len` slots;
`append` writes new ones at a traced position, `attend` reads back only the
slots written so far, in blocks, so that a decoding step costs what the
position reached costs, not what the cache's size does.

Overflow policy (relative and rotary attention alike): a step that would write
past the cache calls the host through `jax.debug.callback`, which raises
`PastMaxLenError` (eagerly inside trax's LayerError, under jit as an
XlaRuntimeError carrying it, when the outputs are read), and the step returns
NaNs, never plausible garbage. `HourglassLM` checks its token count on the host
before any of its caches overflows, so its callers see the plain error.
"""

import jax
from trax.fastmath import numpy as jnp

# Keys read per iteration of `attend`: the cost of a step grows by one block
# of keys at a time.
KEY_BLOCK = 256
_MASK_VALUE = -1e9


class PastMaxLenError(ValueError):
  """A predict-mode layer or model was given more positions than it caches."""


def raise_past_max_len(name, n_done, length, max_len):
  """Host side of the overflow check: raises PastMaxLenError when past."""
  n_done, length = int(n_done), int(length)
  if n_done + length > max_len:
    raise PastMaxLenError(
        f'{name} in predict mode got positions {n_done}..'
        f'{n_done + length - 1}, past max_inference_length={max_len}; make '
        'max_inference_length cover the longest sequence to decode.')


def check_room(n_done, length, max_len, on_overflow):
  """Traced bool: do slots n_done..n_done+length-1 go past `max_len`?

  When they do, `on_overflow(n_done, length, max_len)` runs on the host (see
  the module docstring); callers turn their outputs to NaN.
  """
  past = n_done + length > max_len
  jax.lax.cond(past,
               lambda: jax.debug.callback(on_overflow, n_done, length,
                                          max_len),
               lambda: None)
  return past


def append(cache, new, start, axis):
  """`cache` with `new` written from slot `start` (traced) along `axis`."""
  return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype),
                                             start, axis=axis)


def attend(logits_fn, values_fn, n_visible, n_keys, block=KEY_BLOCK):
  """Softmax attention of C queries over the first keys of a cache.

  Online softmax over blocks of `block` keys, in a loop that runs only over
  the blocks some query can see.

  Args:
    logits_fn: start -> scaled logits (..., C, block) of keys start..start+
      block-1 (start traced, a multiple of `block` or n_keys - block).
    values_fn: start -> values (..., block, d) of the same keys.
    n_visible: (C,) int, how many keys (from the first) each query sees, at
      least 1 and increasing.
    n_keys: the cache's number of slots (static).
    block: keys per block (static); at most n_keys is used.

  Returns:
    (..., C, d) attended values.
  """
  block = min(block, n_keys)
  n_blocks = (n_visible[-1] + block - 1) // block

  def step(i, carry):
    top, total, acc = carry
    # The last block may be shifted back to fit the cache; the keys it
    # shares with the block before are masked out.
    start = jnp.minimum(i * block, n_keys - block)
    keys = start + jnp.arange(block)
    mask = (keys[None, :] < n_visible[:, None]) & (keys >= i * block)[None, :]
    logits = jnp.where(mask, logits_fn(start), _MASK_VALUE)
    new_top = jnp.maximum(top, logits.max(axis=-1))
    probs = jnp.exp(logits - new_top[..., None])
    rescale = jnp.exp(top - new_top)
    total = total * rescale + probs.sum(axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum(
        '...ik,...kd->...id', probs, values_fn(start))
    return new_top, total, acc

  first = jax.eval_shape(logits_fn, 0)
  values = jax.eval_shape(values_fn, 0)
  lead = first.shape[:-1]
  init = (jnp.full(lead, 2 * _MASK_VALUE, first.dtype),
          jnp.zeros(lead, first.dtype),
          jnp.zeros(lead + values.shape[-1:], values.dtype))
  _, total, acc = jax.lax.fori_loop(0, n_blocks, step, init)
  return acc / total[..., None]
