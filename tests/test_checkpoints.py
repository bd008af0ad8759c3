"""Tests of trax_hourglass.checkpoints: crash-safe, safely loaded Loop checkpoints."""

import gzip
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import trax_hourglass as th
from trax_hourglass import checkpoints
from trax_hourglass import data as hg_data

# pylint: disable=g-import-not-at-top,wrong-import-order
import trax
from trax import fastmath
from trax import layers as tl
from trax.data import inputs as trax_inputs
from trax.supervised import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_data_position():
  trax_inputs.data_counters = {}  # A process-wide global: fresh per test.


def _batch(i, batch_size=2, length=8, vocab=16):
  x = hg_data.streams.rng_for(7, i).integers(
      1, vocab, (batch_size, length)).astype(np.int32)
  return (x, x, np.ones_like(x, np.float32))


def _loop(output_dir, seed=0, checkpoint_at=None, d_model=8, dropout=0.0,
          eval_at=None, loop_class=th.Loop):
  model, eval_model = (trax.models.TransformerLM(
      vocab_size=16, d_model=d_model, d_ff=2 * d_model, n_layers=1, n_heads=1,
      max_len=16, dropout=dropout, mode=mode) for mode in ('train', 'eval'))
  task = training.TrainTask(
      hg_data.resumable_stream('test/train', _batch),
      tl.WeightedCategoryCrossEntropy(), trax.optimizers.Adam(0.01),
      n_steps_per_checkpoint=2)
  eval_tasks = eval_at and [training.EvalTask(
      hg_data.resumable_stream('test/eval', _batch),
      [tl.WeightedCategoryCrossEntropy()])]
  return loop_class(model, task, eval_model=eval_model,
                    eval_tasks=eval_tasks, eval_at=eval_at,
                    output_dir=output_dir, random_seed=seed,
                    checkpoint_at=checkpoint_at)


def _flat(tree):
  return [np.asarray(x) for x in fastmath.tree_flatten(tree)
          if x is not None and not isinstance(x, tuple)]


def _assert_same(a, b):
  a, b = _flat(a), _flat(b)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_resume_continues_at_saved_step_with_identical_state(tmp_path):
  out = str(tmp_path / 'run')
  loop = _loop(out, checkpoint_at=lambda s: s % 2 == 0)
  loop.run(4)
  saved_weights, saved_slots = loop.model.weights, loop._trainer_per_task[0].slots
  saved_counters = dict(trax_inputs.data_counters)

  trax_inputs.data_counters = {}
  resumed = _loop(out, seed=123)  # Another seed: everything must come from disk.
  assert resumed.step == 4
  _assert_same(resumed.model.weights, saved_weights)
  _assert_same(resumed._trainer_per_task[0].slots, saved_slots)
  assert trax_inputs.data_counters == saved_counters
  assert resumed.history.get('train', 'training/loss') == []  # no evals ran
  resumed.run(2)

  # The same 6 steps without interruption give the very same weights: the data
  # position, optimizer slots and random key were all restored.
  trax_inputs.data_counters = {}
  straight = _loop(str(tmp_path / 'straight'), checkpoint_at=lambda s: False)
  straight.run(6)
  assert resumed.step == straight.step == 6
  _assert_same(resumed.model.weights, straight.model.weights)


def test_evals_leave_training_alone_and_resume_exactly_with_dropout(tmp_path):
  # trax's evals drew from the Loop's random key after the checkpoint of their
  # step was saved: a resumed run drew other dropout masks than one that went
  # on, and a run with evals other masks than one without.
  every_2 = lambda step: step % 2 == 0
  out = str(tmp_path / 'run')
  loop = _loop(out, checkpoint_at=every_2, dropout=0.5, eval_at=every_2)
  loop.run(4)
  trax_inputs.data_counters = {}
  resumed = _loop(out, checkpoint_at=every_2, dropout=0.5, eval_at=every_2)
  assert resumed.step == 4
  resumed.run(2)
  trax_inputs.data_counters = {}
  straight = _loop(str(tmp_path / 'straight'), checkpoint_at=lambda s: False,
                   dropout=0.5)
  straight.run(6)
  _assert_same(resumed.model.weights, straight.model.weights)


def _set_everything_to(loop, value):
  """Makes weights and slots all equal `value`, so a checkpoint is checkable."""
  loop._step = value
  loop.model.weights = fastmath.nested_map(
      lambda w: np.full(w.shape, value, w.dtype), loop.model.weights)
  trainer = loop._trainer_per_task[0]
  trainer.slots = fastmath.nested_map(
      lambda w: np.full(w.shape, value, w.dtype), trainer.slots)


def _assert_consistent(directory):
  """The checkpoint is one save: step == every weight == every slot."""
  ckpt = checkpoints.read_checkpoint(directory)
  for w in ckpt.flat_weights + ckpt.slots_per_task[0]:
    np.testing.assert_array_equal(w, np.full(w.shape, ckpt.step, w.dtype))
  return ckpt.step


class _Injected(Exception):
  pass


