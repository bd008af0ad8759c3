"""Tests of trax_hourglass.compat, jax_shims and trax_fixes: each fails without
the fix it is named after."""

import inspect
import json
import re
import sys

import numpy as np
import pytest

from trax_hourglass import compat

compat.apply()

import trax_hourglass  # pylint: disable=g-import-not-at-top,wrong-import-position
from trax_hourglass import trax_fixes  # pylint: disable=g-import-not-at-top,wrong-import-position
from trax_hourglass.cli import trainer as trainer_cli  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
import gin
import jax
import trax
from trax import fastmath
from trax import layers as tl
from trax.optimizers import trainer as trax_trainer
from trax.supervised import trainer_lib
from trax.supervised import training

VOCAB = 16


def _caller_line():
  return sys._getframe(1).f_lineno  # pylint: disable=protected-access


def _examples(_=None):
  rng = np.random.RandomState(0)
  while True:
    x = rng.randint(0, VOCAB, size=(4,)).astype(np.int32)
    yield x, x


def _stream(n_devices=1):
  del n_devices  # Batch 2 splits over 1 or 2 devices.
  return trax.data.Serial(_examples, trax.data.Batch(2),
                          trax.data.AddLossWeights())()


def _model(mode='train'):
  del mode
  return tl.Serial(tl.Embedding(VOCAB, 8), tl.Dense(VOCAB))


def _loop(output_dir, n_devices=None):
  task = training.TrainTask(_stream(), tl.WeightedCategoryCrossEntropy(),
                            trax.optimizers.Adam(0.01),
                            n_steps_per_checkpoint=2)
  return training.Loop(_model(), [task], output_dir=output_dir, random_seed=0,
                       n_devices=n_devices)


def _trained_on(new, old):
  """Whether weights `new` are finite and differ from `old`."""
  new, old = fastmath.tree_flatten(new), fastmath.tree_flatten(old)
  return (all(np.isfinite(np.asarray(x)).all() for x in new) and
          any(not np.array_equal(np.asarray(x), np.asarray(y))
              for x, y in zip(new, old)))


def _assert_trees_equal(a, b):
  a, b = fastmath.tree_flatten(a), fastmath.tree_flatten(b)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# _fix_assert_shape_stack


def test_assert_shape_layers_record_caller_without_getmodule(monkeypatch):
  # pylint: disable=protected-access
  def no_getmodule(*args, **kwargs):
    raise AssertionError(f'inspect.getmodule{args}: scans all of sys.modules')
  monkeypatch.setattr(inspect, 'getmodule', no_getmodule)
  here = f'Defined at {__file__}:'

  line = _caller_line() + 1
  @tl.assert_shape('ab->ab')
  def Checked():  # pylint: disable=invalid-name
    return tl.Relu()
  layer = Checked()
  assert layer.sublayers[0]._message == f'{here}{line} function input'
  with pytest.raises(tl.LayerError, match=re.escape(f'{here}{line} function')):
    layer(np.zeros((2, 3, 4), np.float32))  # Rank 3, spec says rank 2.

  line = _caller_line() + 1
  wrapped = tl.AssertFunction('...a->...a', tl.Relu())
  assert wrapped.sublayers[0]._message == f'{here}{line} function input'

  line = _caller_line() + 1
  assert tl.AssertShape('ab')._message == f'{here}{line}'


def test_import_trax_decorates_layers_without_getmodule(run_python):
  out = run_python("""
      import inspect, json, os, sys
      real, calls = inspect.getmodule, []
      def getmodule(obj, _filename=None):  # Record lookups made for assert_shape.
        frame = sys._getframe(1)
        while frame is not None:
          if frame.f_code.co_filename.endswith(
              os.path.join('trax', 'layers', 'assert_shape.py')):
            calls.append(repr(obj))
            break
          frame = frame.f_back
        return real(obj, _filename)
      inspect.getmodule = getmodule
      from trax_hourglass import compat
      compat.apply()
      from trax import layers as tl
      print(json.dumps({'calls': len(calls),
                        'dense': tl.Dense(4)._before_assert_fun._message}))
  """)
  result = json.loads(out.splitlines()[-1])
  assert result['calls'] == 0
  # Still the line of `@assert_shape(...)` above `class Dense` in trax.
  message = result['dense']
  assert message.endswith(' function input')
  filename, line = message[len('Defined at '):-len(' function input')].rsplit(':', 1)
  assert filename == sys.modules['trax.layers.core'].__file__
  with open(filename, encoding='utf-8') as f:
    source = f.read().splitlines()
  assert source[int(line) - 1].startswith('@assert_shape(')
  assert source[int(line)].startswith('class Dense(')


