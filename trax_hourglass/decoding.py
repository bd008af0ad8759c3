"""Sampling from predict-mode language models: the driver of `sampling`.

    model = load_predict_model('~/runs/hg_enwik8')        # training output dir
    tokens = sample(model, 200, prompt=np.frombuffer(b'The ', np.uint8)[None],
                    temperature=0.8, top_k=40)            # (1, 200) int32

`sample` runs the pure functions of `trax_hourglass.sampling` on the device:
the prompt goes through the model in one call (`sampling.prefill`), then each
compiled call generates a chunk of tokens in a `lax.fori_loop`
(`sampling.decode`, the state's buffers donated), so Python runs once per
chunk, not once per token (and the step compiles once without a prompt).
Here lives what is not sampling: chunks grow to about a quarter second each,
so `progress` hears about once a second; compiled steps and each batch
size's fresh state are kept per model
(sampling again is immediate); `model.state` is left after the tokens. The
key is split per token, so the tokens for a seed do not depend on the
chunking: they are `sampling.temperature_sample`'s.

Works on any trax predict-mode LM that follows trax's decoding convention
(`HourglassLM(mode='predict')`, `trax.models.TransformerLM(mode='predict')`):
each call takes the previous tokens (0 first) and returns the logits of the
next ones.
"""

import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from trax import shapes
# The classes themselves: trax.layers' names are gin's wrappers of them.
from trax.layers import attention as trax_attention

from trax_hourglass import runs
from trax_hourglass import sampling
from trax_hourglass.data import images as image_data
# pylint: disable=unused-import,g-importing-member
# Also importable from here, where they lived before.
from trax_hourglass.data.images import image_grid
from trax_hourglass.data.images import save_png
# pylint: enable=unused-import,g-importing-member
from trax_hourglass.layers import predict_weights

# Upper bound of tokens per compiled call (the size of its output buffer).
_MAX_CHUNK = 256
# Aim for calls of about this many seconds: Python overhead stays negligible
# and `progress` hears from us about every second.
_SECONDS_PER_CALL = 0.25
_PROGRESS_EVERY_S = 1.0

# Per model (weakly held): its state before any token by batch size (see
# `_fresh_state`), and compiled functions.
_FRESH_STATES = weakref.WeakKeyDictionary()
_COMPILED = weakref.WeakKeyDictionary()


def _compiled(model):
  """(prefill, run), `model`'s `sampling` steps, jitted once per model."""
  if model in _COMPILED:
    return _COMPILED[model]

  def prefill(weights, kept, prompt, key, temperature, top_k):
    """`sampling.prefill` from the fresh state of this batch size, made here
    from its `kept` leaves and zeros: no copy of its caches is kept or read."""
    state = _state_from(model, prompt.shape[0], kept)
    return sampling.prefill(model, weights, state, prompt, key, temperature,
                            top_k)

  def run(weights, state, token, key, temperature, top_k, n):
    return sampling.decode(model, weights, state, token, key, temperature,
                           top_k, n, _MAX_CHUNK)

  # The kept leaves given to prefill serve the next call: not donated. run's
  # state is always the previous call's output: donate it.
  _COMPILED[model] = (jax.jit(prefill), jax.jit(run, donate_argnums=(1,)))
  return _COMPILED[model]


def _state_from(model, batch_size, kept):
  """The fresh state of `batch_size`: its `kept` leaves, zeros elsewhere."""
  treedef, zeros = _FRESH_STATES[model][batch_size][:2]
  kept = iter(kept)
  return treedef.unflatten([next(kept) if z is None else jnp.zeros(
      z.shape, z.dtype) for z in zeros])


def fresh_state(model, batch_size=1):
  """`model`'s state before any token, for `batch_size` sequences: the state
  `sampling.temperature_sample` starts from."""
  return _state_from(model, batch_size, _fresh_state(model, batch_size)[2])


def _fresh_state(model, batch_size):
  """`model`'s state before any token, for `batch_size` sequences.

  Returns (treedef, zeros, kept): its all-zero leaves (the caches, most of
  it) as ShapeDtypeStructs in `zeros`, None there for the others, which are
  `kept` as arrays. Only `kept` stays in memory between calls.
  """
  per_model = _FRESH_STATES.setdefault(model, {})
  if batch_size not in per_model:
    weights, state = model.weights, model.state
    if not getattr(model, 'has_fresh_state', lambda _: False)(batch_size):
      model.init(shapes.ShapeDtype((batch_size, 1), np.int32))  # New weights:
    _remember_fresh_state(model, batch_size)
    model.weights, model.state = weights, state  # the trained ones back.
  return per_model[batch_size]