def test_exception_at_every_point_of_a_save_keeps_a_whole_checkpoint(
    tmp_path, monkeypatch):
  out = str(tmp_path / 'run')
  loop = _loop(out)
  _set_everything_to(loop, 1)
  loop.save_checkpoint('model')
  assert _assert_consistent(out) == 1

  # Fail at the k-th filesystem operation of a save, for every k, until a save
  # goes through: each time the checkpoint on disk must be the old or the new
  # one, whole.
  store = checkpoints.store
  ops = [(store, '_write_durably'), (store, '_fsync_dir'),
         (store.os, 'replace'), (store.os, 'rename'),
         (store.os, 'symlink'), (store.os, 'mkdir'),
         (store.shutil, 'rmtree')]
  seen = set()
  for k in range(200):
    counter = [0]
    for module, name in ops:
      original = getattr(module, name)
      def failing(*args, _original=original, _name=name, **kwargs):
        counter[0] += 1
        if counter[0] == k + 1:
          raise _Injected(_name)
        return _original(*args, **kwargs)
      monkeypatch.setattr(module, name, failing)
    step = 2 + k
    _set_everything_to(loop, step)
    try:
      loop.save_checkpoint('model')
      finished = True
    except _Injected:
      finished = False
    monkeypatch.undo()
    got = _assert_consistent(out)
    assert got in (step, step - 1) or not finished and got < step
    seen.add(got == step)
    # What trax itself reads at the top level is that same checkpoint.
    with gzip.open(os.path.join(out, 'model.pkl.gz'), 'rb') as f:
      assert pickle.load(f)['step'] == got
    if finished:
      assert got == step
      break
  else:
    pytest.fail('a save never finished')
  assert seen == {True, False}  # Both outcomes happened.
  assert k > 10  # The save has many failure points; all were tried.
  # Leftovers of the failed saves are gone; current and previous are kept.
  root = os.path.join(out, checkpoints.CHECKPOINTS_DIR, 'model')
  folders = sorted(e for e in os.listdir(root) if e != checkpoints.CURRENT)
  assert len(folders) == 2 and all(e.startswith('step_') for e in folders)


_CHILD = textwrap.dedent('''
    import sys
    sys.path[:0] = {paths!r}
    from trax_hourglass import checkpoints  # First: it makes `import trax` fast.
    import numpy as np
    import trax
    from trax import fastmath
    from trax import layers as tl
    from trax.supervised import training
    import trax_hourglass as th
    model = trax.models.TransformerLM(vocab_size=256, d_model=128, d_ff=512,
                                      n_layers=2, n_heads=2, max_len=16)
    batch = np.ones((2, 8), np.int32)
    task = training.TrainTask(iter([(batch, batch, np.ones((2, 8)))] * 2),
                              tl.WeightedCategoryCrossEntropy(),
                              trax.optimizers.Adam(0.01))
    loop = th.Loop(model, task, output_dir={out!r}, random_seed=0)
    for step in range(loop.step + 1, 10**6):
      loop._step = step
      fill = lambda w: np.full(w.shape, step, w.dtype)
      loop.model.weights = fastmath.nested_map(fill, loop.model.weights)
      trainer = loop._trainer_per_task[0]
      trainer.slots = fastmath.nested_map(fill, trainer.slots)
      loop.save_checkpoint('model')
      print('saved', step, flush=True)
''')


