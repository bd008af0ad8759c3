"""Tests of the `trainer` console script (trax_hourglass.cli.trainer)."""

import os
import re

import gin
import pytest

from trax_hourglass import checkpoints
from trax_hourglass import data  # pylint: disable=unused-import (registers)
from trax_hourglass.cli import trainer
from trax.data import inputs as trax_inputs

from configurations import TINY_GIN  # pylint: disable=g-bad-import-order

# With a binding of trax's own Adam, and the unit the progress lines check.
TRAINER_GIN = TINY_GIN + "Adam.b2 = 0.98\nProgressReporter.unit = 'byte'\n"


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_bytes(b'the quick brown fox jumps over the lazy dog. ' * 400)
  return str(path)


def _gin_file(tmp_path, steps=4, batch=4):
  path = tmp_path / 'tiny.gin'
  path.write_text(TRAINER_GIN.format(steps=steps, batch=batch,
                                     eval_frequency=3))
  return str(path)


def _main(args):
  gin.clear_config()
  trax_inputs.data_counters = {}
  try:
    return trainer.main(args)
  finally:
    gin.clear_config()


@pytest.mark.smoke
def test_trains_prints_progress_and_resumes(tmp_path, corpus, capsys):
  out = str(tmp_path / 'run')
  args = ['--config_file', _gin_file(tmp_path), '--output_dir', out,
          f"--config=byte_file_inputs.path='{corpus}'"]
  assert _main(args) == 0
  printed = capsys.readouterr().out
  assert re.search(r'Devices: \d+ x cpu', printed)
  assert re.search(r'Model: [\d,]+ parameters', printed)
  lines = re.findall(r'step (\d+)/4 \| loss [\d.]+ \| [\d.]+ bits/byte \| '
                     r'[\d.]+k? tok/s \| [\d.]+ s/step \| left \d+:\d\d:\d\d',
                     printed)
  assert lines[0] == '1' and lines[-1] == '4'
  assert 'eval' in printed  # trax's own summaries are still printed
  # The last step is committed even though trax's schedule (every 3) skips it.
  assert checkpoints.read_checkpoint(out).step == 4

  assert _main(args + ['--config=train.steps=6']) == 0
  printed = capsys.readouterr().out
  assert 'Resumed from the checkpoint at step 4' in printed
  assert 'step 5/6' in printed and 'step 1/' not in printed
  # The evals of the first run are its own news: the line of step 5 shows none.
  assert ' @' not in re.search(r'step 5/6.*', printed).group()
  assert checkpoints.read_checkpoint(out).step == 6


def test_errors_are_reported_clearly(tmp_path, corpus, capsys):
  assert _main(['--config_file', str(tmp_path / 'nope.gin')]) == 1
  assert 'nope.gin does not exist' in capsys.readouterr().err
  assert _main(['--config_file', _gin_file(tmp_path), '--output_dir',
                str(tmp_path / 'run'),
                "--config=byte_file_inputs.path='/no/such/file'"]) == 1
  assert 'byte file /no/such/file does not exist' in capsys.readouterr().err


def test_data_parallel_on_two_devices_and_indivisible_batch(
    tmp_path, corpus, run_python):
  out = run_python(f"""
      import sys
      import gin
      from trax_hourglass.cli import trainer
      sys.stderr = sys.stdout
      args = ['--config_file', {_gin_file(tmp_path, steps=2, batch=3)!r},
              '--output_dir', {str(tmp_path / 'bad')!r},
              "--config=byte_file_inputs.path='{corpus}'"]
      print('exit', trainer.main(args))
      gin.clear_config()
      args[-1:] = ["--config=byte_file_inputs.path='{corpus}'",
                   '--config=byte_file_inputs.batch_size=4',
                   '--output_dir', {str(tmp_path / 'good')!r}]
      print('exit', trainer.main(args))
      gin.clear_config()  # Resume on 2 devices (replicated weights saved).
      print('exit', trainer.main(args + ['--config=train.steps=3']))
      """, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert 'exit 1' in out and out.count('exit 0') == 2
  assert 'Resumed from the checkpoint at step 2' in out and 'step 3/3' in out
  assert ('batch_size=3 cannot be split evenly over 2 devices' in out and
          'use a multiple of 2, e.g. 2 or 4' in out), out
  assert 'training on 2 (data parallel)' in out
  assert 'over 2 device(s)' in out and 'step 2/2' in out


GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'gin')

# The released configs' parameter counts (trax's hourglass_*.gin, counted with
# trax's own HourglassLM below) and their sequence lengths.
PAPER = {
    'enwik8': (123_211_008, 2048),
    'imagenet32': (111_125_760, 3072),
    'imagenet64': (135_068_416, 12288),
    'cifar10': (42_824_960, 3072),
    'wiki40b': (95_328_512, 2048),
}