# _fix_tree_unflatten


def test_loop_resumes_from_its_checkpoint(tmp_path):
  loop = _loop(str(tmp_path))
  loop.run(2)  # Checkpoints at step 2.
  weights, slots = loop.model.weights, loop.tasks[0].optimizer.slots

  resumed = _loop(str(tmp_path))  # Raised TypeError (array == tuple) here.
  assert resumed.step == 2
  _assert_trees_equal(resumed.model.weights, weights)
  _assert_trees_equal(resumed.tasks[0].optimizer.slots, slots)
  resumed.run(1)
  assert resumed.step == 3
  assert _trained_on(resumed.model.weights, weights)


# _fix_one_device_step_placement


def _step_compilations(records):
  return sum('compilation of jit(single_device_update_fn)' in r.getMessage()
             for r in records)


def test_loop_compiles_its_training_step_once(tmp_path, caplog):
  # Fresh weights are uncommitted, a step's outputs committed: without the fix
  # jit compiled the training step again on step 2 (and after every resume).
  with caplog.at_level('WARNING', logger='jax._src.dispatch'):
    with jax.log_compiles():
      loop = _loop(str(tmp_path))
      loop.run(3)
      assert _step_compilations(caplog.records) == 1
      resumed = _loop(str(tmp_path))  # Weights read back from the checkpoint.
      assert resumed.step == 2
      resumed.run(2)
  assert _step_compilations(caplog.records) == 2  # One more: a new Trainer.
  assert _trained_on(resumed.model.weights, loop.model.weights)


def test_one_device_training_step_runs_on_the_default_device(run_python):
  # trax commits its optimizer slots to the CPU (tl.on_cpu) and jit runs where
  # committed arguments are: on a GPU machine the training step ran on the host
  # CPU. Here device 1 of two CPU devices stands in for the accelerator (the
  # Loop insists on every device, so its Trainer is driven directly).
  out = run_python("""
      import json, sys
      sys.path.insert(0, 'tests')
      import jax
      import test_compat as t
      import trax
      from trax import fastmath, shapes
      from trax import layers as tl
      jax.config.update('jax_default_device', jax.devices()[1])
      model = tl.Serial(t._model(), tl.WeightedCategoryCrossEntropy())
      batch = next(t._stream())
      model.init(shapes.signature(batch))
      optimizer = trax.optimizers.Adam(0.01)
      optimizer.tree_init(model.weights)
      trainer = trax.optimizers.Trainer(model, optimizer, n_devices=1)
      for step in range(2):
        trainer.one_step(batch, jax.random.PRNGKey(step), step=step)
      trees = {'weights': trainer.accelerated_model_with_loss.weights,
               'slots': trainer._slots}
      print(json.dumps({name: sorted({d.id for x in fastmath.tree_flatten(tree)
                                      for d in x.devices()})
                        for name, tree in trees.items()}))
  """, env=_TWO_DEVICES)
  assert json.loads(out.splitlines()[-1]) == {'weights': [1], 'slots': [1]}


# _fix_tree_unflatten, through trainer_lib.train. (Its use_loop=False runs
# trax's old Trainer, which the trainer script refuses: it reads pickles
# unsafely.)


def test_trainer_lib_train_trains_and_resumes(tmp_path):
  inputs = trax.data.inputs.Inputs(_stream, _stream)

  def train(steps):
    return trainer_lib.train(str(tmp_path), model=_model, inputs=inputs,
                             steps=steps, eval_steps=1, eval_frequency=2,
                             random_seed=0)

  first = train(2)
  assert first.step == 2
  again = train(2)  # Restores step 2 from output_dir; nothing left to train.
  assert again.step == 2
  _assert_trees_equal(again.model.weights, first.model.weights)
  last = train(3)  # Resumes at step 2 and trains one more step.
  assert last.step == 3
  assert _trained_on(last.model.weights, first.model.weights)


