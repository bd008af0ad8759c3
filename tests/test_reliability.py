"""Nothing saved is lost, nothing read runs code (issue 14), in-process.

The same guarantees through the command-line scripts, as a user meets them,
are in tests/test_user_errors.py.
"""

import gzip
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from trax_hourglass import checkpoints
from trax_hourglass import data as hg_data
from trax_hourglass import decoding
from trax_hourglass.data import streams

# pylint: disable=g-import-not-at-top,wrong-import-order
import trax
from trax import fastmath
from trax import layers as tl
from trax import shapes
from trax.data import inputs as trax_inputs
from trax.supervised import trainer_lib
from trax.supervised import training
import trax_hourglass as th

from configurations import Payload  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _installed():
  trax_inputs.data_counters = {}
  with checkpoints.safe_trax_readers():  # Of the entry points below, trax's.
    yield
  streams.set_vocab_size(None)


def _batch(i, batch_size=2, length=8, vocab=16):
  x = streams.rng_for(7, i).integers(1, vocab, (batch_size, length)).astype(
      np.int32)
  return (x, x, np.ones_like(x, np.float32))


def _model(mode='train'):
  return trax.models.TransformerLM(
      vocab_size=16, d_model=8, d_ff=16, n_layers=1, n_heads=1, max_len=16,
      dropout=0.0, mode=mode)


def _loop(output_dir):
  task = training.TrainTask(
      hg_data.resumable_stream('test/train', _batch),
      tl.WeightedCategoryCrossEntropy(), trax.optimizers.Adam(0.01),
      n_steps_per_checkpoint=1000)
  return th.Loop(_model(), task, output_dir=output_dir, random_seed=0)


def _save_at(loop, step, value=None):
  """Saves the loop as if at `step`, its weights all `value` (default step)."""
  loop._step = step  # pylint: disable=protected-access
  fill = lambda w: np.full(w.shape, step if value is None else value, w.dtype)
  loop.model.weights = fastmath.nested_map(fill, loop.model.weights)
  loop.save_checkpoint('model')


def _root(out):
  return os.path.join(out, checkpoints.CHECKPOINTS_DIR, 'model')


def _folders(out):
  return sorted(e for e in os.listdir(_root(out)) if e.startswith('step_'))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """An output dir with committed checkpoints of steps 1, 2 and 3 (keep=2)."""
  trax_inputs.data_counters = {}
  out = str(tmp_path_factory.mktemp('saved') / 'run')
  loop = _loop(out)
  for step in (1, 2, 3):
    _save_at(loop, step)
  return out


def _copy_of(saved_dir, tmp_path, name='run'):
  out = str(tmp_path / name)
  shutil.copytree(saved_dir, out, symlinks=True)
  return out


# --- 1. Nothing read from disk runs code. ---------------------------------


def _evil_pickle(path, marker, compressed=True):
  data = pickle.dumps({'step': 1, 'flat_weights': [Payload(marker)],
                       'input_signature': None, 'slots': []})
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if compressed else data)


def test_no_entry_point_unpickles_with_the_plain_unpickler(tmp_path):
  marker = str(tmp_path / 'RAN')
  plain = tmp_path / 'plain'  # A plain trax output dir, crafted.
  plain.mkdir()
  _evil_pickle(str(plain / 'model.pkl.gz'), marker)
  _evil_pickle(str(plain / 'data_counters0.pkl'), marker, compressed=False)
  committed = str(tmp_path / 'committed')  # A committed checkpoint, crafted.
  evil = pickle.dumps({'step': 1, 'x': Payload(marker)})
  checkpoints.commit(
      committed, 'model',
      {'model.pkl.gz': lambda f: f.write(gzip.compress(evil))}, 1)
  pkl = str(plain / 'model.pkl.gz')
  model = _model('eval')
  model.init(shapes.ShapeDtype((1, 16), np.int32))
  entry_points = {
      'Loop resume (plain files)': lambda: _loop(str(plain)),
      'Loop resume (committed)': lambda: _loop(committed),
      # trax's old Trainer and trax's loader of non-local checkpoints.
      'trainer_lib.load_trainer_state': lambda: trainer_lib.load_trainer_state(
          str(plain), model),
      'training.unpickle_from_file': lambda: training.unpickle_from_file(
          pkl, gzip=True),
      'Layer.init_from_file': lambda: model.init_from_file(pkl),
      'load_trax_hourglass_weights': lambda: th.load_trax_hourglass_weights(
          model, pkl),
      'decoding.load_predict_model': lambda: decoding.load_predict_model(
          pkl, vocab_size=16),
      'read_checkpoint (committed)': lambda: checkpoints.read_checkpoint(
          committed),
      'load_data_counters': lambda: trax_inputs.load_data_counters(str(plain)),
  }
  for name, load in entry_points.items():
    with pytest.raises(checkpoints.CheckpointError,
                       match='refusing to load os.makedirs'):
      load()
    assert not os.path.exists(marker), f'{name} ran code from a pickle'


