"""Multi-host training: `trainer` processes under JAX's distributed runtime.

Each test starts real `trainer` processes on this machine (CPU devices, gloo
collectives), with the coordinator's port taken from the OS.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from trax_hourglass import checkpoints
from trax_hourglass import compat
from trax_hourglass import data
from trax_hourglass.cli import distributed
from trax_hourglass.cli import trainer
from trax_hourglass.data import streams
from trax.data import inputs as trax_inputs

from configurations import FAST_COMPILE_XLA_FLAGS  # pylint: disable=g-bad-import-order
from configurations import TINY_GIN  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# The trainer refuses several CPU devices per process where they deadlock
# (see compat.multiprocess_cpu_training_hangs); tested below.
SEVERAL_CPU_DEVICES_HANG = pytest.mark.skipif(
    compat.multiprocess_cpu_training_hangs(),
    reason='with this jax 2 processes x 2 CPU devices deadlock in a '
    'cross-process all-reduce (one device waits on its in-flight semaphore)')

STEPS = 40
EVERY = 5  # Steps between checkpoints and evals.


@pytest.fixture(name='corpus', scope='module')
def corpus_fixture(tmp_path_factory):
  # Varied text: batches differ, so a wrong slice changes the losses.
  rng = np.random.default_rng(0)
  words = [b'the', b'quick', b'brown', b'fox', b'jumps', b'over', b'lazy',
           b'dog', b'and', b'runs', b'far', b'away', b'from', b'home']
  text = b' '.join(words[i] for i in rng.integers(0, len(words), 4000))
  path = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
  path.write_bytes(text)
  return str(path)


@pytest.fixture(name='two_by_two', scope='module')
def two_by_two_fixture(tmp_path_factory, corpus):
  """An uninterrupted run: 2 processes x 2 devices, 4 examples per process."""
  tmp_path = tmp_path_factory.mktemp('two_by_two')
  return train(tmp_path, corpus, 'run', 2, 2, steps=STEPS, batch=4,
               eval_frequency=EVERY)


def gin_file(tmp_path, steps, batch, eval_frequency=1):
  path = tmp_path / f'tiny_{steps}_{batch}_{eval_frequency}.gin'
  path.write_text(TINY_GIN.format(steps=steps, batch=batch,
                                  eval_frequency=eval_frequency))
  return str(path)


def start(n_processes, n_devices, args, log_prefix, extra=()):
  """Starts `n_processes` trainer processes; returns [(Popen, log path)]."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = (f'{FAST_COMPILE_XLA_FLAGS} '
                      f'--xla_force_host_platform_device_count={n_devices}')
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  cmd = [sys.executable, '-m', 'trax_hourglass.cli.trainer'] + list(args)
  if n_processes > 1:
    cmd += ['--coordinator_address', f'127.0.0.1:{free_port()}',
            '--num_processes', str(n_processes)]
  procs = []
  for i in range(n_processes):
    log = f'{log_prefix}.p{i}.log'
    with open(log, 'w') as f:
      ids = ['--process_id', str(i)] if n_processes > 1 else []
      procs.append((subprocess.Popen(cmd + ids + list(extra), cwd=REPO,
                                     env=env, stdout=f,
                                     stderr=subprocess.STDOUT), log))
  return procs


def wait_all(procs, timeout):
  """Waits for every process (killing all at `timeout`); returns the logs."""
  deadline = time.time() + timeout
  try:
    for p, _ in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = []
  for p, log in procs:
    with open(log) as f:
      logs.append(f.read())
  return [(p.returncode, text) for (p, _), text in zip(procs, logs)]


def train(tmp_path, corpus, name, n_processes, n_devices, steps, batch,
          eval_frequency=1, timeout=240, extra=()):
  out = str(tmp_path / name)
  args = ['--config_file', gin_file(tmp_path, steps, batch, eval_frequency),
          '--output_dir', out,
          f"--config=byte_file_inputs.path='{corpus}'"]
  results = wait_all(start(n_processes, n_devices, args, out, extra), timeout)
  for i, (rc, log) in enumerate(results):
    assert rc == 0, f'process {i} exited with {rc}:\n{log[-3000:]}'
  return out, [log for _, log in results]