def _remember_fresh_state(model, batch_size):
  """Files `model.state`, just initialized, as its fresh state of a batch."""
  leaves, treedef = jax.tree_util.tree_flatten(model.state)
  nonzero = [jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or  # Host:
             bool(np.any(np.asarray(x))) for x in leaves]  # no compiling.
  zeros = tuple(None if nz else jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                for x, nz in zip(leaves, nonzero))
  kept = [x for x, nz in zip(leaves, nonzero) if nz]
  _FRESH_STATES.setdefault(model, {})[batch_size] = (treedef, zeros, kept)


def _own_buffers(state, kept):
  """`state` with no buffer of `kept` and none twice: safe to donate (jit
  may hand an unchanged input back as the same array, and one array may sit
  in several places: donating those would delete a kept leaf or donate a
  buffer twice)."""
  seen = {id(x) for x in kept}

  def own(x):
    if id(x) in seen:
      return jnp.array(x, copy=True)
    return seen.add(id(x)) or x

  return jax.tree_util.tree_map(own, state)


def check_sampling_settings(temperature, top_k, seed, names=None):
  """Raises ValueError, naming the value and what works, for settings that
  would sample garbage: a temperature that is not a finite number >= 0 (NaN
  gives NUL bytes), top_k below 1, a seed outside 0..2**32-1 (jax takes 32
  bits: larger ones alias smaller). `names` maps each to its flag name."""
  name = lambda key: (names or {}).get(key, key)
  try:
    finite = np.isfinite(float(temperature))
  except (TypeError, ValueError):
    finite = False
  if not finite or float(temperature) < 0:
    raise ValueError(f'{name("temperature")}={temperature}; use a finite '
                     'number: 0 (greedy) or more, e.g. 1.0.')
  if top_k is not None and not (
      isinstance(top_k, (int, np.integer)) and top_k >= 1):
    raise ValueError(f'{name("top_k")}={top_k}; use None (all tokens) or an '
                     'integer >= 1.')
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
    raise ValueError(f'{name("seed")}={seed}; use an integer in 0..'
                     f'{2**32 - 1}.')


def max_decode_len(model):
  """The most tokens (prompt + new, per sequence) `model` decodes, or None.

  The least of our `HourglassLM`'s `max_len` and the sizes of trax's
  predict-mode position tables and attention caches (`TransformerLM`'s
  `max_len`), which clamp their write position silently: every token past
  them would be garbage.
  """
  limits, seen, todo = [], set(), [model]
  while todo:
    layer = todo.pop()
    if id(layer) in seen:
      continue
    seen.add(id(layer))
    if isinstance(getattr(layer, 'max_len', None), int):  # Ours.
      limits.append(layer.max_len)
    elif (isinstance(layer, (trax_attention.PositionalEncoding,
                             trax_attention.DotProductCausalAttention)) and
          getattr(layer, '_mode', None) == 'predict'):
      limits.append(layer._max_len)  # pylint: disable=protected-access
    todo.extend(layer.sublayers)
  return min(limits) if limits else None


def check_room(model, prompt_len, n_tokens, what=None):
  """Raises ValueError when prompt_len + n_tokens is past `max_decode_len`.

  `what` names the request (default: the arguments of `sample`).
  """
  max_len = max_decode_len(model)
  if max_len is None or prompt_len + n_tokens <= max_len:
    return
  if prompt_len >= max_len:
    raise ValueError(
        f'the prompt has {prompt_len} tokens, but the model decodes at most '
        f'{max_len} (its max_len), its continuation included; use a prompt of '
        f'at most {max_len - 1} tokens.')
  raise ValueError(
      f'{what or f"a prompt of {prompt_len} tokens + n_tokens={n_tokens}"} is '
      f"past the model's max_len={max_len}: ask for at most "
      f'{max_len - prompt_len} tokens, or use a model with max_len >= '
      f'{prompt_len + n_tokens}.')


