"""Sampling from predict-mode language models: text, image completion, grids.

    model = load_predict_model('~/runs/hg_enwik8')        # training output dir
    tokens = sample(model, 200, prompt=np.frombuffer(b'The ', np.uint8)[None],
                    temperature=0.8, top_k=40)            # (1, 200) int32

`sample` runs the whole decoding loop on the device: the prompt goes through
the model in one call, then each compiled call generates a chunk of tokens in
a `lax.fori_loop` (model step and sampling fused, the state's buffers donated),
so Python runs once per chunk, not once per token. Chunks grow to about a
quarter second each, so `progress` can be told about once a second; the
random key is split per token, so the tokens for a seed do not depend on the
chunking. Compiled steps are kept per model: sampling again is immediate.

Works on any trax predict-mode LM that follows trax's decoding convention
(`HourglassLM(mode='predict')`, `trax.models.TransformerLM(mode='predict')`):
each call takes the previous tokens (0 first) and returns the logits of the
next ones.
"""

import os
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from trax import shapes
# The classes themselves: trax.layers' names are gin's wrappers of them.
from trax.layers import attention as trax_attention

from trax_hourglass import checkpoints
from trax_hourglass import runs
from trax_hourglass.data import images as image_data
from trax_hourglass.layers import attention_types
from trax_hourglass.layers import predict_weights
from trax_hourglass.models.hourglass import HourglassLM

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


def _choose(logits, key, temperature, top_k):
  """logits (batch, vocab) -> tokens (batch,) int32.

  temperature 0 is argmax; top_k in 1..vocab keeps the k largest logits (0:
  all). Both are traced: other values do not recompile.
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


def _compiled(model):
  """(prefill, run), `model`'s decoding steps, jitted once per model."""
  if model in _COMPILED:
    return _COMPILED[model]
  # Predict mode has no dropout: the model's own rng is a constant.
  model_rng = jax.random.PRNGKey(0)

  def prefill(weights, kept, toks, key, temperature, top_k):
    """toks (batch, P+1), 0 first -> (next token (batch,), state, key).

    Starts from the fresh state of this batch size: its `kept` leaves, and
    its zero leaves (the caches) made here: no copy of them is kept or read.
    """
    treedef, zeros = _FRESH_STATES[model][toks.shape[0]][:2]
    kept = iter(kept)
    state = treedef.unflatten([next(kept) if z is None else jnp.zeros(
        z.shape, z.dtype) for z in zeros])
    logits, state = model.pure_fn(toks, weights, state, model_rng)
    key, sub = jax.random.split(key)
    return _choose(logits[:, -1], sub, temperature, top_k), state, key

  def run(weights, state, tok, key, temperature, top_k, n):
    """Feeds tok (batch,), then n-1 sampled ones; out[:, :n] the n samples."""
    def body(i, carry):
      state, tok, key, out = carry
      logits, state = model.pure_fn(tok[:, None], weights, state, model_rng)
      key, sub = jax.random.split(key)
      tok = _choose(logits[:, -1], sub, temperature, top_k)
      out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
      return state, tok, key, out

    out = jnp.zeros((tok.shape[0], _MAX_CHUNK), jnp.int32)
    state, tok, key, out = jax.lax.fori_loop(0, n, body,
                                             (state, tok, key, out))
    return out, state, tok, key

  # The kept leaves given to prefill serve the next call: not donated. run's
  # state is always the previous call's output: donate it.
  _COMPILED[model] = (jax.jit(prefill), jax.jit(run, donate_argnums=(1,)))
  return _COMPILED[model]


def _fresh_state(model, batch_size):
  """`model`'s state before any token, for `batch_size` sequences.

  Returns (treedef, zeros, kept): its all-zero leaves (the caches, most of
  it) as ShapeDtypeStructs in `zeros`, None there for the others, which are
  `kept` as arrays. Only `kept` stays in memory between calls.
  """
  per_model = _FRESH_STATES.setdefault(model, {})
  if batch_size not in per_model:
    # init draws new weights as well: keep the trained ones.
    weights = model.weights
    model.init(shapes.ShapeDtype((batch_size, 1), np.int32))
    model.weights = weights
    _remember_fresh_state(model, batch_size)
  return per_model[batch_size]