def history(out, mode, metric):
  ckpt = checkpoints.read_checkpoint(out)
  values = ckpt.data['history']['_values'][mode][metric]
  return ckpt, np.array([[step, float(v)] for step, v in values])


@SEVERAL_CPU_DEVICES_HANG
def test_two_processes_train_as_one_with_all_the_devices(tmp_path, corpus,
                                                         two_by_two):
  """2 processes x 2 devices == 1 process x 4 devices, same global batches."""
  multi, logs = two_by_two
  single, _ = train(tmp_path, corpus, 'single', 1, 4, steps=STEPS, batch=8,
                    eval_frequency=EVERY)
  for mode, metric in (('train', 'metrics/WeightedCategoryCrossEntropy'),
                       ('eval', 'metrics/loss')):
    multi_ckpt, multi_values = history(multi, mode, metric)
    single_ckpt, single_values = history(single, mode, metric)
    # A checkpoint is saved before its step's eval.
    assert list(multi_values[:, 0]) == [1] + list(range(EVERY, STEPS, EVERY))
    np.testing.assert_allclose(multi_values, single_values, rtol=0, atol=1e-5)
  assert multi_ckpt.step == single_ckpt.step == STEPS
  for a, b in zip(multi_ckpt.flat_weights, single_ckpt.flat_weights):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  # Process 0 prints the progress (for the global batch), the other does not.
  assert f'step {STEPS}/{STEPS} | loss' in logs[0]
  assert f'step {STEPS}/{STEPS}' not in logs[1]
  assert 'batch 2 x (4, 16) (one per process) = 128 tokens' in logs[0]
  assert 'Process 1 of 2' in logs[1]


@SEVERAL_CPU_DEVICES_HANG
def test_kill_9_stops_the_other_process_and_a_relaunch_resumes(
    tmp_path, corpus, two_by_two):
  """kill -9 of one process: the other exits soon; relaunched, both resume."""
  steps = STEPS
  args = ['--config_file', gin_file(tmp_path, steps, 4, eval_frequency=EVERY),
          '--output_dir', str(tmp_path / 'run'),
          f"--config=byte_file_inputs.path='{corpus}'"]
  out = str(tmp_path / 'run')
  procs = start(2, 2, args, out + '.first', ['--heartbeat_timeout', '10'])
  try:
    deadline = time.time() + 180
    while 'step 12/' not in open(procs[0][1]).read():
      assert time.time() < deadline and procs[0][0].poll() is None, (
          open(procs[0][1]).read()[-3000:])
      time.sleep(0.2)
    killed_at = time.time()
    os.kill(procs[1][0].pid, signal.SIGKILL)
    procs[0][0].wait(timeout=90)  # A hang fails here.
    waited = time.time() - killed_at
  finally:
    results = wait_all(procs, 1)
  rc, log = results[0]
  assert rc != 0 and waited < 60, (rc, waited, log[-3000:])
  # Which error depends on where the process was: in a collective (ours, one
  # line) or elsewhere until jax's heartbeat check ends it.
  assert ('trainer: error: process 0 of 2 lost contact with another training '
          'process' in log or 'stopped sending heartbeats' in log), log[-3000:]
  committed = checkpoints.read_checkpoint(out).step
  assert committed % EVERY == 0 and 10 <= committed < steps

  results = wait_all(start(2, 2, args, out + '.again'), 240)
  for i, (rc, log) in enumerate(results):
    assert rc == 0, f'process {i} exited with {rc}:\n{log[-3000:]}'
  assert f'Resumed from the checkpoint at step {committed}' in results[0][1]
  assert f'step {steps}/{steps} | loss' in results[0][1]
  resumed = checkpoints.read_checkpoint(out)
  assert resumed.step == steps
  # Both processes read on from the committed data position: the weights are
  # those of a run that was never interrupted.
  whole, _ = two_by_two
  for a, b in zip(resumed.flat_weights,
                  checkpoints.read_checkpoint(whole).flat_weights):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