# --- 2. A damaged pointer or checkpoint loses nothing. ---------------------


@pytest.mark.parametrize('damage', ['missing', 'plain file', 'dangling'])
def test_damaged_pointer_recovers_the_newest_intact_checkpoint(
    saved, tmp_path, caplog, damage):
  out = _copy_of(saved, tmp_path)
  pointer = os.path.join(_root(out), checkpoints.CURRENT)
  os.unlink(pointer)
  if damage == 'plain file':
    with open(pointer, 'w') as f:
      f.write('step_000000003')
  elif damage == 'dangling':
    os.symlink('step_000000009.00000000', pointer)
  before = _folders(out)
  with caplog.at_level(logging.WARNING):
    loop = _loop(out)  # Resumes, and says from what.
  assert loop.step == 3
  newest = os.path.join(_root(out), before[-1])
  assert f'using the newest intact checkpoint, {newest} (step 3)' in caplog.text
  assert 'CURRENT' in caplog.text
  _save_at(loop, 4)  # The next save repairs the pointer and loses nothing.
  assert checkpoints.read_checkpoint(out).step == 4
  assert os.path.islink(pointer)
  assert _folders(out)[-2] == before[-1]  # step 3 is kept as the previous.
  if damage == 'plain file':  # Kept aside, not deleted.
    assert any(e.startswith('CURRENT.damaged-') for e in os.listdir(_root(out)))


def test_corrupt_newest_falls_back_to_previous_naming_both(
    saved, tmp_path, caplog):
  out = _copy_of(saved, tmp_path)
  older, newest = [os.path.join(_root(out), f) for f in _folders(out)]
  with open(os.path.join(newest, 'model.weights.npy.gz'), 'r+b') as f:
    f.seek(40)
    f.write(b'\x00\xff\x00')
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoints.read_checkpoint(out)
  assert ckpt.step == 2 and ckpt.path == older
  assert f'the newest checkpoint {newest} is damaged' in caplog.text
  assert f'using the newest intact checkpoint, {older} (step 2)' in caplog.text


def test_no_intact_checkpoint_refuses_to_start_and_deletes_nothing(
    saved, tmp_path):
  out = _copy_of(saved, tmp_path)
  os.unlink(os.path.join(_root(out), checkpoints.CURRENT))
  for folder in _folders(out):
    os.remove(os.path.join(_root(out), folder, checkpoints.MANIFEST))
  before = _folders(out)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'CURRENT is missing, and none of the 2 other .*'
                     r'Not training from step 0 over them'):
    _loop(out)
  assert _folders(out) == before


def test_a_save_never_prunes_a_later_checkpoint(saved, tmp_path):
  out = _copy_of(saved, tmp_path)
  later = _folders(out)
  loop = _loop(str(tmp_path / 'other'))  # A run that starts from step 0 ...
  loop._output_dir = out  # pylint: disable=protected-access
  _save_at(loop, 1)  # ... and saves into the same dir (before the lock).
  assert set(later) <= set(_folders(out))


@pytest.mark.parametrize('how', ['cp -r', 'cp -rL', 'rsync -a',
                                 'flat, links followed', 'flat, links dropped'])
def test_copies_resume_and_keep_saving(saved, tmp_path, how):
  out = str(tmp_path / 'copy')
  if how.startswith('flat'):  # gsutil cp -r: no symlinks in the copy.
    if how.endswith('followed'):
      shutil.copytree(saved, out, symlinks=False)
    else:
      shutil.copytree(saved, out, ignore=lambda d, names: [
          n for n in names if os.path.islink(os.path.join(d, n))])
  else:
    tool = how.split()[0]
    if shutil.which(tool) is None:
      pytest.skip(f'no {tool} here')
    subprocess.run(how.split() + [saved + '/', out], check=True)
  assert checkpoints.read_checkpoint(out).step == 3
  loop = _loop(out)
  assert loop.step == 3
  _save_at(loop, 4)
  _save_at(loop, 5)
  ckpt = checkpoints.read_checkpoint(out)
  assert ckpt.step == 5 and ckpt.manifest is not None
  with gzip.open(os.path.join(out, 'model.pkl.gz')) as f:  # trax's readers.
    assert pickle.load(f)['step'] == 5


