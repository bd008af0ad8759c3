"""The variants equal_time.py trains: their names, hierarchies and legends.

A variant is the default hourglass (`hourglass`) with one thing changed, or a
baseline. `variant_hierarchy` says which hierarchy it trains with, `factors`
at which shorten factors it is scored, `describe` how it differs (the
table's legend); `equal_time_lib.models.model_fn` builds it.
"""

import harness
import boundaries

SHORTENING = {'avg': 'AveragePooling', 'linear': 'LinearPooling',
              'attn': 'AttentionResampling'}
UPSAMPLING = {'repeat': 'NaiveUpsampling', 'linear': 'LinearUpsampling',
              'attn': 'AttentionResampling'}
RESAMPLING = tuple(f'{s}_{u}' for s in SHORTENING for u in UPSAMPLING
                   if (s, u) != ('attn', 'attn'))  # attn_attn is `hourglass`.
FIXED = ('fixed2', 'fixed3')  # sfd's model at one shorten factor, no dropout.
SWAPS = ('rotary', 'softmax', 'lsh', 'performer', 'sparse_qkv', 'sparse_ff',
         'sfd')
# Run in place of 'lsh' when the PureLSHSelfAttentionWrapper worker fails.
LSH_FALLBACK = 'lsh_fallback'


def parsed(hierarchy):
  """`hierarchy` parsed (`trax_hourglass.hierarchy`), or SystemExit."""
  try:
    return harness.parse_hierarchy(hierarchy)
  except ValueError as e:
    raise SystemExit(f'--hierarchy: {e}') from None


def factors(variant, cfg):
  """(factor scored at, other factors also scored at) of the shorten-factor
  dropout family (sfd, fixedK): the dropout's factors 2 and the hierarchy's;
  (None, ()) for other variants."""
  if variant not in ('sfd',) + FIXED:
    return None, ()
  own = parsed(variant_hierarchy(variant, cfg)).total_factor
  both = {2, single_level(cfg['hierarchy'], variant).total_factor}
  return own, tuple(sorted(both - {own}))


def single_level(hierarchy, why):
  """The one shortened `Level` of `hierarchy`, or SystemExit."""
  levels = parsed(hierarchy).levels
  if len(levels) != 1:
    raise SystemExit(f'{why} needs --hierarchy with exactly one shortened '
                     f"level (e.g. '2@1 4@3 2@1'), got {hierarchy!r}.")
  return levels[0]


def with_factor(hierarchy, factor, why):
  """`hierarchy` with its one shortened level's factor replaced, '2@1 4@2 2@1'."""
  n_layers = single_level(hierarchy, why).n_layers
  pre, post = parsed(hierarchy).vanilla_layers
  return f'{pre}@1 {n_layers}@{factor} {post}@1'


def n_layers(hierarchy):
  """Layers of a hierarchy: '2@1 4@3 2@1' has 8 (outer levels count twice)."""
  spec = parsed(hierarchy)
  return sum(spec.vanilla_layers) + sum(
      level.n_layers * (1 if i == len(spec.levels) - 1 else 2)
      for i, level in enumerate(spec.levels))


def variant_hierarchy(variant, cfg):
  """The hierarchy string `variant` trains with (None: not an hourglass)."""
  if variant.startswith('transformer'):
    return None
  if variant == 'vanilla':
    return f'{n_layers(cfg["hierarchy"])}@1'
  if variant == 'same_params':  # Its depth is chosen in the worker.
    return cfg.get('flat_layers') and f'{cfg["flat_layers"]}@1'
  if variant in ('factor2', 'factor4') + FIXED:
    return with_factor(cfg['hierarchy'], int(variant[-1]), variant)
  if variant in boundaries.KINDS:
    return with_factor(cfg['hierarchy'], boundaries.factor(variant, cfg),
                       variant)
  return cfg['hierarchy']


_BOTH = 'vanilla_attn_type = middle_attn_type = '
# The attention swaps but lsh: the attention in every layer (their legends).
_ATTENTION = {
    'rotary': _BOTH + '@trax_hourglass.RotaryCausalAttention',
    'softmax': (_BOTH + '@trax.layers.CausalAttention (+ absolute positions at '
                'the embedding)'),
    'performer': (_BOTH + '@trax.layers.CausalFavor (+ absolute positions at '
                  'the embedding)'),
    'no_shift': ("the shortening reads the unshifted vectors, not "
                 "CausalShift's (not causal: shortened vector i sees its "
                 'whole block)'),
}