LOOP_WORKER = """
import json
import sys
import numpy as np
from trax_hourglass.cli import trainer
args = trainer._parse_args(sys.argv[1:])
assert trainer.init_distributed(args) == 2
import jax
import trax
from trax import layers as tl
from trax.supervised import training
import trax_hourglass as th

def stream():
  rng = np.random.default_rng(jax.process_index())  # Each its own data.
  while True:
    x = rng.integers(0, 16, (2, 4)).astype(np.int32)
    yield x, x, np.ones(x.shape, np.float32)

def weights():
  return [np.asarray(w).tolist() for w in jax.tree_util.tree_leaves(
      loop.model.weights)]

task = training.TrainTask(stream(), tl.WeightedCategoryCrossEntropy(),
                          trax.optimizers.Adam(0.01))
loop = th.Loop(tl.Serial(tl.Embedding(16, 8), tl.Dense(16)), [task],
               random_seed=None)  # Each process its own init.
print('INIT', json.dumps(weights()))
loop.run(3)
print('TRAINED', json.dumps(weights()))

def same_data():
  while True:
    x = np.arange(8, dtype=np.int32).reshape(2, 4)
    yield x, x, np.ones(x.shape, np.float32)

task = training.TrainTask(same_data(), tl.WeightedCategoryCrossEntropy(),
                          trax.optimizers.Adam(0.01))
loop = training.Loop(tl.Serial(tl.Embedding(16, 64), tl.Dropout(0.5),
                               tl.Dense(16)), [task], random_seed=0)
loss, _ = loop._run_one_step(0, False)  # This process's loss, before averaging.
print('DROPOUT', json.dumps(float(loss)))
"""


def test_one_device_per_process_keeps_weights_identical(tmp_path):
  """A Loop on 2 processes x 1 device: same weights at init and after steps.

  random_seed=None initialises each process differently (trax then makes
  them equal) and each process trains on different data. Then dropout masks:
  with a fixed seed processes must still draw different ones.
  """
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  procs = []
  for i in range(2):
    log = str(tmp_path / f'worker{i}.log')
    with open(log, 'w') as f:
      procs.append((subprocess.Popen(
          [sys.executable, '-c', LOOP_WORKER, '--coordinator_address',
           f'127.0.0.1:{port}', '--num_processes', '2', '--process_id',
           str(i)], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT),
          log))
  results = wait_all(procs, 240)
  found = []
  for rc, log in results:
    assert rc == 0, log[-3000:]
    lines = dict(line.split(' ', 1) for line in log.splitlines()
                 if line.startswith(('INIT ', 'TRAINED ', 'DROPOUT ')))
    found.append({k: json.loads(v) for k, v in lines.items()})
  assert found[0]['INIT'] == found[1]['INIT']
  assert found[0]['TRAINED'] == found[1]['TRAINED']
  assert found[0]['TRAINED'] != found[0]['INIT']
  # Same data, same random_seed: each process still draws its own dropout.
  assert found[0]['DROPOUT'] != found[1]['DROPOUT']


def _args(**flags):
  values = dict(coordinator_address=None, num_processes=None, process_id=None,
                heartbeat_timeout='100')
  values.update(flags)
  return types.SimpleNamespace(**values)


def test_one_process_needs_nothing_and_starts_no_runtime():
  assert trainer.distributed_settings(_args(), environ={}) == (None, None,
                                                               None)
  assert trainer.init_distributed(_args(), environ={}) == 1
  assert trainer.init_distributed(
      _args(num_processes='1', process_id='0'), environ={}) == 1