def test_kill_9_at_random_moments_leaves_a_whole_checkpoint(tmp_path):
  out = str(tmp_path / 'run')
  script = tmp_path / 'child.py'
  script.write_text(_CHILD.format(paths=sys.path, out=out))
  rnd = random.Random(0)
  last = 0
  for _ in range(2):
    child = subprocess.Popen([sys.executable, str(script)],
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()  # Wait for a first committed save.
    assert line.startswith('saved'), line
    time.sleep(rnd.uniform(0.0, 1.5))
    child.send_signal(signal.SIGKILL)
    child.wait()
    step = _assert_consistent(out)
    assert step > last  # Resumed from the last one, and got further.
    last = step
  # A real Loop of the child's model resumes from what the kills left.
  model = trax.models.TransformerLM(vocab_size=256, d_model=128, d_ff=512,
                                    n_layers=2, n_heads=2, max_len=16)
  batch = np.ones((2, 8), np.int32)
  task = training.TrainTask(iter([(batch, batch, np.ones((2, 8)))]),
                            tl.WeightedCategoryCrossEntropy(),
                            trax.optimizers.Adam(0.01))
  loop = th.Loop(model, task, output_dir=out, random_seed=0)
  assert loop.step == last
  for w in _flat(loop.model.weights) + _flat(loop._trainer_per_task[0].slots):
    np.testing.assert_array_equal(w, np.full(w.shape, last, w.dtype))


def test_tampered_pickle_is_refused_naming_the_file(tmp_path):
  out = str(tmp_path / 'run')
  _loop(out).save_checkpoint('model')
  folder = checkpoints.committed_folder(out)
  marker = tmp_path / 'pwned'

  class Evil:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  evil = gzip.compress(pickle.dumps({'step': Evil()}))
  pkl = os.path.join(folder, 'model.pkl.gz')
  with open(pkl, 'wb') as f:
    f.write(evil)
  # The manifest catches a modified file...
  with pytest.raises(checkpoints.CheckpointError, match=f'{pkl}: (has .* bytes|sha256)'):
    checkpoints.read_checkpoint(out)
  with pytest.raises(checkpoints.CheckpointError, match=pkl):
    _loop(out)
  # ...and the unpickler refuses it even when nothing checks it.
  with pytest.raises(checkpoints.CheckpointError,
                     match=f'{pkl}: refusing to load posix.system'):
    checkpoints.safe_unpickle(pkl)
  # A plain trax checkpoint (no manifest) is guarded by the unpickler alone.
  legacy = str(tmp_path / 'legacy')
  os.makedirs(legacy)
  with open(os.path.join(legacy, 'model.pkl.gz'), 'wb') as f:
    f.write(evil)
  with pytest.raises(checkpoints.CheckpointError, match='refusing to load'):
    _loop(legacy)
  assert not marker.exists()


def test_truncated_files_are_refused_naming_the_file(tmp_path):
  out = str(tmp_path / 'run')
  _loop(out).save_checkpoint('model')
  weights = os.path.join(checkpoints.committed_folder(out),
                         'model.weights.npy.gz')
  n_weights = len(checkpoints.read_arrays(weights))
  with open(weights, 'rb') as f:
    data = f.read()
  with open(weights, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(checkpoints.CheckpointError,
                     match=f'{weights}: has .* bytes, its manifest says'):
    checkpoints.read_checkpoint(out)
  # Without a manifest the array reader itself notices (tl.np_from_file
  # would silently return fewer weights).
  with pytest.raises(checkpoints.CheckpointError,
                     match=f'{weights}: truncated or corrupt'):
    checkpoints.read_arrays(weights)
  assert len(tl.np_from_file(weights, compresslevel=2)) < n_weights
  with pytest.raises(checkpoints.CheckpointError, match='truncated or corrupt'):
    with open(os.path.join(out, 'trunc.pkl.gz'), 'wb') as f:
      f.write(gzip.compress(pickle.dumps({'step': 1}))[:-9])
    checkpoints.safe_unpickle(os.path.join(out, 'trunc.pkl.gz'))


def test_trax_own_readers_still_read_the_top_level_files(tmp_path):
  out = str(tmp_path / 'run')
  loop = _loop(out, checkpoint_at=lambda s: s == 2)
  loop.run(2)
  assert os.path.islink(os.path.join(out, 'model.pkl.gz'))
  with gzip.open(os.path.join(out, 'model.pkl.gz'), 'rb') as f:
    d = pickle.load(f)
  assert d['step'] == 2
  weights = tl.np_from_file(os.path.join(out, 'model.weights.npy.gz'),
                            compresslevel=d['flat_weights'])
  flat, _ = tl.flatten_weights_and_state(loop.model.weights, loop.model.state)
  for w, x in zip(weights, flat):
    np.testing.assert_array_equal(w, np.asarray(x))
  assert len(tl.np_from_file(os.path.join(out, 'model.opt_slots0.npy.gz'),
                             compresslevel=2)) > 0
  # trax's unpatched Loop loader and model loader read it as well.
  trax_inputs.data_counters = {}
  plain = _loop(out, seed=5, loop_class=training.Loop)
  assert plain.step == 2
  _assert_same(plain.model.weights, loop.model.weights)
  model = trax.models.TransformerLM(vocab_size=16, d_model=8, d_ff=16,
                                    n_layers=1, n_heads=1, max_len=16,
                                    mode='eval')
  model.init_from_file(os.path.join(out, 'model.pkl.gz'), weights_only=True)
  _assert_same(model.weights, loop.model.weights)


def test_plain_trax_checkpoints_load_and_are_converted(tmp_path):
  out = str(tmp_path / 'run')
  loop = _loop(out, checkpoint_at=lambda s: s == 2, loop_class=training.Loop)
  loop.run(2)
  assert not os.path.islink(os.path.join(out, 'model.pkl.gz'))
  trax_inputs.data_counters = {}
  resumed = _loop(out, seed=3, checkpoint_at=lambda s: True)
  assert resumed.step == 2
  _assert_same(resumed.model.weights, loop.model.weights)
  resumed.run(1)  # Saves: the top level becomes links into the committed one.
  assert os.path.islink(os.path.join(out, 'model.pkl.gz'))
  assert checkpoints.read_checkpoint(out).step == 3
  # The safe model loader reads a committed checkpoint too.
  model = trax.models.TransformerLM(vocab_size=16, d_model=8, d_ff=16,
                                    n_layers=1, n_heads=1, max_len=16,
                                    mode='eval')
  checkpoints.init_from_file(model, out, weights_only=True)
  _assert_same(model.weights, resumed.model.weights)


def test_resuming_another_model_is_a_clear_error(tmp_path):
  out = str(tmp_path / 'run')
  _loop(out).save_checkpoint('model')
  with pytest.raises(checkpoints.CheckpointError,
                     match='different model'):
    _loop(out, d_model=16)