def _prompt_batch(prompt, batch_size):
  """prompt None, (P,) or (batch, P) -> int32 (batch, P) (P may be 0)."""
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}; it must be at least 1.')
  if prompt is None:
    return np.zeros((batch_size, 0), np.int32)
  prompt = np.asarray(prompt)
  if prompt.dtype.kind not in 'iub':
    raise ValueError(f'prompt must hold integer token ids, got dtype '
                     f'{prompt.dtype}; e.g. np.frombuffer(text.encode(), '
                     'np.uint8) for byte-level models.')
  if prompt.ndim == 1:
    prompt = np.tile(prompt[None], (batch_size, 1))
  elif prompt.ndim != 2 or batch_size not in (1, prompt.shape[0]):
    raise ValueError(
        f'prompt has shape {prompt.shape}; use (length,) for the same prompt '
        f'in all {batch_size} sequences, or (batch_size, length).')
  return prompt.astype(np.int32)


def sample(model, n_tokens, prompt=None, batch_size=1, temperature=1.0,
           top_k=None, seed=0, progress=None):
  """Samples `n_tokens` new tokens after `prompt` from a predict-mode LM.

  Every call starts new sequences (from the model's state before any token);
  afterwards `model.state` is the state after them, as with trax's decoding.

  Args:
    model: a trax LM in 'predict' mode with trained weights set, e.g. from
      `load_predict_model`.
    n_tokens: how many tokens to generate (>= 1).
    prompt: int array (batch, P), or (P,) for the same prompt in every
      sequence, or None to start from nothing (the start token 0 only).
    batch_size: sequences to sample at once when `prompt` is None or 1-D; a
      2-D prompt sets it (then batch_size must be 1 or the prompt's batch).
    temperature: softmax temperature; 0 is greedy (argmax) decoding.
    top_k: if set, sample only among the `top_k` most likely tokens.
    seed: random seed: the same seed gives the same tokens.
    progress: optional callable(n_done, n_total, tokens_per_s), called about
      once a second and at the end; tokens_per_s counts new tokens of the
      whole batch per second, measured after the first compiled call.

  Returns:
    int32 array (batch, n_tokens) of the new tokens (prompt excluded).

  Raises:
    ValueError: for a bad argument, or when P + n_tokens is past the model's
      `max_len`.
  """
  n_tokens = int(n_tokens)
  if n_tokens < 1:
    raise ValueError(f'n_tokens={n_tokens}; ask for at least 1 token.')
  check_sampling_settings(temperature, top_k, seed)
  prompt = _prompt_batch(prompt, batch_size)
  batch, prompt_len = prompt.shape
  check_room(model, prompt_len, n_tokens)
  prefill, run = _compiled(model)
  weights = predict_weights.decoding_weights(model)
  # Traced arguments: other values do not recompile.
  temperature = np.float32(temperature)
  top_k = np.int32(0 if top_k is None else top_k)  # 0: all tokens.

  pace = _Pace(n_tokens, batch, progress)
  kept = _fresh_state(model, batch)[2]
  key = jax.random.PRNGKey(seed)
  if prompt_len:
    tok, state, key = prefill(weights, kept, prompt, key, temperature, top_k)
  else:  # prefill's draw (a token in, a key split) by `run`: one compile.
    _, state, tok, key = run(
        weights, _own_buffers(fresh_state(model, batch), kept),
        np.zeros((batch,), np.int32), key, temperature, top_k, 1)
  state = _own_buffers(state, kept)
  chunks = [np.asarray(tok)[:, None]]
  while pace.done < n_tokens:
    n, call_start = pace.next_chunk(), time.perf_counter()
    out, state, tok, key = run(weights, state, tok, key, temperature, top_k,
                               n)
    chunks.append(np.asarray(out)[:, :n])  # Waits for the chunk.
    pace.chunk_done(n, call_start)
  pace.finish()
  model.state = state
  return np.concatenate(chunks, axis=1)