def test_settings_come_from_flags_or_the_environment():
  env = {'JAX_COORDINATOR_ADDRESS': 'host0:1234', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3'}
  assert trainer.distributed_settings(_args(), environ=env) == (
      'host0:1234', 4, 3)
  assert trainer.distributed_settings(
      _args(process_id='2'), environ=env) == ('host0:1234', 4, 2)


@pytest.mark.parametrize('flags, env, message', [
    (dict(num_processes='two'), {}, "--num_processes='two' must be an integer"),
    (dict(num_processes='0'), {}, "--num_processes='0' must be an integer >= 1"),
    (dict(process_id='-1'), {}, "--process_id='-1' must be an integer >= 0"),
    (dict(num_processes='2', process_id='2'), {},
     '--process_id=2 must be below --num_processes=2 (0..1)'),
    (dict(coordinator_address='10.0.0.1'), {},
     "--coordinator_address='10.0.0.1' must be host:port"),
    ({}, {'JAX_COORDINATOR_ADDRESS': 'h:99999'},
     "$JAX_COORDINATOR_ADDRESS='h:99999' must be host:port"),
    ({}, {'JAX_NUM_PROCESSES': 'x'}, "$JAX_NUM_PROCESSES='x' must be an"),
])
def test_bad_settings_are_named(flags, env, message):
  with pytest.raises(ValueError) as e:
    trainer.distributed_settings(_args(**flags), environ=env)
  assert message in str(e.value)


def test_incomplete_settings_say_what_is_missing(monkeypatch):
  monkeypatch.setattr(distributed, '_detected_cluster', lambda: None)
  with pytest.raises(ValueError, match=r'missing --num_processes '
                     r'\(\$JAX_NUM_PROCESSES\), --process_id'):
    trainer.init_distributed(_args(coordinator_address='h:1'), environ={})


def test_a_bad_setting_is_one_line(capsys):
  assert trainer.main(['--num_processes', '2', '--process_id', '5',
                       '--coordinator_address', 'h:1']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['trainer: error: --process_id=5 must be below '
                 '--num_processes=2 (0..1) (--debug shows the traceback)']


def test_several_cpu_devices_per_process_are_refused_where_they_hang(
    tmp_path, monkeypatch, capsys):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(trainer, 'init_distributed', lambda args: 2)
  monkeypatch.setattr(compat, 'multiprocess_cpu_training_hangs', lambda: True)
  monkeypatch.setattr(jax, 'local_device_count', lambda: 2)
  assert trainer.main(['--output_dir', str(tmp_path / 'run')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith('trainer: error: 2 CPU devices per process hang '
                           f'multi-process training with jax {jax.__version__}')
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
  monkeypatch.setattr(trainer, '_train', lambda args: 'trained')
  assert trainer.run(_args(output_dir=str(tmp_path / 'run'))) == 'trained'


@pytest.mark.slow  # The refusal in one process: the test above.
@pytest.mark.skipif(not compat.multiprocess_cpu_training_hangs(),
                    reason='this jax trains 2 processes x 2 CPU devices')
def test_two_processes_with_two_cpu_devices_each_stop_with_one_line(
    tmp_path, corpus):
  """Where they would hang, both processes refuse at once (exit 1)."""
  args = ['--config_file', gin_file(tmp_path, 4, 4), '--output_dir',
          str(tmp_path / 'run'), f"--config=byte_file_inputs.path='{corpus}'"]
  for rc, log in wait_all(start(2, 2, args, str(tmp_path / 'run')), 120):
    assert rc == 1, log[-3000:]
    errors = [line for line in log.splitlines()
              if line.startswith('trainer: error:')]
    assert 'Traceback' not in log and len(errors) == 1 and errors[0].startswith(
        'trainer: error: 2 CPU devices per process hang'), log[-3000:]


SLURM_ENV = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1',
             'SLURM_LOCALID': '1', 'SLURM_STEP_NODELIST': 'node1'}


@pytest.fixture(name='initialize_calls')
def initialize_calls_fixture(monkeypatch):
  """Records what init_distributed asks jax's initialize to do (not doing it)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  calls = []
  record = lambda *args, **kwargs: calls.append((args, kwargs))
  monkeypatch.setattr(distributed.global_state, 'initialize', record)
  monkeypatch.setattr(jax.distributed, 'initialize', record)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  collectives = jax.config.values.get('jax_cpu_collectives_implementation')
  yield calls
  jax.config.update('jax_cpu_collectives_implementation', collectives)


def test_a_detected_cluster_supplies_the_settings(monkeypatch,
                                                   initialize_calls):
  for k, v in SLURM_ENV.items():
    monkeypatch.setenv(k, v)
  assert trainer._detected_cluster().__name__ == 'SlurmCluster'  # pylint: disable=protected-access
  assert trainer.init_distributed(_args()) == 2
  assert initialize_calls[0][0] == (None, None, None)  # jax fills them in.
  assert trainer.init_distributed(_args(coordinator_address='h:1')) == 2
  assert initialize_calls[1][0] == ('h:1', None, None)
  monkeypatch.setenv('SLURM_NTASKS', '1')  # A one-task job: one process.
  assert trainer._detected_cluster() is None  # pylint: disable=protected-access
  assert trainer.init_distributed(_args()) == 1
  assert len(initialize_calls) == 2


def test_settings_start_the_runtime_with_gloo_and_bounded_waits(
    initialize_calls):
  import jax  # pylint: disable=g-import-not-at-top
  assert trainer.init_distributed(_args(
      coordinator_address='h:1', num_processes='2', process_id='0',
      heartbeat_timeout='10'), environ={}) == 2
  (args, kwargs), = initialize_calls
  assert args == ('h:1', 2, 0)
  if kwargs:  # jax's internal initialize: heartbeats bounded to 10 s.
    assert (kwargs['client_heartbeat_interval_seconds'] *
            kwargs['client_max_missing_heartbeats']) == 10
  assert jax.config.values.get('jax_cpu_collectives_implementation') in (
      'gloo', 'mpi', None)


def test_importing_the_package_leaves_jax_unstarted(run_python):
  """The runtime must start before jax does anything: imports must not."""
  out = run_python("""
      from trax_hourglass.cli import trainer
      import trax_hourglass
      from trax_hourglass import checkpoints, data
      from trax.supervised import trainer_lib
      from jax._src import xla_bridge
      print('started', xla_bridge.backends_are_initialized())
  """)
  assert 'started False' in out


def _byte_inputs(tmp_path, batch_size):
  path = tmp_path / 'bytes.txt'
  path.write_bytes(bytes(range(256)) * 40)
  return data.byte_file_inputs(str(path), batch_size=batch_size,
                               sequence_length=8)


def _image_inputs(tmp_path, batch_size):
  rng = np.random.default_rng(0)
  path = tmp_path / 'images.npz'
  np.savez(path, train_images=rng.integers(0, 256, (10, 2, 2, 3), np.uint8),
           test_images=rng.integers(0, 256, (6, 2, 2, 3), np.uint8))
  return data.npz_image_inputs(str(path), batch_size=batch_size)


def _sentencepiece_inputs(tmp_path, batch_size):
  import test_data  # pylint: disable=g-import-not-at-top
  spm = tmp_path / 'chars.model'
  spm.write_bytes(test_data._char_sentencepiece_model('\u2581abcdefghij'))  # pylint: disable=protected-access
  texts = {'train': ['abcdefghij' * 5, 'abc', 'jihgfedcba' * 3],
           'eval': ['aaaa bbbb cccc dddd']}
  return data.sentencepiece_lm_inputs(lambda split: iter(texts[split]),
                                      str(spm), 'test', batch_size=batch_size,
                                      max_length=4, shuffle_buffer=2)


@pytest.mark.parametrize('make_inputs', [_byte_inputs, _image_inputs,
                                         _sentencepiece_inputs])
def test_processes_read_disjoint_slices_of_the_same_global_batches(
    tmp_path, monkeypatch, make_inputs):
  """Process k of 2 reads slice k of what one process reads at 2x the batch."""
  def read(shard, batch_size):
    monkeypatch.setattr(streams, 'process_shard', lambda: shard)
    trax_inputs.data_counters = {}
    inputs = make_inputs(tmp_path, batch_size)
    train, held_out = inputs.train_stream(1), inputs.eval_stream(1)
    batches = [next(train) for _ in range(4)] + [next(held_out)
                                                 for _ in range(2)]
    return batches, dict(trax_inputs.data_counters)

  try:
    whole, positions = read((0, 1), 4)
    parts = [read((k, 2), 2) for k in range(2)]
  finally:
    trax_inputs.data_counters = {}
  for k in range(2):
    assert parts[k][1] == positions  # Positions carry over to any split.
  for j, batch in enumerate(whole):
    for a, b0, b1 in zip(batch, parts[0][0][j], parts[1][0][j]):
      np.testing.assert_array_equal(a, np.concatenate([b0, b1]))
  # And the global batches are not one slice twice.
  assert any(not np.array_equal(b0[0], b1[0])
             for b0, b1 in zip(parts[0][0], parts[1][0]))
