"""No silently wrong result from `hourglass-eval`, `hourglass-sample` and
`decoding.sample` (issue 29).

A config that does not fit the checkpoint (another d_model: trax's loader
filled the model with the checkpoint's shapes and eval reported the old
model's number; another layer count: a traceback), sampling settings that
sample garbage (a NaN temperature printed NUL bytes), and decoding past a
model's max_len (trax's caches clamp their write position: every token past
it was garbage) are refused in one line. Two tiny runs (step-0 checkpoints,
as the trainer leaves them) serve every test; the CLIs run in this process.
"""

import os
import re

# First: its compat fixes must apply before trax is imported (import time).
import trax_hourglass  # pylint: disable=g-bad-import-order
import trax_hourglass as th  # pylint: disable=g-bad-import-order

import gin
import numpy as np
import pytest
import trax
import trax.layers as tl
from trax import shapes
from trax.data import inputs as trax_inputs

from trax_hourglass import decoding
from trax_hourglass.cli import evaluate as evaluate_cli
from trax_hourglass.cli import sample as sample_cli
import configurations  # pylint: disable=g-bad-import-order
from configurations import compiled_call  # pylint: disable=g-bad-import-order

HOURGLASS_GIN = """
train.model = @trax_hourglass.HourglassLM
trax_hourglass.HourglassLM.vocab_size = 256
trax_hourglass.HourglassLM.d_model = 16
trax_hourglass.HourglassLM.d_ff = 32
trax_hourglass.HourglassLM.n_heads = 2
trax_hourglass.HourglassLM.vanilla_layers = (1, 1)
trax_hourglass.HourglassLM.hierarchy = '1@2'
trax_hourglass.HourglassLM.dropout = 0.0
"""
TRANSFORMER_MAX_LEN = 8
TRANSFORMER_GIN = f"""
train.model = @trax.models.TransformerLM
TransformerLM.vocab_size = 256
TransformerLM.d_model = 16
TransformerLM.d_ff = 32
TransformerLM.n_heads = 2
TransformerLM.n_layers = 1
TransformerLM.max_len = {TRANSFORMER_MAX_LEN}
TransformerLM.dropout = 0.0
"""


def _transformer_run(out):
  """A TransformerLM training output dir: a Loop's step-0 checkpoint and the
  config.gin the trainer writes (as configurations.save_run for ours)."""
  from trax import optimizers  # pylint: disable=g-import-not-at-top
  from trax.supervised import training  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin.parse_config(TRANSFORMER_GIN)
    x = np.arange(16, dtype=np.int32).reshape(2, TRANSFORMER_MAX_LEN)
    batches = iter(lambda: (x, x, np.ones(x.shape, np.float32)), None)
    task = training.TrainTask(batches, tl.WeightedCategoryCrossEntropy(),
                              optimizers.Adam(0.01))
    loop = th.Loop(trax.models.TransformerLM(mode='train'), [task],
                   output_dir=out, checkpoint_at=lambda step: False,
                   random_seed=0)
    loop.save_checkpoint('model')
    with open(os.path.join(out, 'config.gin'), 'w') as f:
      f.write(gin.operative_config_str() +
              '\ntrain.model = @trax.models.TransformerLM\n')
  finally:
    gin.clear_config()
  return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('wrong_results')
  text = tmp / 'text.txt'
  text.write_bytes(b'the quick brown fox jumps over the lazy dog. ' * 20)
  return dict(
      hourglass=configurations.save_run(str(tmp / 'hourglass'), HOURGLASS_GIN),
      transformer=_transformer_run(str(tmp / 'transformer')),
      text=str(text), json=str(tmp / 'eval.json'))


def _error(capsys, main, *args):
  """The one error line of a CLI run that must fail."""
  gin.clear_config()
  trax_inputs.data_counters = {}
  try:
    assert main(list(args)) == 1
  finally:
    gin.clear_config()
  err = capsys.readouterr().err
  assert 'Traceback' not in err, err
  lines = [l for l in err.splitlines() if ': error: ' in l]
  assert len(lines) == 1, err
  return lines[0]


def _eval_error(runs, capsys, *bindings):
  return _error(capsys, evaluate_cli.main, '--output_dir', runs['hourglass'],
                '--byte_file', runs['text'], '--max_bytes', '64',
                '--json', runs['json'], *[f'--config={b}' for b in bindings])


def test_eval_refuses_another_width_naming_the_array(runs, capsys):
  line = _eval_error(runs, capsys, 'trax_hourglass.HourglassLM.d_model=32')
  assert re.search(
      r'weight array 0 \(Embedding_256_32\) of \S+ \(step 0\) has shape '
      r'\(256, 16\), the model built from the config expects \(256, 32\): '
      r"the config does not match the checkpoint; use the run's own config",
      line), line
  assert not os.path.exists(runs['json'])


