"""Multi-host start-up and loss speak, in one line (issue 29).

Real `trainer` processes on this machine, one CPU device each: a coordinator
nobody serves, a process id given twice, and a process killed while the
others train each end the waiting processes with one `trainer: error:` line
(not jax's C++ abort) within a bounded time.
"""

import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from trax_hourglass.cli import supervise
from trax_hourglass.cli import trainer

from test_multihost import corpus_fixture  # pylint: disable=unused-import
from test_multihost import free_port
from test_multihost import gin_file
from test_multihost import start
from test_multihost import wait_all
from configurations import FAST_COMPILE_XLA_FLAGS  # pylint: disable=g-bad-import-order


def _one_error_line(rc, log):
  errors = [l for l in log.splitlines() if l.startswith('trainer: error:')]
  assert rc == 1 and len(errors) == 1, (rc, log[-3000:])
  assert 'Traceback' not in log and 'Aborted' not in log, log[-3000:]
  return errors[0]


def test_an_unserved_coordinator_is_one_line_after_the_timeout(tmp_path):
  address = f'127.0.0.1:{free_port()}'  # Nobody listens there.
  procs = start(1, 1, ['--coordinator_address', address, '--num_processes',
                       '2', '--process_id', '1', '--coordinator_timeout',
                       '3', '--output_dir', str(tmp_path / 'run')],
                str(tmp_path / 'run'))
  (rc, log), = wait_all(procs, 120)
  assert (f'Process 1 of 2: joining the coordinator at {address} (process '
          '0); waiting up to 3 s') in log, log[-3000:]
  line = _one_error_line(rc, log)
  assert line.startswith(
      f'trainer: error: process 1 of 2 could not join the coordinator at '
      f'{address} with all the other processes within 3 s: start every '
      'process with the same --coordinator_address'), line


@pytest.mark.slow
def test_a_second_process_0_is_one_line_and_so_is_the_wait(tmp_path):
  """Two processes given --process_id 0: the second finds the coordinator's
  port taken, the first waits for a process 1 that never comes."""
  address = f'127.0.0.1:{free_port()}'
  args = ['--output_dir', str(tmp_path / 'run'), '--num_processes', '2',
          '--coordinator_address', address, '--process_id', '0']
  first = start(1, 1, args + ['--coordinator_timeout', '15'],
                str(tmp_path / 'first'))
  try:
    deadline = time.time() + 120
    while 'coordinating at' not in open(first[0][1]).read():
      assert time.time() < deadline and first[0][0].poll() is None, (
          open(first[0][1]).read()[-3000:])
      time.sleep(0.2)
    (rc, log), = wait_all(start(1, 1, args, str(tmp_path / 'second')), 120)
  finally:
    (first_rc, first_log), = wait_all(first, 120)
  line = _one_error_line(rc, log)
  assert (f'--process_id=0 serves the coordinator at {address}, but port '
          f'{address.rpartition(":")[2]} is in use on this host: by another '
          'process 0 of this run') in line, line
  line = _one_error_line(first_rc, first_log)
  assert (f'the other processes did not all join the coordinator at {address}'
          ' within 15 s') in line, line


def _killed_process_run(tmp_path, corpus, killed):
  """2 processes x 1 CPU device: kill -9 process `killed` at step 5; the
  other's (exit code, log)."""
  out = str(tmp_path / 'run')
  args = ['--config_file', gin_file(tmp_path, 100000, 2, eval_frequency=1000),
          '--output_dir', out, f"--config=byte_file_inputs.path='{corpus}'"]
  procs = start(2, 1, args, out, ['--heartbeat_timeout', '10'])
  survivor = procs[1 - killed]
  try:
    deadline = time.time() + 180
    while 'step 5/' not in open(procs[0][1]).read():
      assert time.time() < deadline and procs[0][0].poll() is None, (
          open(procs[0][1]).read()[-3000:])
      time.sleep(0.2)
    os.kill(procs[killed][0].pid, signal.SIGKILL)
    survivor[0].wait(timeout=90)  # A hang fails here.
  finally:
    results = wait_all(procs, 1)
  return results[1 - killed]


def _no_runtime_dump(log):
  # jax's runtime logs its fatal error and stack trace before it aborts.
  assert not re.search(r'^F\d{4} |^\*\*\* Check failure|^\s+@\s+0x', log,
                       re.M), log[-3000:]


@pytest.mark.slow
def test_a_killed_process_ends_the_other_with_one_line(tmp_path, corpus):
  rc, log = _killed_process_run(tmp_path, corpus, killed=1)
  line = _one_error_line(rc, log)
  assert line.startswith('trainer: error: process 0 of 2 lost contact with '
                         'another training process'), line
  _no_runtime_dump(log)


def test_losing_process_0_ends_the_others_with_one_line(tmp_path, corpus):
  """Process 0 serves the coordinator: losing it, jax's runtime aborts every
  other process at once (a C++ stack dump), wherever it is."""
  rc, log = _killed_process_run(tmp_path, corpus, killed=0)
  line = _one_error_line(rc, log)
  assert line.startswith('trainer: error: process 1 of 2 lost contact with '
                         'another training process'), line
  _no_runtime_dump(log)


