"""Multi-host start-up and loss speak, in one line (issue 29).

Real `trainer` processes on this machine, one CPU device each: a coordinator
nobody serves, a process id given twice, and a process killed while the
others train each end the waiting processes with one `trainer: error:` line
(not jax's C++ abort) within a bounded time.
"""

import os
import signal
import time

import pytest

from test_multihost import corpus_fixture  # pylint: disable=unused-import
from test_multihost import free_port
from test_multihost import gin_file
from test_multihost import start
from test_multihost import wait_all


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


@pytest.mark.slow
def test_a_killed_process_ends_the_other_with_one_line(tmp_path, corpus):
  """2 processes x 1 CPU device: kill -9 one, the other says so and exits."""
  out = str(tmp_path / 'run')
  args = ['--config_file', gin_file(tmp_path, 100000, 2, eval_frequency=1000),
          '--output_dir', out, f"--config=byte_file_inputs.path='{corpus}'"]
  procs = start(2, 1, args, out, ['--heartbeat_timeout', '10'])
  try:
    deadline = time.time() + 180
    while 'step 5/' not in open(procs[0][1]).read():
      assert time.time() < deadline and procs[0][0].poll() is None, (
          open(procs[0][1]).read()[-3000:])
      time.sleep(0.2)
    os.kill(procs[1][0].pid, signal.SIGKILL)
    procs[0][0].wait(timeout=90)  # A hang fails here.
  finally:
    results = wait_all(procs, 1)
  line = _one_error_line(*results[0])
  assert line.startswith('trainer: error: process 0 of 2 lost contact with '
                         'another training process'), line
