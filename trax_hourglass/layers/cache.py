"""Key/value caches of predict mode, shared by every attention of ours.

A cache holds one level's keys (and values) along an axis of `max_len` slots,
in one of two forms (`FORMS`), chosen by backend when the model is built
(`form`):
  * 'pieces' (the CPU): pieces of growing size (see KEY_BLOCK); `attend`
    reads back only the pieces that hold the slots written so far, one
    branch of a `lax.switch` each, so that a step costs what the position
    reached costs, not what the cache's size does. XLA:CPU copies any slice
    of an array before a product, so the pieces are arrays of their own.
  * 'whole' (GPUs, TPUs): one array, read whole under a mask: a step is then
    a few large operations and no branch, and an accelerator's step costs
    the launches of its operations more than the bytes a small cache holds.
Both give the same results (tests/test_predict.py checks both on the CPU).
`append` writes new keys at a traced position in either.

Overflow policy (relative and rotary attention alike): a step that would write
past the cache raises `PastMaxLenError` (inside trax's LayerError when called
through a layer) at once outside jit; traced, it calls the host through
`jax.debug.callback`, which raises it (an XlaRuntimeError carrying it, when
the outputs are read), and the step returns NaNs, never plausible garbage. `HourglassLM` checks its token count on the host
before any of its caches overflows, so its callers see the plain error; it
traces its layers under `checked_by_caller()`, which leaves the callback out:
a callback is an effect, and a compiled computation with one is dispatched by
jax's Python path instead of its C++ one, which costs each call of a decode
step (trax's `autoregressive_sample` makes one a token) time per argument.
"""

import contextlib
import contextvars

import jax
import numpy as np
from trax.fastmath import numpy as jnp

from trax_hourglass.layers import control_flow

# A cache is kept in pieces whose ends are KEY_BLOCK, twice that, four
# times, ... and its size; a step reads the fewest pieces that hold the keys
# it sees, each whole (XLA:CPU copies any slice of an array before a product),
# so it costs at most about twice what the position reached costs.
KEY_BLOCK = 256
_MASK_VALUE = -1e9
FORMS = ('pieces', 'whole')

_FORM = contextvars.ContextVar('cache_form', default=None)


_CHECKED_BY_CALLER = contextvars.ContextVar('checked_by_caller', default=False)


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


@contextlib.contextmanager
def checked_by_caller():
  """Caches traced within skip their host callback: the caller checks room."""
  token = _CHECKED_BY_CALLER.set(True)
  try:
    yield
  finally:
    _CHECKED_BY_CALLER.reset(token)


def form():
  """The cache form of layers built now: `use_form`'s, else by backend."""
  return _FORM.get() or ('pieces' if jax.default_backend() == 'cpu'
                         else 'whole')


@contextlib.contextmanager
def use_form(name):
  """Caches initialised within take form `name` (one of FORMS), any backend."""
  if name not in FORMS:
    raise ValueError(f'cache form {name!r}; use one of {FORMS}.')
  token = _FORM.set(name)
  try:
    yield
  finally:
    _FORM.reset(token)


def check_room(n_done, length, max_len, on_overflow):
  """Traced bool: do slots n_done..n_done+length-1 go past `max_len`?

  When they do, `on_overflow(n_done, length, max_len)` runs on the host (see
  the module docstring), unless traced under `checked_by_caller()` (then it
  is False: the caller checked); callers turn their outputs to NaN
  (`nan_if`).
  """
  past = n_done + length > max_len
  if not control_flow.is_traced(past):  # Called outside jit: raise now.
    if past:
      on_overflow(n_done, length, max_len)
    return bool(past)
  if _CHECKED_BY_CALLER.get():
    return False  # The caller raised before any step past max_len.
  jax.lax.cond(past,
               lambda: jax.debug.callback(on_overflow, n_done, length, max_len),
               lambda: None)
  return past


def nan_if(past, x):
  """x, or NaN where `check_room` said past (nothing when checked by caller)."""
  return x if past is False else jnp.where(past, jnp.nan, x)