_DUMP = [
    b'E1207 17:31:12.289162   15243 coordination_service_agent.cc:455] '
    b'Polled an error from coordination service (this can be an error from '
    b'this or another task).\n',
    b'F1207 17:31:12.289300   15243 client.h:80] Terminating process because '
    b'the JAX distributed service detected fatal errors. absl::Status: '
    b'UNAVAILABLE: Failed to send RPC to coordination service.\n',
    b'*** Check failure stack trace: ***\n',
    b'    @     0x7f93a6040634  absl::log_internal::LogMessage::SendToLog()\n']


def _relayed(lines, code, who=(1, 2)):
  out = io.BytesIO()
  relay = supervise.Relay(out)
  for line in lines:
    relay.feed(line)
  code = relay.finish(code, who, trainer.lost_contact_line)
  return code, out.getvalue().decode()


def test_the_parent_turns_the_runtimes_abort_into_one_line():
  code, out = _relayed([b'step 5/9 | loss 1.0\n'] + _DUMP, -signal.SIGABRT)
  assert code == 1
  assert out.splitlines() == [
      'step 5/9 | loss 1.0',
      'trainer: error: process 1 of 2 lost contact with another training '
      'process (it stopped or its host is unreachable): Terminating process '
      'because the JAX distributed service detected fatal errors. '
      'absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. '
      'Relaunch all the processes to resume from the last checkpoint.']
  # The child's own line, when it got to say it, is the one line.
  own = b'trainer: error: process 1 of 2 lost contact (gloo).\n'
  assert _relayed(_DUMP + [own], 1) == (1, own.decode())


def test_the_parent_relays_everything_else_as_it_is():
  other = [b'F1207 17:31:12.289300   15243 foo.cc:1] Check failed: x\n',
           b'*** Check failure stack trace: ***\n']
  assert _relayed(other, -signal.SIGABRT) == (134, b''.join(other).decode())
  assert _relayed(_DUMP, 0) == (0, b''.join(_DUMP).decode())
  assert _relayed([b'trainer: stopped by SIGTERM\n'], 143) == (
      143, 'trainer: stopped by SIGTERM\n')


def test_a_signal_to_one_process_stops_all_after_the_same_step(
    tmp_path, corpus):
  """SIGTERM to process 1 only: both processes finish the same step, process 0
  commits its checkpoint, and each says so in one line (exit 143)."""
  out = str(tmp_path / 'run')
  args = ['--config_file', gin_file(tmp_path, 100000, 2, eval_frequency=1000),
          '--output_dir', out, f"--config=byte_file_inputs.path='{corpus}'"]
  procs = start(2, 1, args, out)
  try:
    deadline = time.time() + 180
    while 'step 5/' not in open(procs[0][1]).read():
      assert time.time() < deadline and procs[0][0].poll() is None, (
          open(procs[0][1]).read()[-3000:])
      time.sleep(0.2)
    os.kill(procs[1][0].pid, signal.SIGTERM)
    for p, _ in procs:
      p.wait(timeout=90)  # A hang fails here.
  finally:
    results = wait_all(procs, 1)
  steps = set()
  for rc, log in results:
    stopped = re.findall(r'^trainer: stopped by SIGTERM: saved the checkpoint '
                         r'of step (\d+) in ', log, re.M)
    assert rc == 143 and len(stopped) == 1, (rc, log[-3000:])
    assert 'Traceback' not in log and 'trainer: error' not in log, log[-3000:]
    steps.add(int(stopped[0]))
  assert len(steps) == 1, steps
  # The checkpoint committed is that step's.
  from trax_hourglass import checkpoints  # pylint: disable=g-import-not-at-top
  assert checkpoints.read_checkpoint(out).step == steps.pop()


# Each process joins as the trainer does, then runs one collective from a line
# of its own (the trainer's process 0 trains from another line than the rest).
_COLLECTIVE_FROM_OWN_LINE = '''
import sys
import numpy as np
from trax_hourglass.cli import trainer
args = trainer._parse_args(sys.argv[1:])
trainer.init_distributed(args)
import jax
from jax.experimental import multihost_utils
if jax.process_index() == 0:
  out = multihost_utils.broadcast_one_to_all(np.arange(3.0) + 1)
else:
  out = multihost_utils.broadcast_one_to_all(np.arange(3.0))
print('broadcast', out.tolist(), flush=True)
'''


def test_processes_calling_a_collective_from_different_lines_meet(tmp_path):
  """jax 0.12's gloo collectives hung when the programs differed only in the
  call stack they record; the distributed runtime records none."""
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  env['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
      [p for p in [os.environ.get('PYTHONPATH')] if p])
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  address = f'127.0.0.1:{free_port()}'
  procs = []
  for i in range(2):
    log = str(tmp_path / f'p{i}.log')
    with open(log, 'w') as f:
      procs.append((subprocess.Popen(
          [sys.executable, '-c', _COLLECTIVE_FROM_OWN_LINE,
           '--coordinator_address', address, '--num_processes', '2',
           '--process_id', str(i), '--heartbeat_timeout', '10'],
          env=env, stdout=f, stderr=subprocess.STDOUT), log))
  for code, log in wait_all(procs, timeout=120):
    assert code == 0, log[-2000:]
    assert 'broadcast [1.0, 2.0, 3.0]' in log, log[-2000:]