# _fix_cond_per_branch_operands (newer jax)


def test_cond_takes_trax_per_branch_keywords():
  # trax's LSH attention calls fastmath.cond this way in predict mode.
  def branch(pred):
    return fastmath.cond(pred=pred, true_operand=np.float32(2),
                         true_fun=lambda x: x * 10, false_operand=np.float32(3),
                         false_fun=lambda x: x - 1)
  branch = jax.jit(branch)
  assert (float(branch(True)), float(branch(False))) == (20.0, 2.0)
  # The current form is passed through as it is.
  assert float(fastmath.cond(False, lambda x: x, lambda x: -x, 4.0)) == -4.0


# _fix_stop_gradient_python_ints (newer jax)


def test_stop_gradient_keeps_python_ints_under_jit():
  # trax's LSH attention: q_len = stop_gradient(seqlen); then `if q_len > 1:`.
  def scaled(x):
    n, (m, y) = fastmath.stop_gradient((3, (True, x)))
    assert (type(n), type(m)) == (int, bool)
    return y * n if n > 1 and m else y
  assert float(jax.jit(scaled)(np.float32(2))) == 6.0
  # Arrays still stop gradients.
  assert float(jax.grad(lambda x: x * fastmath.stop_gradient(x))(3.0)) == 3.0


# _fix_for_n_devices and _fix_pmap_committed_args (newer jax), unit by unit, on
# 2 virtual CPU devices; both end-to-end in the Loop test after them.

_TWO_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
                'JAX_PLATFORMS': 'cpu'}


def test_for_n_devices_replicates_onto_each_device(run_python):
  # jax 0.10 removed jax.device_put_replicated, which trax's for_n_devices called.
  out = run_python("""
      import json
      import numpy as np
      from trax_hourglass import compat
      compat.apply()
      import jax
      from trax import layers as tl
      from trax.layers import acceleration
      x = np.arange(6, dtype=np.float32).reshape(2, 3)
      tree = tl.for_n_devices((x, [jax.numpy.ones(2)], 0.5), 2)
      assert acceleration.for_n_devices is tl.for_n_devices
      y, (ones,), half = tree
      print(json.dumps({
          'shapes': [list(a.shape) for a in (y, ones, half)],
          'equal': bool((np.asarray(y) == np.stack([x, x])).all()),
          'devices': [sorted(d.id for d in a.devices()) for a in (y, ones, half)],
          'one_slice_per_device': sorted(
              s.device.id for s in y.addressable_shards
              if s.data.shape == (1, 2, 3)),
          'half_is_weak': bool(half.weak_type),
          'one_device_unchanged': tl.for_n_devices(x, 1) is x}))
  """, env=_TWO_DEVICES)
  assert json.loads(out.splitlines()[-1]) == {
      'shapes': [[2, 2, 3], [2, 2], [2]], 'equal': True,
      'devices': [[0, 1]] * 3, 'one_slice_per_device': [0, 1],
      'half_is_weak': True, 'one_device_unchanged': True}


def test_pmap_takes_arguments_committed_to_one_device(run_python):
  # trax pmaps its optimizer slots after tl.on_cpu committed them to one device;
  # jit-based pmap (newer jax) raised "Sharding passed to jit does not match".
  out = run_python("""
      import json
      import numpy as np
      from trax_hourglass import compat
      compat.apply()
      import jax
      from trax import fastmath
      from trax import layers as tl
      f = fastmath.pmap(lambda a, b: (a + fastmath.psum(b, 'batch'), b),
                        axis_name='batch')
      a = tl.on_cpu(tl.for_n_devices(np.ones(3, np.float32), 2))
      b = jax.device_put(np.arange(2, dtype=np.float32), jax.devices()[1])
      total, b_out = f(a, b)
      again, _ = f(total, b_out)  # Outputs go back in as they are.
      print(json.dumps({'total': np.asarray(total).tolist(),
                        'again': np.asarray(again).tolist()}))
  """, env=_TWO_DEVICES)
  assert json.loads(out.splitlines()[-1]) == {
      'total': [[2.0] * 3] * 2, 'again': [[3.0] * 3] * 2}