def _remember_fresh_state(model, batch_size):
  """Files `model.state`, just initialized, as its fresh state of a batch."""
  leaves, treedef = jax.tree_util.tree_flatten(model.state)
  nonzero = jax.device_get([
      True if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else
      jnp.any(x != 0) for x in leaves])
  zeros = tuple(None if nz else jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                for x, nz in zip(leaves, nonzero))
  kept = [x for x, nz in zip(leaves, nonzero) if nz]
  _FRESH_STATES.setdefault(model, {})[batch_size] = (treedef, zeros, kept)


def _own_buffers(state, kept):
  """`state` with no buffer of `kept` and none twice: safe to donate.

  jit may hand an input that comes out unchanged back as the same array,
  and one array may sit in several places; donating those would delete a
  kept leaf or donate a buffer twice.
  """
  seen = {id(x) for x in kept}

  def own(x):
    if id(x) in seen:
      return jnp.array(x, copy=True)
    seen.add(id(x))
    return x

  return jax.tree_util.tree_map(own, state)


def check_sampling_settings(temperature, top_k, seed, names=None):
  """Raises ValueError, naming the value and what works, for settings that
  would sample garbage: a temperature that is not a finite number >= 0 (NaN
  gives NUL bytes), top_k below 1, a seed outside 0..2**32-1 (jax takes 32
  bits: larger ones alias smaller). `names` maps each to its flag name."""
  names = names or {}
  name = lambda key: names.get(key, key)
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

  start = time.perf_counter()
  toks = np.concatenate([np.zeros((batch, 1), np.int32), prompt], axis=1)
  kept = _fresh_state(model, batch)[2]
  tok, state, key = prefill(weights, kept, toks, jax.random.PRNGKey(seed),
                            temperature, top_k)
  state = _own_buffers(state, kept)
  chunks = [np.asarray(tok)[:, None]]
  done, chunk = 1, 1
  first = None  # (time, tokens done) after the first (compiling) run call.
  last_report = start
  while done < n_tokens:
    n = min(chunk, n_tokens - done)
    call_start = time.perf_counter()
    out, state, tok, key = run(weights, state, tok, key, temperature, top_k,
                               n)
    chunks.append(np.asarray(out)[:, :n])  # Waits for the chunk.
    done += n
    now = time.perf_counter()
    if first is None:
      first = (now, done)
      chunk = 8
    else:  # Next chunk: about _SECONDS_PER_CALL at this call's speed.
      per_token = (now - call_start) / n
      chunk = int(min(_MAX_CHUNK, max(1, _SECONDS_PER_CALL / per_token)))
    # Not right after the first call: its time is mostly compilation.
    if progress is not None and (done == n_tokens or (
        now - last_report >= _PROGRESS_EVERY_S and done > first[1])):
      progress(done, n_tokens, _rate(batch, start, first, now, done))
      last_report = now
  if progress is not None and first is None:  # n_tokens == 1.
    progress(done, n_tokens, _rate(batch, start, first,
                                   time.perf_counter(), done))
  model.state = state
  return np.concatenate(chunks, axis=1)


def _rate(batch, start, first, now, done):
  """New tokens per second, after the first compiled call when there is one."""
  if first is not None and done > first[1] and now > first[0]:
    return batch * (done - first[1]) / (now - first[0])
  return batch * done / max(now - start, 1e-9)


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


def image_grid(originals, completions, border=2, fill=255):
  """A grid image: originals in the top row, completions in rows below.

  Args:
    originals: uint8 (n, H, W, C).
    completions: uint8 (n, H, W, C), or (k, n, H, W, C) for k rows of them.
    border: pixels between and around the images.
    fill: value of the border pixels (255: white).

  Returns:
    uint8 (rows*H + (rows+1)*border, n*W + (n+1)*border, C), rows = 1 + k.
  """
  originals = np.asarray(originals)
  completions = np.asarray(completions)
  if completions.ndim == originals.ndim:
    completions = completions[None]
  if originals.ndim != 4 or completions.shape[1:] != originals.shape:
    raise ValueError(
        f'originals {originals.shape} and completions {completions.shape} '
        'must be (n, H, W, C) and (n, H, W, C) or (k, n, H, W, C).')
  rows = [originals] + list(completions)
  n, height, width, channels = originals.shape
  grid = np.full((len(rows) * (height + border) + border,
                  n * (width + border) + border, channels), fill, np.uint8)
  for r, row in enumerate(rows):
    for c, image in enumerate(row):
      y, x = border + r * (height + border), border + c * (width + border)
      grid[y:y + height, x:x + width] = image
  return grid


