"""The models the benchmarks compare, their data, and what they cost.

Model names understood by `make_model`:
  ours          -- `trax_hourglass.HourglassLM` (this repository),
  original      -- `trax.models.research.hourglass.HourglassLM` (trax 1.4.1),
  transformer6  -- `trax.models.TransformerLM`, 6 layers, same width,
  transformer12 -- `trax.models.TransformerLM`, 12 layers, same width.
and ablations, never run by default, each `ours` but for one thing:
  ours_tl_dense -- built inside `trax_hourglass.layers.dense.jax_backward()`:
                   its Dense layers take jax's derived backward pass, as
                   `tl.Dense`,
  ours_bfloat16 -- dtype='bfloat16' (the config's dtype is ignored),
  ours_remat    -- remat='blocks' (the config's remat is ignored).

Workers import trax (and build these); parents only parse hierarchies
(`parse_hierarchy`, without importing trax).
"""

import importlib.util
import os
import sys

from harness import workers

ALL_MODELS = ('ours', 'original', 'transformer6', 'transformer12')
ABLATION_MODELS = ('ours_tl_dense', 'ours_bfloat16', 'ours_remat')
BASELINES = ('original', 'transformer6')


def never(step):
  """For `training.Loop`'s checkpoint_at / eval_at: benchmarks save nothing."""
  del step
  return False


def make_model(name, cfg, mode='train'):
  """Uninitialized model `name` (in `mode`) of benchmark config `cfg`.

  `cfg`: vocab_size, d_model, d_ff, n_heads, dropout, seq_len, and for the
  Hourglass models vanilla_layers and hierarchy; optionally max_len (`ours`'
  predict-mode cache, the Transformers' positions; default max(2048, seq_len)),
  and `ours`' dtype and remat (default float32, none).
  """
  import trax  # pylint: disable=g-import-not-at-top
  width = dict(d_model=cfg['d_model'], d_ff=cfg['d_ff'],
               n_heads=cfg['n_heads'], dropout=cfg['dropout'], mode=mode)
  max_len = cfg.get('max_len') or max(2048, cfg['seq_len'])
  if name == 'ours_tl_dense':  # `ours`, every Dense differentiated as tl's.
    from trax_hourglass.layers import dense  # pylint: disable=g-import-not-at-top
    with dense.jax_backward():
      return make_model('ours', cfg, mode)
  if name in ('ours_bfloat16', 'ours_remat'):
    setting = ({'dtype': 'bfloat16'} if name == 'ours_bfloat16'
               else {'remat': 'blocks'})
    return make_model('ours', dict(cfg, **setting), mode)
  if name in ('ours', 'original'):
    if name == 'ours':
      from trax_hourglass import HourglassLM  # pylint: disable=g-import-not-at-top
      if mode == 'predict':
        width['max_len'] = max_len
      width.update(dtype=cfg.get('dtype', 'float32'),
                   remat=cfg.get('remat', 'none'))
    else:
      from trax.models.research.hourglass import HourglassLM  # pylint: disable=g-import-not-at-top
    return HourglassLM(cfg['vocab_size'],
                       vanilla_layers=tuple(cfg['vanilla_layers']),
                       hierarchy=cfg['hierarchy'], **width)
  if name in ('transformer6', 'transformer12'):
    n_layers = int(name[len('transformer'):])
    # Positional embeddings must cover the sequence; 2048 is trax's default.
    return trax.models.TransformerLM(cfg['vocab_size'], n_layers=n_layers,
                                     max_len=max_len,
                                     **width)
  raise ValueError(f'Unknown model {name!r}; expected one of '
                   f'{ALL_MODELS + ABLATION_MODELS}.')


def random_lm_batches(vocab_size, batch, seq_len, n_distinct=4,
                      seed=workers.SEED):
  """Endless (inputs, targets, weights) LM batches of random tokens, in memory.

  A few batches are generated up front and cycled, so the data pipeline costs
  nothing inside the timed region.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(n_distinct):
    tokens = rng.integers(1, vocab_size, size=(batch, seq_len), dtype=np.int32)
    weights = np.ones((batch, seq_len), dtype=np.float32)
    batches.append((tokens, tokens, weights))  # LM: the model shifts right.
  while True:
    yield from batches


def count_params(weights):
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(getattr(w, 'size', 0) for w in jax.tree_util.tree_leaves(weights)))


def train_step_flops(model, batch, weights=None, state=None):
  """XLA's FLOP count of one forward + backward pass of an LM and its loss.

  `model` maps tokens [batch, length] to logits; of `batch` (inputs, targets,
  weights) only shapes and dtypes are used. Lowers (does not compile: at long
  lengths that costs minutes) `jax.value_and_grad` of `model.pure_fn` and a
  masked cross-entropy; returns XLA's `HloCostAnalysis` FLOPs (matmuls as
  2*M*N*K, elementwise ops one per element; no optimizer update), or None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  weights = model.weights if weights is None else weights
  state = model.state if state is None else state

  def loss(w, s, inputs, targets, mask, rng):
    logits, _ = model.pure_fn(inputs, w, s, rng)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)

  spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype)
  lowered = jax.jit(jax.value_and_grad(loss)).lower(
      weights, state, *[spec(a) for a in batch],
      jax.random.PRNGKey(workers.SEED))
  flops = (lowered.cost_analysis() or {}).get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def max_shorten_factor(hierarchy):
  """Total shortening of a hierarchy like '2@1 8@3 2@1'; None if it does not
  parse (the model constructor then judges it)."""
  try:
    return parse_hierarchy(hierarchy).total_factor
  except ValueError:
    return None


def check_lengths(lengths, hierarchy, flag='--seq_lens'):
  """SystemExit naming the first length the Hourglass models cannot take."""
  factor = max_shorten_factor(hierarchy) or 1
  for length in lengths:
    if length < 1 or length % factor:
      raise SystemExit(
          f'{flag}: sequence length {length} must be a positive multiple of '
          f'{factor}, the shortening factor of hierarchy {hierarchy!r} '
          f'(e.g. {factor * 256}, {factor * 512}).')


def parse_hierarchy(hierarchy, vanilla_layers=(1, 1)):
  """`trax_hourglass.hierarchy.parse_hierarchy`, without importing trax.

  Parents never import trax, which the package's `__init__` does: the module,
  plain Python, is loaded on its own.
  """
  module = (sys.modules.get('trax_hourglass.hierarchy') or
            sys.modules.get('_trax_hourglass_hierarchy'))
  if module is None:
    spec = importlib.util.spec_from_file_location(
        '_trax_hourglass_hierarchy',
        os.path.join(workers.REPO_ROOT, 'trax_hourglass', 'hierarchy.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # For dataclasses, as an import would.
    spec.loader.exec_module(module)
  return module.parse_hierarchy(hierarchy, vanilla_layers)