@pytest.mark.smoke
def test_loop_trains_and_resumes_on_two_devices(run_python, tmp_path):
  script = """
      import json, sys
      sys.path.insert(0, 'tests')
      import jax
      import numpy as np
      import test_compat as t
      from trax import fastmath
      loop = t._loop({output_dir!r})
      assert loop.n_devices == {n} == jax.device_count(), jax.devices()
      loop.run(2)
      weights = [np.asarray(w).tolist()
                 for w in fastmath.tree_flatten(loop.model.weights)]
      if {n} == 2:
        resumed = t._loop({output_dir!r})
        t._assert_trees_equal(resumed.model.weights, loop.model.weights)
        resumed.run(2)
        print(json.dumps({{'step': resumed.step, 'weights': weights,
                          'trained_on': t._trained_on(resumed.model.weights,
                                                      loop.model.weights)}}))
      else:
        print(json.dumps({{'weights': weights}}))
  """
  two = json.loads(run_python(
      script.format(output_dir=str(tmp_path / 'two'), n=2),
      env=_TWO_DEVICES).splitlines()[-1])
  assert (two['step'], two['trained_on']) == (4, True)
  one = json.loads(run_python(
      script.format(output_dir=str(tmp_path / 'one'), n=1),
      env={'JAX_PLATFORMS': 'cpu'}).splitlines()[-1])
  # Same batches on one device: the same two training steps.
  assert len(two['weights']) == len(one['weights'])
  for x, y in zip(two['weights'], one['weights']):
    np.testing.assert_allclose(x, y, atol=1e-5)


# Where each fix is applied: the jax shims on import, trax's training fixes
# when training starts (trax_hourglass.train, trax_hourglass.Loop) or when a
# program asks (install_training_fixes).


def test_import_applies_only_the_jax_shims(run_python):
  out = run_python("""
      import json, os
      import jax
      import trax_hourglass
      from trax_hourglass import jax_shims
      from trax.fastmath import jax as fastmath_jax
      from trax.layers import acceleration
      from trax.optimizers import trainer
      ours = os.path.dirname(trax_hourglass.__file__) + os.sep
      def replaced():
        fns = {
            '_accelerate_update_fn': trainer._accelerate_update_fn,
            'on_cpu': acceleration.on_cpu,
            'Trainer.one_step': trainer.Trainer.one_step,
            'ReversibleSerialTrainer.one_step':
                trainer.ReversibleSerialTrainer.one_step,
            'for_n_devices': acceleration.for_n_devices,
            'pmap': fastmath_jax.JAX_BACKEND['pmap']}
        return sorted(name for name, fn in fns.items()
                      if fn.__code__.co_filename.startswith(ours))
      on_import = replaced()
      trax_hourglass.install_training_fixes()
      print(json.dumps({
          'on_import': on_import, 'installed': replaced(),
          'for_n_devices': not hasattr(jax, 'device_put_replicated'),
          'pmap': jax_shims.pmap_is_jit_based()}))
  """)
  result = json.loads(out.splitlines()[-1])
  assert result['on_import'] == []
  # for_n_devices and pmap: only where the installed jax needs them.
  probed = [name for name in ('for_n_devices', 'pmap') if result[name]]
  assert result['installed'] == sorted(
      ['_accelerate_update_fn', 'on_cpu', 'Trainer.one_step',
       'ReversibleSerialTrainer.one_step'] + probed)


def _untested_trax(monkeypatch):
  monkeypatch.setattr(trax_fixes, '_trax_version', lambda: '1.5.0')
  monkeypatch.setattr(trax_fixes, '_INSTALLED', False)