def save_png(array, path):
  """Writes uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as a PNG file.

  Uses PIL when installed, else TensorFlow's encoder; creates the folder.

  Returns:
    The path written (user-expanded).
  """
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
      array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
    raise ValueError(f'save_png needs uint8 (H, W) or (H, W, 1|3|4), got '
                     f'{array.dtype} {array.shape}.')
  path = os.path.expanduser(os.fspath(path))
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:  # TensorFlow is a dependency: always there.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if array.ndim == 2:
      array = array[..., None]
    tf.io.write_file(path, tf.io.encode_png(array))
    return path
  Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1
                  else array).save(path, format='PNG')
  return path


# ---------------------------------------------------------------------------
# Loading a predict-mode model.
# ---------------------------------------------------------------------------


def _is_our_hourglass(model_fn):
  model_fn, _ = attention_types.unwrap_partial(model_fn)
  if model_fn is HourglassLM:
    return True
  wrapped = getattr(model_fn, '__wrapped__', None)  # gin's scoped function.
  return wrapped is not None and _is_our_hourglass(wrapped)


def load_predict_model(checkpoint_or_weights, model_fn=None, config_file=None,
                       max_len=2048, batch_size=1, original=False,
                       **model_kwargs):
  """Builds a predict-mode model and loads trained weights into it.

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
    **model_kwargs: arguments for `model_fn`, over the config's.

  Returns:
    The model in 'predict' mode with the weights, for (batch_size, 1) inputs.
  """
  source = checkpoint_or_weights
  path = None
  if isinstance(source, (str, os.PathLike)):
    path = os.path.expanduser(os.fspath(source))
    if not os.path.exists(path):
      raise FileNotFoundError(f'checkpoint {path} does not exist; pass a '
                              'training output_dir or a model.pkl.gz file.')
    if (config_file is None and model_fn is None and not original and
        os.path.exists(runs.run_config(path))):
      config_file = runs.run_config(path)
  configs = ([config_file] if isinstance(config_file, (str, os.PathLike))
             else list(config_file or []))
  configs = [os.path.expanduser(os.fspath(c)) for c in configs]
  if model_fn is None:
    model_fn = runs.parse_run_config(configs) if configs else HourglassLM
  elif configs:
    runs.parse_run_config(configs)  # Its bindings apply to model_fn.
  # Read the weights first: a missing checkpoint fails before any building.
  if path is None:
    weights, where = source, 'the given weights'
  else:
    ckpt = checkpoints.read_checkpoint_at(path)
    weights = [np.asarray(w) for w in checkpoints.from_bits(
        ckpt.flat_weights)]
    where = f'{path} (step {ckpt.step})'
  # A diverged run's weights would sample garbage (NUL bytes) silently.
  checkpoints.check_finite(jax.tree_util.tree_leaves(weights), where)

  kwargs = dict(model_kwargs, mode='predict')
  if _is_our_hourglass(model_fn):
    kwargs['max_len'] = max_len
  try:
    model = model_fn(**kwargs)
  except TypeError as e:  # E.g. no vocab_size: no config and no kwargs.
    raise ValueError(
        f'cannot build the model ({e}); pass the run\'s gin config '
        '(config_file) or the model arguments, e.g. vocab_size=256.') from e
  model.init(shapes.ShapeDtype((batch_size, 1), np.int32))
  _remember_fresh_state(model, batch_size)
  try:
    checkpoints.load_trax_hourglass_weights(model, weights)
  except ValueError as e:
    built = (f'config {", ".join(configs)}' if configs else
             f'arguments {model_kwargs}')
    raise ValueError(f'the weights of {where} do not fit the model built from '
                     f'{built}: {e}') from e
  return model