class _Pace:
  """Chunk sizes and progress reports of one `sample` call, from its first
  token (the prefill's) on.

  The first decoding call may compile: it draws one token, the next 8, then
  each about _SECONDS_PER_CALL at the last call's speed. `progress` hears
  about once a second, but not right after the compiling call, and at the
  end; tokens/s counts from the end of the compiling call.
  """

  def __init__(self, n_tokens, batch, progress):
    self.done, self._chunk = 1, 1
    self._n_tokens, self._batch, self._progress = n_tokens, batch, progress
    self._start = self._last_report = time.perf_counter()
    self._first = None  # (time, tokens done) after the first decoding call.

  def next_chunk(self):
    return min(self._chunk, self._n_tokens - self.done)

  def chunk_done(self, n, call_start):
    self.done += n
    now = time.perf_counter()
    if self._first is None:
      self._first = (now, self.done)
      self._chunk = 8
    else:  # Next chunk: about _SECONDS_PER_CALL at this call's speed.
      per_token = (now - call_start) / n
      self._chunk = int(min(_MAX_CHUNK,
                            max(1, _SECONDS_PER_CALL / per_token)))
    if self._progress is not None and (self.done == self._n_tokens or (
        now - self._last_report >= _PROGRESS_EVERY_S and
        self.done > self._first[1])):
      self._progress(self.done, self._n_tokens, self._rate(now))
      self._last_report = now

  def finish(self):
    if self._progress is not None and self._first is None:  # 1 token.
      self._progress(self.done, self._n_tokens, self._rate(time.perf_counter()))

  def _rate(self, now):
    """New tokens per second, after the first decoding call if one was."""
    first = self._first
    if first is not None and self.done > first[1] and now > first[0]:
      return self._batch * (self.done - first[1]) / (now - first[0])
    return self._batch * self.done / max(now - self._start, 1e-9)


def complete_images(model, images, seed=0, temperature=1.0, top_k=None,
                    progress=None):
  """Keeps the top half of each image and samples the bottom half.

  Pixels are tokens in raster order with channels interleaved (see
  `trax_hourglass.data.images.flatten_images`), so the top H//2 rows are the
  prompt and the rest is sampled, all images as one batch.

  Args:
    model: predict-mode image model (vocab 256), max_len >= H*W*C.
    images: uint8 (n, H, W, C).
    seed, temperature, top_k, progress: as in `sample`.

  Returns:
    uint8 (n, H, W, C): the top halves of `images` with sampled bottoms.
  """
  images = np.asarray(images)
  tokens = image_data.flatten_images(images)  # Checks uint8 (n, H, W, C).
  n, height, width, channels = images.shape
  kept = (height // 2) * width * channels
  if kept == 0:
    raise ValueError(f'images of height {height} have no top half to keep; '
                     'use images at least 2 pixels high.')
  new = sample(model, tokens.shape[1] - kept, prompt=tokens[:, :kept],
               batch_size=n, temperature=temperature, top_k=top_k, seed=seed,
               progress=progress)
  return image_data.unflatten_images(
      np.concatenate([tokens[:, :kept], new], axis=1), height, width, channels)


def load_predict_model(checkpoint_or_weights, model_fn=None, config_file=None,
                       max_len=2048, batch_size=1, original=False,
                       config=None, **model_kwargs):
  """Builds a predict-mode model and loads trained weights into it
  (`runs.load_run` in predict mode, ready for `sample`).

  Args:
    checkpoint_or_weights: a training output dir (its committed `model`
      checkpoint, read crash-safely), a `*.pkl.gz` checkpoint file, or weights
      (`train_model.weights`, or a flat list of arrays).
    model_fn: the model function, e.g. `HourglassLM` (default: `train.model`
      of the gin config, else `HourglassLM`); called with `mode='predict'`
      and `model_kwargs`.
    config_file: gin config(s) of the run; default `config.gin` beside the
      checkpoint (the trainer writes it there), unless `model_fn` is given.
      Parsing replaces gin's global config.
    max_len: longest sequence (prompt + new tokens) of our HourglassLM, the
      size of its caches. Other models keep their configured max_len (for
      trax's TransformerLM it sizes weights).
    batch_size: sequences per call (`sample` adapts it when asked for others).
    original: the checkpoint was written by trax's own HourglassLM (e.g. a
      released one); give the architecture with `config_file` (one of our
      gin configs, e.g. gin/cifar10_hourglass.gin) or `model_kwargs`.
    config: a `runs.RunConfig` already read: then no config is parsed.
    **model_kwargs: arguments for `model_fn`, over the config's.

  Returns:
    The model in 'predict' mode with the weights, for (batch_size, 1) inputs.
  """
  model = runs.load_run(
      checkpoint_or_weights, 'predict', config_file, model_fn=model_fn,
      config=config, max_len=max_len, batch_size=batch_size,
      original=original, **model_kwargs).model
  _remember_fresh_state(model, batch_size)  # Before any token.
  return model