def piece_lengths(n_keys, cache_form=None):
  """Lengths of the pieces of a cache of `n_keys` slots (see KEY_BLOCK).

  Form 'whole' (default: `form()`): one piece. A last piece under a quarter
  of KEY_BLOCK (e.g. the one slot of a cache of 2,049) joins the one before:
  each piece costs a write and a branch per step.
  """
  if (cache_form or form()) == 'whole':
    return [n_keys]
  ends = [KEY_BLOCK]
  while ends[-1] < n_keys:
    ends.append(2 * ends[-1])
  ends = sorted({min(end, n_keys) for end in ends})
  if len(ends) > 1 and ends[-1] - ends[-2] < KEY_BLOCK // 4:
    del ends[-2]
  return [end - start for start, end in zip([0] + ends, ends)]


def zeros(shape, dtype):
  """An empty cache: shape (..., n_keys, d) as a tuple of pieces (`form()`)."""
  *lead, n_keys, d = shape
  return tuple(jnp.zeros((*lead, n, d), dtype) for n in piece_lengths(n_keys))


def append(cache, new, start):
  """`cache` (its pieces, see `zeros`) with `new` (..., m, d) written from
  slot `start` (traced)."""
  if new.shape[-2] == 1:  # One slot (a decode step): one fused write a piece.
    return _append_one(cache, new, start)
  slots = start + jnp.arange(new.shape[-2])
  out, offset = [], 0
  for piece in cache:
    n = piece.shape[-2]
    # Rows outside this piece go to slot n, which is dropped.
    local = jnp.where((slots >= offset) & (slots < offset + n),
                      slots - offset, n)
    out.append(piece.at[..., local, :].set(new.astype(piece.dtype),
                                           mode='drop'))
    offset += n
  return tuple(out)


def _append_one(cache, new, start):
  """`append` of one slot: each piece rewrites the slot, or keeps its own."""
  if len(cache) == 1:  # Form 'whole': the slot is inside (or NaN, see above).
    # The barrier keeps XLA from fusing the write into each of its readers:
    # a write per reader, each on a copy of the cache.
    return (jax.lax.optimization_barrier(jax.lax.dynamic_update_slice_in_dim(
        cache[0], new.astype(cache[0].dtype), start, axis=-2)),)
  out, offset = [], 0
  for piece in cache:
    n = piece.shape[-2]
    inside = (start >= offset) & (start < offset + n)
    local = jnp.clip(start - offset, 0, n - 1)
    old = jax.lax.dynamic_slice_in_dim(piece, local, 1, axis=-2)
    out.append(jax.lax.dynamic_update_slice_in_dim(
        piece, jnp.where(inside, new.astype(piece.dtype), old), local,
        axis=-2))
    offset += n
  return tuple(out)


def attend(logits_fn, keys, values, n_visible, extra_logits_fn=None):
  """Softmax attention of C queries over the first keys of a cache.

  Reads the fewest pieces that hold the keys some query sees, one branch of a
  `lax.switch` each: a product per piece and no loop.

  Args:
    logits_fn: piece of keys (..., n, d) -> scaled logits (..., C, n).
    keys: a cache: the pieces (see `zeros`) of (..., n_keys, d).
    values: a cache likewise, of (..., n_keys, d_v).
    n_visible: (C,) int, how many keys (from the first) each query sees, at
      least 1 and increasing.
    extra_logits_fn: None or size (static) -> logits (..., C, size) added to
      those of keys 0..size-1.

  Returns:
    (..., C, d_v) attended values.
  """
  def read(n_pieces):
    def branch():
      logits = jnp.concatenate(
          [logits_fn(k) for k in keys[:n_pieces]], axis=-1)
      size = logits.shape[-1]
      if extra_logits_fn is not None:
        logits = logits + extra_logits_fn(size)
      mask = jnp.arange(size)[None, :] < n_visible[:, None]
      logits = jnp.where(mask, logits.astype(jnp.float32), _MASK_VALUE)
      values_read = values[:n_pieces]  # Softmax in float32, weights as values.
      probs = jax.nn.softmax(logits, axis=-1).astype(values_read[0].dtype)
      ends = np.cumsum([v.shape[-2] for v in values_read])
      return sum(jnp.einsum('...ik,...kd->...id', p, v) for p, v in zip(
          jnp.split(probs, ends[:-1], axis=-1), values_read))
    return branch

  ends = np.cumsum([piece.shape[-2] for piece in keys])
  if len(ends) == 1:
    return read(1)()
  # The first piece that ends at or past the last key seen: a count, not
  # jnp.searchsorted, which loops (a while loop in every decode step).
  which = jnp.sum(jnp.asarray(ends) < n_visible[-1])
  return control_flow.switch(which, [read(i + 1) for i in range(len(ends))])