def test_eval_refuses_another_layer_count(runs, capsys):
  line = _eval_error(runs, capsys,
                     'trax_hourglass.HourglassLM.vanilla_layers=(2, 1)')
  assert re.search(r'holds \d+ weight arrays, the model built from the config '
                   r'has \d+ \(another number or kind of layers\)', line), line


@pytest.mark.parametrize('flag, message', [
    ('--temperature=nan', r'--temperature=nan; use a finite number: 0 '
                          r'\(greedy\) or more'),
    ('--temperature=inf', r'--temperature=inf; use a finite number'),
    ('--temperature=-0.5', r'--temperature=-0.5; use a finite number'),
    ('--top_k=0', r'--top_k=0; use None \(all tokens\) or an integer >= 1'),
    ('--seed=-1', r'--seed=-1; use an integer in 0\.\.4294967295'),
    ('--seed=4294967296', r'--seed=4294967296; use an integer in 0\.\.'),
])
def test_sample_refuses_settings_that_sample_garbage(runs, capsys, flag,
                                                     message):
  line = _error(capsys, sample_cli.main, '--output_dir', runs['hourglass'],
                '--n_tokens=2', flag)
  assert re.search(message, line), line


def test_decoding_refuses_past_a_transformers_max_len(runs):
  model = decoding.load_predict_model(runs['transformer'])
  assert decoding.max_decode_len(model) == TRANSFORMER_MAX_LEN
  prompt = np.arange(1, 5)
  with pytest.raises(ValueError, match=r"a prompt of 4 tokens \+ n_tokens=5 "
                     r"is past the model's max_len=8: ask for at most 4"):
    decoding.sample(model, 5, prompt=prompt)
  with pytest.raises(ValueError, match=r'the prompt has 8 tokens, but the '
                     r'model decodes at most 8 \(its max_len\)'):
    decoding.sample(model, 1, prompt=np.arange(1, 9))
  # Up to max_len it decodes, and equals the eval model's greedy choice.
  tokens = decoding.sample(model, 4, prompt=prompt, temperature=0)
  evaluator = trax.models.TransformerLM(
      vocab_size=256, d_model=16, d_ff=32, n_heads=2, n_layers=1,
      max_len=TRANSFORMER_MAX_LEN, dropout=0.0, mode='eval')
  evaluator.init(shapes.ShapeDtype((1, TRANSFORMER_MAX_LEN), np.int32))
  evaluator.weights = model.weights
  sequence = np.concatenate([prompt, tokens[0]])[None].astype(np.int32)
  # Shifted right inside: logits at t are those of token t.
  logits = np.asarray(compiled_call(evaluator, sequence))
  np.testing.assert_array_equal(tokens[0],
                                logits[0, len(prompt):].argmax(-1))


def test_our_max_decode_len_is_max_len():
  model = trax_hourglass.HourglassLM(vocab_size=8, d_model=8, d_ff=8,
                                     n_heads=1, hierarchy='1@2', max_len=6,
                                     mode='predict')
  assert decoding.max_decode_len(model) == 6


def test_sample_refuses_past_a_transformers_max_len(runs, capsys):
  line = _error(capsys, sample_cli.main, '--output_dir', runs['transformer'],
                '--prompt=abc', '--n_tokens=6')
  assert re.search(r"--n_tokens=6 after a prompt of 3 bytes is past the "
                   r"model's max_len=8: ask for at most 5 tokens", line), line
  line = _error(capsys, sample_cli.main, '--output_dir', runs['transformer'],
                '--prompt=abcdefghijk', '--n_tokens=1')
  assert re.search(r'the prompt has 11 tokens, but the model decodes at most '
                   r'8 \(its max_len\)', line), line
  line = _error(capsys, sample_cli.main, '--output_dir', runs['transformer'],
                '--top_k=257')
  assert re.search(r"--top_k=257 is more than the model's 256 tokens; use "
                   r'1\.\.256', line), line


def test_a_prompt_that_is_not_utf8_is_sampled_as_its_bytes(runs, capsys):
  # Python reads the command line's byte 0xff as the surrogate '\udcff'.
  gin.clear_config()
  try:
    assert sample_cli.main(['--output_dir', runs['transformer'],
                            '--prompt=a\udcff', '--n_tokens=1',
                            '--temperature=0']) == 0
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  assert out.startswith('a\ufffd'), out  # The byte, printed as UTF-8 does.