def test_training_fixes_refuse_another_trax_in_one_line(monkeypatch, tmp_path,
                                                       capsys):
  _untested_trax(monkeypatch)
  with pytest.raises(trax_fixes.UntestedTraxError) as raised:
    trax_hourglass.install_training_fixes()
  message = str(raised.value)
  assert '\n' not in message
  assert message.startswith('trax 1.5.0 is installed, but trax_hourglass '
                            'trains with trax 1.4.1 only')
  assert message.endswith('pip install trax==1.4.1')
  # Training starts with them: train() and our Loop refuse before anything.
  with pytest.raises(trax_fixes.UntestedTraxError, match='trax 1.5.0'):
    trax_hourglass.train(str(tmp_path / 'run'))
  task = training.TrainTask(_stream(), tl.WeightedCategoryCrossEntropy(),
                            trax.optimizers.Adam(0.01))
  with pytest.raises(trax_fixes.UntestedTraxError, match='trax 1.5.0'):
    trax_hourglass.Loop(_model(), [task])
  assert not (tmp_path / 'run').exists()
  try:  # The trainer: one line.
    assert trainer_cli.main(['--output_dir', str(tmp_path / 'run')]) == 1
  finally:
    gin.clear_config()
  assert capsys.readouterr().err.splitlines() == [
      f'trainer: error: {message} (--debug shows the traceback)']


# _fix_on_cpu_multihost


def test_on_cpu_puts_arrays_on_this_process_cpu(monkeypatch):
  # Under jax's distributed runtime jax.devices('cpu')[0] is process 0's CPU:
  # trax's on_cpu failed on every other process ("non-addressable device").
  cpu = jax.local_devices(backend='cpu')[0]

  def devices(backend=None):
    raise AssertionError(f"jax.devices({backend!r}): every process's devices")

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'devices', devices)
  x = tl.on_cpu(np.arange(3, dtype=np.float32))
  assert x.devices() == {cpu}
  np.testing.assert_array_equal(np.asarray(x), [0, 1, 2])


# _fix_accelerate_update_fn: one device per process (one process: the
# placement tests above)


def test_one_device_step_averages_over_the_processes(monkeypatch):
  # With one device per process trax's step was a plain jit of the local
  # batch, and nothing averaged gradients across processes. The step maps
  # over axis 'batch', spanning the processes (here: the one that runs it).
  monkeypatch.setattr(jax, 'process_count', lambda: 2)

  def forward_and_backward(batch, weights, state, rng):
    del rng
    n_processes = jax.lax.psum(1, 'batch')  # Unbound outside a mapped step.
    gradients = jax.tree_util.tree_map(lambda w: w * 0 + batch, weights)
    return (n_processes * 1.0, state), gradients

  optimizer = trax.optimizers.SGD(0.5)
  weights = (np.ones(2, np.float32),)
  slots, opt_params = optimizer.tree_init(weights)
  update = trax_trainer._accelerate_update_fn(  # pylint: disable=protected-access
      forward_and_backward, optimizer, n_devices=1)
  (new_weights, _), _, stats = update((weights, slots), 0, opt_params,
                                      np.float32(2), (), jax.random.PRNGKey(0))
  assert float(stats['loss']) == 1.0
  np.testing.assert_allclose(np.asarray(new_weights[0]), [0.0, 0.0])


# _fix_same_rng_on_every_process


def test_processes_draw_their_own_dropout(monkeypatch):
  # With a fixed random_seed every process had the same step key, so device
  # k of every process drew the same dropout masks.
  model = tl.Serial(tl.Embedding(VOCAB, 64), tl.Dropout(0.5), tl.Dense(VOCAB),
                    tl.WeightedCategoryCrossEntropy())
  batch = next(_stream())
  model.init(trax.shapes.signature(batch), rng=jax.random.PRNGKey(0))
  optimizer = trax.optimizers.SGD(0.01)
  optimizer.tree_init(model.weights)
  trainer = trax.optimizers.Trainer(model, optimizer, n_devices=1)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)

  def loss_of_process(index):  # SGD at learning rate 0: the weights stay.
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    loss, _ = trainer.one_step(batch, jax.random.PRNGKey(1), learning_rate=0.0)
    return float(loss)

  first = loss_of_process(0)
  assert loss_of_process(1) != first
  assert loss_of_process(0) == first