def _original_kwargs(name):
  """trax's released hourglass_<name>.gin model bindings, as Python kwargs."""
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.layers.research import resampling  # pylint: disable=g-import-not-at-top
  common = dict(n_heads=8, vocab_size=256, d_model=512, d_ff=2048)
  return {
      'enwik8': dict(common, dropout=0.2, vanilla_layers=(5, 5),
                     hierarchy='24@3',
                     attention_upsampling_fn=resampling.NaiveUpsampling,
                     ff_activation=tl.FastGelu),
      'imagenet32': dict(common, dropout=0.01, vanilla_layers=(3, 3),
                         hierarchy='24@3',
                         attention_downsampling_fn=resampling.LinearPooling,
                         ff_activation=tl.FastGelu),
      'imagenet64': dict(common, d_model=768, d_ff=3072, dropout=0.0,
                         vanilla_layers=(3, 3), hierarchy='12@3',
                         ff_activation=tl.FastGelu,
                         vanilla_attn_type=tl.PureLSHSelfAttentionWrapper,
                         downsampling_fn=resampling.LinearPooling,
                         upsampling_fn=resampling.LinearUpsampling),
      'cifar10': dict(common, dropout=0.0, vanilla_layers=(1, 1),
                      hierarchy='8@3',
                      attention_downsampling_fn=resampling.LinearPooling,
                      attention_upsampling_fn=resampling.LinearUpsampling),
      'wiki40b': dict(common, vocab_size=32000, dropout=0.0,
                      vanilla_layers=(4, 4), hierarchy='8@4',
                      attention_upsampling_fn=resampling.LinearUpsampling),
  }[name]


