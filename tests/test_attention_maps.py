"""attention_maps: one record per attention layer, the weights the model uses.

Tiny eval-mode models, one run each (eager: a few seconds): the records'
names, kinds and factors in data-flow order for flat and nested hierarchies
and each resampling type; rows summing to 1 and zero exactly where the
layer's causal mask hides a key; and every layer's own output rebuilt from
the returned weights and the values it received.
"""

import numpy as np
import pytest
from trax import shapes

import trax_hourglass as th
from trax_hourglass.layers import resampling
from trax_hourglass.layers.attention import RelativeDotProductAttention
from trax_hourglass.layers.rotary import RotaryCausalAttention

import benchmark_scripts  # pylint: disable=g-bad-import-order

VOCAB, D_MODEL, HEADS = 16, 16, 2
ATTN = resampling.AttentionResampling


def _model(hierarchy, down=ATTN, up=ATTN, mode='eval', **kwargs):
  return th.HourglassLM(VOCAB, d_model=D_MODEL, d_ff=16, n_heads=HEADS,
                        hierarchy=hierarchy, downsampling_fn=down,
                        upsampling_fn=up, mode=mode, **kwargs)


def _tokens(length=12):
  return np.random.RandomState(0).randint(VOCAB, size=(2, length))


def _visible(n_queries, n_keys):
  """Which keys each query sees, from the lengths (hand-written, per level).

  Same level: keys up to the query. Shortening (keys f times as many): query
  i summarises key block i, keys < f*(i+1). Upsampling (queries f times as
  many): query i sees the shortened keys that end at or before it, <= i//f.
  """
  q, k = np.arange(n_queries)[:, None], np.arange(n_keys)[None, :]
  if n_keys > n_queries:
    return k < (n_keys // n_queries) * (q + 1)
  return k <= q // (n_queries // n_keys)


def _maps(model, tokens=None):
  """attention_maps of `model`, checked against what each layer computed.

  Each attention layer's values and output are captured as it runs (in call
  order): its output must be the returned weights times its values, so the
  weights are the ones it used, in the order the layers ran. Rows sum to 1,
  and weights are zero exactly on the keys `_visible` hides.
  """
  tokens = _tokens() if tokens is None else tokens
  model.init(shapes.signature(tokens))
  ran = []  # (values, output) per attention call, in call order.

  def capture(layer):
    forward = layer.forward

    def capturing(inputs):
      output = forward(inputs)
      ran.append((np.asarray(inputs[5]), np.asarray(output)))
      return output
    object.__setattr__(layer, 'forward', capturing)

  def walk(layer):
    if isinstance(layer, RelativeDotProductAttention):
      capture(layer)
    for sublayer in layer.sublayers:
      walk(sublayer)

  walk(model)
  maps = th.attention_maps(model, tokens)
  assert len(ran) == len(maps)
  for record, (values, output) in zip(maps, ran):
    w = record.weights
    assert w.dtype == np.float32 and w.shape[:2] == (2, HEADS), record.name
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5, err_msg=record.name)
    visible = _visible(*w.shape[2:])
    assert np.all(w[..., ~visible] == 0.0), record.name
    assert np.all(w[..., visible] > 0.0), record.name
    batch, n_keys, d_model = values.shape
    v = values.reshape(batch, n_keys, HEADS, -1).transpose(0, 2, 1, 3)
    rebuilt = np.einsum('bnij,bnjd->bnid', w, v)
    rebuilt = rebuilt.transpose(0, 2, 1, 3).reshape(batch, -1, d_model)
    np.testing.assert_allclose(rebuilt, output, atol=1e-5, err_msg=record.name)
  return maps


def _layout(maps):
  return [(r.name, r.kind, r.shorten_factor, r.weights.shape[2:])
          for r in maps]


def test_one_level_attention_resampling():
  assert _layout(_maps(_model('2@1 1@3 2@1'))) == [
      ('pre/0', 'full', 1, (12, 12)),
      ('pre/1', 'full', 1, (12, 12)),
      ('level1/shortening', 'shortening', 3, (4, 12)),
      ('level1/shortened/0', 'shortened', 3, (4, 4)),
      ('level1/upsampling', 'upsampling', 3, (12, 4)),
      ('post/0', 'full', 1, (12, 12)),
      ('post/1', 'full', 1, (12, 12)),
  ]


def test_nested_levels_in_data_flow_order():
  assert _layout(_maps(_model('1@1 1@2 2@6 1@2 1@1'))) == [
      ('pre/0', 'full', 1, (12, 12)),
      ('level1/shortening', 'shortening', 2, (6, 12)),
      ('level1/shortened/0', 'shortened', 2, (6, 6)),
      ('level2/shortening', 'shortening', 6, (2, 6)),
      ('level2/shortened/0', 'shortened', 6, (2, 2)),
      ('level2/shortened/1', 'shortened', 6, (2, 2)),
      ('level2/upsampling', 'upsampling', 6, (6, 2)),
      ('level1/shortened/1', 'shortened', 2, (6, 6)),
      ('level1/upsampling', 'upsampling', 2, (12, 6)),
      ('post/0', 'full', 1, (12, 12)),
  ]


@pytest.mark.parametrize('down, up, names', [
    (resampling.LinearPooling, resampling.NaiveUpsampling,
     ['pre/0', 'level1/shortened/0', 'post/0']),
    (resampling.AveragePooling, ATTN,
     ['pre/0', 'level1/shortened/0', 'level1/upsampling', 'post/0']),
    (ATTN, resampling.LinearUpsampling,
     ['pre/0', 'level1/shortening', 'level1/shortened/0', 'post/0']),
])
def test_only_attention_resampling_has_maps(down, up, names):
  # Length 130, padded to 132 by the model: the maps are at the lengths it
  # runs. Full-length attention runs in two query blocks of 66.
  maps = _maps(_model('1@3', down, up), _tokens(130))
  assert [r.name for r in maps] == names
  assert maps[0].weights.shape[2:] == (132, 132)


def test_refuses_other_attention_types_and_modes():
  with pytest.raises(ValueError, match=r'RotaryDotProductCausalAttention in '
                     r'level1/shortened'):
    th.attention_maps(_model('1@2', middle_attn_type=RotaryCausalAttention),
                      _tokens())
  for mode in ('train', 'predict'):
    with pytest.raises(ValueError, match=f"eval-mode model, got mode='{mode}'"):
      th.attention_maps(_model('1@2', mode=mode), _tokens())


def test_picture_script_quick(tmp_path, capsys):
  text = tmp_path / 'text.xml'
  text.write_bytes(b'<page>[[x]]</page>' * 50 + b'. Some plain prose follows '
                   b'here, long enough for a window of forty-eight bytes.')
  script = benchmark_scripts.load('attention_maps')
  out = tmp_path / 'out'
  assert script.main(['--quick', '--data', str(text), '--offset', '0',
                      '--length', '48', '--out', str(out)]) == 0
  rows = benchmark_scripts.table_rows(capsys.readouterr().out, 'layer')
  assert list(rows) == ['pre/0', 'level1/shortening', 'level1/shortened/0',
                        'level1/upsampling', 'post/0']
  assert (out / 'attention_maps.png').stat().st_size > 10_000
