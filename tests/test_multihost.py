"""Multi-host training: `trainer` processes under JAX's distributed runtime.

Each test starts real `trainer` processes on this machine (CPU devices, gloo
collectives), with the coordinator's port taken from the OS.
"""

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
from trax_hourglass.cli import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny byte-level LM: compiling it is most of each process's time.
TINY_GIN = """
train.model = @trax.models.TransformerLM
train.inputs = @trax_hourglass.byte_file_inputs
train.optimizer = @trax.optimizers.Adam
train.steps = {steps}
train.eval_frequency = {eval_frequency}
train.eval_steps = 1
train.random_seed = 0
train.save_graphs = False
byte_file_inputs.batch_size = {batch}
byte_file_inputs.sequence_length = 16
multifactor.constant = 0.01
multifactor.factors = 'constant'
TransformerLM.vocab_size = 256
TransformerLM.d_model = 16
TransformerLM.d_ff = 32
TransformerLM.n_heads = 2
TransformerLM.n_layers = 1
TransformerLM.max_len = 16
TransformerLM.dropout = 0.0
ProgressReporter.every_secs = 0
"""


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(name='corpus')
def corpus_fixture(tmp_path):
  # Varied text: batches differ, so a wrong slice changes the losses.
  rng = np.random.default_rng(0)
  words = [b'the', b'quick', b'brown', b'fox', b'jumps', b'over', b'lazy',
           b'dog', b'and', b'runs', b'far', b'away', b'from', b'home']
  text = b' '.join(words[i] for i in rng.integers(0, len(words), 4000))
  path = tmp_path / 'corpus.txt'
  path.write_bytes(text)
  return str(path)


def gin_file(tmp_path, steps, batch, eval_frequency=1):
  path = tmp_path / f'tiny_{steps}_{batch}_{eval_frequency}.gin'
  path.write_text(TINY_GIN.format(steps=steps, batch=batch,
                                  eval_frequency=eval_frequency))
  return str(path)


def start(n_processes, n_devices, args, log_prefix, extra=()):
  """Starts `n_processes` trainer processes; returns [(Popen, log path)]."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n_devices}'
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


def test_two_processes_train_as_one_with_all_the_devices(tmp_path, corpus):
  """2 processes x 2 devices == 1 process x 4 devices, same global batches."""
  multi, logs = train(tmp_path, corpus, 'multi', 2, 2, steps=4, batch=4)
  single, _ = train(tmp_path, corpus, 'single', 1, 4, steps=4, batch=8)
  for mode, metric in (('train', 'metrics/WeightedCategoryCrossEntropy'),
                       ('eval', 'metrics/loss')):
    multi_ckpt, multi_values = history(multi, mode, metric)
    single_ckpt, single_values = history(single, mode, metric)
    # A checkpoint is saved before its step's eval: history up to step 3.
    assert list(multi_values[:, 0]) == [1, 2, 3]
    np.testing.assert_allclose(multi_values, single_values, rtol=0, atol=1e-5)
  assert multi_ckpt.step == single_ckpt.step == 4
  for a, b in zip(multi_ckpt.flat_weights, single_ckpt.flat_weights):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  # Process 0 prints the progress (for the global batch), the other does not.
  assert 'step 4/4 | loss' in logs[0] and 'step 4/4' not in logs[1]
  assert 'batch 2 x (4, 16) (one per process) = 128 tokens' in logs[0]
  assert 'Process 1 of 2' in logs[1]