def _count(model, length):
  """Parameters of `model`, by abstract init (no memory, no compute)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  weights, _ = model.weights_and_state_signature(
      shapes.ShapeDtype((1, length), np.int32))
  return int(sum(np.prod(w.shape) for w in fastmath.tree_flatten(weights)
                 if hasattr(w, 'shape')))


def _parse(path, bindings=()):
  gin.clear_config()
  gin.parse_config_files_and_bindings([path], list(bindings))
  model_fn = gin.query_parameter('train.model').scoped_configurable_fn
  gin.query_parameter('train.inputs')  # Every config names its data.
  return model_fn


# Small sizes for building every config quickly; the hierarchies' shorten
# factors and everything else stay as configured.
_REDUCED = {
    'HourglassLM': ['trax_hourglass.HourglassLM.d_model = 32',
                    'trax_hourglass.HourglassLM.d_ff = 64',
                    'trax_hourglass.HourglassLM.n_heads = 2',
                    'trax_hourglass.HourglassLM.vanilla_layers = (1, 1)'],
    'TransformerLM': ['TransformerLM.d_model = 32', 'TransformerLM.d_ff = 64',
                      'TransformerLM.n_heads = 2', 'TransformerLM.n_layers = 2'],
}


def _length(name):
  # A config's own enwik8 window where it sets one (the LSH variant's 2304).
  bound = _bound_or_none('enwik8_inputs.sequence_length')
  if bound:
    return bound
  return 12288 if '64' in name else 3072 if (
      'cifar' in name or 'imagenet' in name) else 2048


@pytest.mark.slow  # ~60 s; test_gin_surface builds three of them by default.
def test_every_gin_file_parses_and_builds_its_model():
  names = sorted(f for f in os.listdir(GIN_DIR) if f.endswith('.gin'))
  assert {'quickstart.gin', 'enwik8_hourglass.gin', 'enwik8_transformer.gin'} <= set(
      names)
  for name in PAPER:
    assert f'{name}_hourglass.gin' in names and f'{name}_transformer.gin' in names
  try:
    for name in names:
      path = os.path.join(GIN_DIR, name)
      _parse(path)
      kind = gin.query_parameter('train.model').configurable.name
      hierarchy = _bound_or_none('trax_hourglass.HourglassLM.hierarchy')
      reduced = list(_REDUCED[kind])
      if hierarchy:  # One shortened layer, same shorten factor.
        reduced.append("trax_hourglass.HourglassLM.hierarchy = '1@%s'"
                       % hierarchy.split('@')[1])
      model = _parse(path, reduced)(mode='eval')
      assert _count(model, _length(name)) > 0, name
  finally:
    gin.clear_config()


def _bound_or_none(name):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return None


@pytest.mark.slow  # ~2 min, 10 s the smallest.
@pytest.mark.parametrize('name', sorted(PAPER))
def test_paper_configs_have_the_original_parameter_counts(name):
  expected, length = PAPER[name]
  try:
    ours = _parse(os.path.join(GIN_DIR, f'{name}_hourglass.gin'))(mode='eval')
    assert _count(ours, length) == expected
  finally:
    gin.clear_config()


@pytest.mark.slow  # Builds trax's own models (~20 s each): -m slow.
@pytest.mark.parametrize('name', sorted(PAPER))
def test_trax_original_models_have_these_counts(name):
  """The expected numbers, counted with trax's own HourglassLM (5-15 s each:
  only cifar10 in the default suite, the others with `pytest -m slow`)."""
  from trax.models.research import hourglass as trax_hourglass_original  # pylint: disable=g-import-not-at-top
  expected, length = PAPER[name]
  if name == 'enwik8':
    length = 2049  # The original needs a multiple of 3 (its batcher's 2049).
  try:
    # imagenet64's LSH attention bindings come from the gin file.
    _parse(os.path.join(GIN_DIR, f'{name}_hourglass.gin'))
    original = trax_hourglass_original.HourglassLM(mode='eval',
                                                   **_original_kwargs(name))
    assert _count(original, length) == expected
  finally:
    gin.clear_config()


@pytest.mark.slow  # The trainer's path: the tiny-config tests; the file: test_docs.
def test_quickstart_model_trains_a_step(tmp_path):
  """The quickstart config, shortened, really trains through the trainer."""
  out = str(tmp_path / 'run')
  args = ['--config_file', os.path.join(GIN_DIR, 'quickstart.gin'),
          '--output_dir', out, f'--data_dir={tmp_path}',
          '--config=train.steps=2', '--config=train.eval_steps=1',
          '--config=stdlib_text_inputs.max_bytes=300000',
          '--config=stdlib_text_inputs.sequence_length=64',
          '--config=final_sample.length=5']
  assert _main(args) == 0
  assert checkpoints.read_checkpoint(out).step == 2


class _ConstantScorer:
  """Stands in for a model: log2 p = -1 per token, or minus its position."""

  def __init__(self, by_position=False):
    self.by_position = by_position

  def log2_probs(self, x):
    import numpy as np  # pylint: disable=g-import-not-at-top
    if self.by_position:
      return -np.broadcast_to(np.arange(x.shape[1], dtype=float), x.shape)
    return -np.ones(x.shape)


def test_byte_scoring_scores_every_byte_once_with_long_context():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax_hourglass.cli import evaluate  # pylint: disable=g-import-not-at-top
  data = np.zeros(1000, np.uint8)
  for n in (1000, 37, 16):
    bits, scored = evaluate.score_bytes(_ConstantScorer(), data[:n], 16, 5, 3)
    assert (bits, scored) == (n, n)  # 1 bit each: every byte exactly once
  # Scoring -position gives the context of each scored byte: after the first
  # window every byte has at least 16 - 5 = 11 bytes before it.
  bits, _ = evaluate.score_bytes(_ConstantScorer(True), data[:21], 16, 5, 3)
  assert bits == sum(range(16)) + sum(range(11, 16))


@pytest.mark.smoke
def test_hourglass_eval_on_bytes_and_images(tmp_path, corpus, capsys):
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax_hourglass.cli import evaluate  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'run')
  assert _main(['--config_file', _gin_file(tmp_path, steps=2), '--output_dir',
                out, f"--config=byte_file_inputs.path='{corpus}'"]) == 0
  gin.clear_config()
  assert evaluate.main(['--output_dir', out, '--split', 'valid',
                        '--stride', '8']) == 0
  captured = capsys.readouterr()
  printed = captured.out
  assert re.search(r'\[(\d+)/\1 batches\] [\d.]+ bits/byte', captured.err)  # Progress.
  assert re.search(r'step 2: [\d.]+ bits per byte on 900 bytes of .*corpus'
                   r'.txt \[valid: bytes 16,200\.\.17,100\)', printed), printed
  result = json.loads(open(os.path.join(out, 'eval_valid.json')).read())
  assert result['metric'] == 'bits_per_byte' and result['n_bytes'] == 900
  assert 0 < result['value'] < 9 and result['min_context'] == 8

  rng = np.random.default_rng(0)
  images = tmp_path / 'images.npz'
  np.savez(images, train_images=rng.integers(0, 256, (8, 4, 4, 3), np.uint8),
           test_images=rng.integers(0, 256, (5, 4, 4, 3), np.uint8))
  img_out = str(tmp_path / 'images_run')
  assert _main(['--config_file', _gin_file(tmp_path, steps=2), '--output_dir',
                img_out, '--config=train.inputs=@trax_hourglass.npz_image_inputs',
                f"--config=npz_image_inputs.path='{images}'",
                '--config=npz_image_inputs.batch_size=4',
                '--config=TransformerLM.max_len=48']) == 0
  gin.clear_config()
  assert evaluate.main(['--output_dir', img_out, '--batch_size', '2']) == 0
  printed = capsys.readouterr().out
  assert re.search(r'[\d.]+ bits per dim on 5 images \(240 subpixels\)',
                   printed), printed
  result = json.loads(open(os.path.join(img_out, 'eval_test.json')).read())
  assert result['metric'] == 'bits_per_dim' and 6 < result['value'] < 10