def test_a_failed_save_leaves_no_partial_folder_and_keeps_the_last(
    saved, tmp_path, monkeypatch):
  out = _copy_of(saved, tmp_path)
  loop = _loop(out)
  write = checkpoints.store._write_durably  # pylint: disable=protected-access
  calls = []

  def disk_full_on_second_file(path, write_fn):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(28, 'No space left on device', path)
    return write(path, write_fn)

  monkeypatch.setattr(checkpoints.store, '_write_durably',
                      disk_full_on_second_file)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'could not save the checkpoint of step 4 \(No '
                     r'space left on device\); the previous checkpoint is '
                     r'kept'):
    _save_at(loop, 4)
  assert not [e for e in os.listdir(_root(out)) if '.tmp-' in e]
  assert checkpoints.read_checkpoint(out).step == 3


def test_non_finite_weights_are_never_committed(saved, tmp_path):
  out = _copy_of(saved, tmp_path)
  loop = _loop(out)
  with pytest.raises(checkpoints.NonFiniteWeightsError,
                     match=r'training diverged: step 4: weight array \d+ .* '
                     r'NaN or infinite .*\(the checkpoint of step 3 .* is '
                     r'kept'):
    _save_at(loop, 4, value=np.nan)
  assert checkpoints.read_checkpoint(out).step == 3


def test_prediction_refuses_non_finite_weights(saved):
  ckpt = checkpoints.read_checkpoint(saved)
  weights = [np.full_like(w, np.inf) for w in ckpt.flat_weights]
  with pytest.raises(checkpoints.NonFiniteWeightsError,
                     match='NaN or infinite'):
    decoding.load_predict_model(weights, model_fn=trax.models.TransformerLM,
                                vocab_size=16, d_model=8, d_ff=16, n_layers=1,
                                n_heads=1, max_len=16)


# --- 3. One trainer per output dir. ---------------------------------------


def test_second_trainer_is_refused_naming_the_holder_until_it_dies(tmp_path):
  out = str(tmp_path / 'run')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\n'
       'from trax_hourglass import checkpoints\n'
       'checkpoints.lock_output_dir(sys.argv[1])\n'
       'print("locked", flush=True)\n'
       'time.sleep(600)\n', out],
      cwd=REPO, stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3'))
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checkpoints.OutputDirInUseError,
                       match=rf'in use by another trainer \(pid {holder.pid} '
                       r'on host .+, since .+\)'):
      checkpoints.lock_output_dir(out)
  finally:
    holder.kill()  # Like kill -9: the lock must not outlive it.
    holder.wait(timeout=60)
  checkpoints.lock_output_dir(out)  # A stale lock does not block a restart.
  with open(os.path.join(out, 'checkpoints', 'LOCK')) as f:
    assert f'pid {os.getpid()} ' in f.read()


# --- 4. Token ids, and predict mode past max_len. -------------------------


def test_data_ids_outside_the_vocabulary_name_the_file_and_the_id(tmp_path):
  path = tmp_path / 'bytes.bin'
  path.write_bytes(bytes(range(40)) * 2 + b'\xc8' + bytes(range(40)) * 100)
  streams.set_vocab_size(64)
  with pytest.raises(ValueError, match=rf'{path} \(train split\): holds '
                     r"token id 200, outside the model's vocabulary "
                     r'\[0, 64\)'):
    hg_data.byte_file_inputs(str(path), batch_size=2, sequence_length=8)
  # Streams check every batch (images, any other data).
  stream = streams.resumable_stream('x', lambda i: (np.array([[3, -1]]),),
                                    'some.npz')
  with pytest.raises(ValueError, match=r'some.npz: holds token id -1'):
    next(stream)
  streams.set_vocab_size(None)  # Unset (as outside the trainer): no check.
  hg_data.byte_file_inputs(str(path), batch_size=2, sequence_length=8)


def test_the_model_clamps_ids_outside_its_vocabulary_as_documented():
  model = th.HourglassLM(vocab_size=16, d_model=8, d_ff=16, n_heads=2,
                         hierarchy='1@2', mode='eval')
  model.init(shapes.ShapeDtype((1, 4), np.int32))
  logits = lambda ids: np.asarray(model(np.array([ids], np.int32)))
  np.testing.assert_array_equal(logits([1, 2, 300, 3]), logits([1, 2, 15, 3]))
  np.testing.assert_array_equal(logits([1, 2, -1, 3]), logits([1, 2, 0, 3]))
  assert 'clamped' in th.HourglassLM.__doc__


def test_predict_past_max_len_is_a_value_error_when_called_directly():
  model = th.HourglassLM(vocab_size=16, d_model=8, d_ff=16, n_heads=2,
                         hierarchy='1@2', mode='predict', max_len=4)
  model.init(shapes.ShapeDtype((1, 1), np.int32))
  model(np.zeros((1, 4), np.int32))  # 4 tokens: fine.
  with pytest.raises(ValueError, match='token number 5, past its max_len=4'):
    model(np.zeros((1, 1), np.int32))
