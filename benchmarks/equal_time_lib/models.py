"""The variants' models, built in the workers (these import trax).

`model_fn(variant, cfg)` returns `mode -> model` for the training loop and the
evaluators alike; `same_params_depth` sizes the flat model of the params suite.
"""

import functools

import harness
import boundaries
from equal_time_lib import variants
from equal_time_lib.variants import FIXED
from equal_time_lib.variants import LSH_FALLBACK
from equal_time_lib.variants import RESAMPLING
from equal_time_lib.variants import SHORTENING
from equal_time_lib.variants import UPSAMPLING


def model_fn(variant, cfg):
  """mode -> uninitialized model of `variant` (imports trax: workers only)."""
  import trax  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.layers.research import sparsity  # pylint: disable=g-import-not-at-top
  import trax_hourglass  # pylint: disable=g-import-not-at-top
  from trax_hourglass import layers as L  # pylint: disable=g-import-not-at-top
  width = dict(vocab_size=cfg['vocab_size'], d_model=cfg['d_model'],
               d_ff=cfg['d_ff'], n_heads=cfg['n_heads'],
               dropout=cfg['dropout'],
               # Only the positions used: absolute position tables (trax's
               # Transformer, softmax, performer, sparse_qkv, plain LSH) are
               # seq_len x d_model, counted in params.
               max_len=cfg['seq_len'])
  if variant.startswith('transformer'):
    return functools.partial(trax.models.TransformerLM,
                             n_layers=int(variant[len('transformer'):]),
                             **width)
  kwargs = dict(width, hierarchy=variants.variant_hierarchy(variant, cfg))
  attention = {
      'rotary': L.RotaryCausalAttention,
      'softmax': tl.CausalAttention,
      'lsh': functools.partial(
          tl.PureLSHSelfAttentionWrapper,
          pure_lsh_implementation=tl.PureLSHSelfAttention,
          rotary_position_emb=True, bias=True, num_weights=2,
          weights_format='model', chunk_len=cfg['lsh_chunk_len'], n_hashes=2,
          n_buckets=None, n_chunks_before=1, n_chunks_after=0),
      LSH_FALLBACK: functools.partial(
          tl.LSHSelfAttention, chunk_len=cfg['lsh_chunk_len'], n_hashes=2,
          n_buckets=None, n_chunks_before=1, n_chunks_after=0),
      'performer': tl.CausalFavor,
      'sparse_qkv': functools.partial(
          sparsity.MultiplicativeConvCausalAttention,
          sparsity=cfg['n_heads'], length_kernel_size=3),
  }.get(variant)
  if attention is not None:
    kwargs.update(vanilla_attn_type=attention, middle_attn_type=attention)
  if variant in RESAMPLING:
    shorten, up = variant.split('_')
    kwargs.update(downsampling_fn=getattr(L, SHORTENING[shorten]),
                  upsampling_fn=getattr(L, UPSAMPLING[up]))
  if variant in boundaries.KINDS:
    kwargs.update(boundaries.model_kwargs(variant, cfg))
  if variant == 'sparse_ff':
    kwargs.update(ff_sparsity=cfg['ff_sparsity'],
                  loss_sparsity=cfg['loss_sparsity'])
  if variant in ('sfd',) + FIXED:
    kwargs.update(attention_upsampling_fn=L.NaiveUpsampling)
  if variant == 'sfd':
    factor = variants.single_level(cfg['hierarchy'], 'sfd').total_factor
    kwargs.update(shorten_factor_dropout=(2, factor))
  if variant == 'no_shift':
    kwargs.update(downsampling_fn=_UnshiftedShortening)
  return functools.partial(trax_hourglass.HourglassLM, **kwargs)


def _UnshiftedShortening(  # pylint: disable=invalid-name
    shorten_factor, max_inference_length=2048, ff_sparsity=0, **kwargs):
  """no_shift's shortening: the default one, of the level's unshifted vectors.

  A level shortens (shifted, vecs), its input shifted right by k-1 and itself;
  this drops the shifted copy, so shortened vector i sees its whole block.
  """
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax_hourglass import layers as L  # pylint: disable=g-import-not-at-top
  return [tl.Drop(), tl.Dup(),  # vecs, vecs
          L.AttentionResampling(  # short: (batch, len/k, d_model), vecs
              shorten_factor, max_inference_length=max_inference_length,
              ff_sparsity=ff_sparsity, **kwargs)]


def same_params_depth(cfg):
  """(N, hourglass params): the flat 'N@1' with the nearest parameter count."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top

  def count(hierarchy):
    model = model_fn('hourglass', dict(cfg, hierarchy=hierarchy))(mode='eval')
    model.init(shapes.ShapeDtype((1, 6), np.int32))
    return harness.count_params(model.weights)

  # Parameters grow by the same block per flat layer.
  target, one, two = count(cfg['hierarchy']), count('1@1'), count('2@1')
  return max(1, round(1 + (target - one) / (two - one))), target