def describe(variant, cfg):
  """How `variant` differs from the default hourglass (the table's legend)."""
  if variant in _ATTENTION:
    return _ATTENTION[variant]
  if variant == 'hourglass':
    return (f'HourglassLM hierarchy {cfg["hierarchy"]!r}, relative attention, '
            'attention pooling and upsampling (the defaults)')
  if variant == 'vanilla':
    return (f'the same relative-attention blocks, no shortening: hierarchy '
            f'{variant_hierarchy(variant, cfg)!r}')
  if variant.startswith('transformer'):
    return (f'trax.models.TransformerLM, n_layers {variant[len("transformer"):]}'
            ', same d_model/d_ff/n_heads/dropout, max_len = seq_len')
  if variant in RESAMPLING:
    shorten, up = variant.split('_')
    return (f'downsampling_fn = @trax_hourglass.{SHORTENING[shorten]}, '
            f'upsampling_fn = @trax_hourglass.{UPSAMPLING[up]}')
  if variant in ('factor2', 'factor4'):
    return f'hierarchy {variant_hierarchy(variant, cfg)!r}'
  if variant in boundaries.KINDS:
    return (f'hierarchy {variant_hierarchy(variant, cfg)!r}, ' + (
        'downsampling_fn = @trax_hourglass.AveragePooling, upsampling_fn = '
        '@trax_hourglass.NaiveUpsampling' if variant == 'fixed' else
        f"boundaries = '{variant}' (k: the target segment length)" + (
            ', sentencepiece_model = a unigram model trained on the start of '
            'the training split' if variant == 'unigram' else '')))
  if variant == 'same_params':
    return ('the same relative-attention blocks, no shortening, as many as '
            "make its parameter count nearest the hourglass's: hierarchy "
            f'{variant_hierarchy(variant, cfg) or "N@1"!r}')
  return _describe_configured(variant, cfg)


def _describe_configured(variant, cfg):
  """The legends that name settings of `cfg` (sizes, factors)."""
  if variant in FIXED:
    factor, others = factors(variant, cfg)
    return (f'hierarchy {variant_hierarchy(variant, cfg)!r}, '
            'attention_upsampling_fn = @trax_hourglass.NaiveUpsampling (sfd '
            f'without the dropout); scored at factor {factor}, and at '
            + ', '.join(f'{f} as {variant}@{f}' for f in others)
            + ' with the same weights')
  if variant == 'lsh':
    return (_BOTH + '@trax.layers.PureLSHSelfAttentionWrapper; '
            'PureLSHSelfAttentionWrapper.pure_lsh_implementation = '
            '@PureLSHSelfAttention, .rotary_position_emb = True, .bias = True, '
            ".num_weights = 2, .weights_format = 'model'; PureLSHSelfAttention."
            f'chunk_len = {cfg["lsh_chunk_len"]}, .n_hashes = 2, '
            '.n_buckets = None, .n_chunks_before = 1, .n_chunks_after = 0')
  if variant == LSH_FALLBACK:
    return (_BOTH + '@trax.layers.LSHSelfAttention; LSHSelfAttention.chunk_len '
            f'= {cfg["lsh_chunk_len"]}, .n_hashes = 2, .n_chunks_before = 1, '
            '.n_chunks_after = 0 (+ absolute positions at the embedding)')
  if variant == 'sparse_qkv':
    return (_BOTH + '@trax.layers.MultiplicativeConvCausalAttention; '
            f'MultiplicativeConvCausalAttention.sparsity = {cfg["n_heads"]}, '
            '.length_kernel_size = 3')
  if variant == 'sparse_ff':
    return (f'ff_sparsity = {cfg["ff_sparsity"]}, loss_sparsity = '
            f'{cfg["loss_sparsity"]}')
  if variant == 'sfd':
    factor = single_level(cfg['hierarchy'], 'sfd').total_factor
    return (f'shorten_factor_dropout = (2, {factor}), attention_upsampling_fn '
            '= @trax_hourglass.NaiveUpsampling; scored at factor '
            f'{factor}, and as sfd@2 with the same weights in hierarchy '
            f'{with_factor(cfg["hierarchy"], 2, "sfd")!r}')
  raise ValueError(f'Unknown variant {variant!r}')
