"""SIGTERM and SIGINT stop the trainer with a committed checkpoint (issue 29).

A real `trainer` process on a tiny run, signalled once it has trained a few
steps: it finishes the step, commits the checkpoint of it, says so in one line
and exits 128 + the signal; rerunning resumes at that step. A storm of
SIGTERMs (some landing during the save) leaves the checkpoint intact.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from trax_hourglass import checkpoints

from test_user_errors import QUICKSTART, REPO, TINY  # pylint: disable=g-bad-import-order


def _start(out, data, *extra):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('TRAX_HOURGLASS_DEBUG', None)
  log = open(out + '.log', 'w')  # pylint: disable=consider-using-with
  err = open(out + '.err', 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, '-m', 'trax_hourglass.cli.trainer', '--config_file',
       QUICKSTART, '--output_dir', out,
       f"--config=byte_file_inputs.path='{data}'", *TINY,
       '--config=train.steps=100000', '--config=train.eval_frequency=1000',
       *extra], cwd=REPO, env=env, stdout=log, stderr=err)
  log.close()
  err.close()
  return proc


def _read(path):
  with open(path) as f:
    return f.read()


def _signal_after(proc, out, step, signum, storm=False, timeout=240):
  """Sends `signum` once `step` printed (`storm`: every 20 ms until it exits);
  returns (exit status, stdout, stderr)."""
  deadline = time.time() + timeout
  try:
    while not re.search(rf'^step {step}/', _read(out + '.log'), re.M):
      assert proc.poll() is None and time.time() < deadline, (
          _read(out + '.err')[-3000:])
      time.sleep(0.1)
    proc.send_signal(signum)
    while storm and proc.poll() is None and time.time() < deadline:
      try:
        proc.send_signal(signum)
      except ProcessLookupError:
        break
      time.sleep(0.02)
    proc.wait(timeout=max(1, deadline - time.time()))
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=60)
  return proc.returncode, _read(out + '.log'), _read(out + '.err')


def _stopped_line(stderr, name, out):
  lines = [l for l in stderr.splitlines() if l.startswith('trainer: ')]
  assert len(lines) == 1 and 'Traceback' not in stderr, stderr[-4000:]
  match = re.fullmatch(
      rf'trainer: stopped by {name}: saved the checkpoint of step (\d+) in '
      rf'{re.escape(out)}; rerun the same command to resume from it\.',
      lines[0])
  assert match, lines[0]
  return int(match.group(1))


@pytest.fixture(name='stopped', scope='module')
def stopped_fixture(tmp_path_factory):
  """A run stopped by a storm of SIGTERMs after step 3."""
  tmp = tmp_path_factory.mktemp('stop')
  data = tmp / 'low.txt'
  rng = np.random.default_rng(0)
  data.write_bytes(bytes(rng.integers(32, 64, 20_000).astype(np.uint8)))
  out = str(tmp / 'run')
  result = _signal_after(_start(out, data), out, 3, signal.SIGTERM,
                         storm=True)
  return out, str(data), result


def test_sigterm_saves_the_current_step_even_when_repeated(stopped):
  out, _, (rc, stdout, stderr) = stopped
  assert rc == 143, stderr[-4000:]
  step = _stopped_line(stderr, 'SIGTERM', out)
  assert step >= 3 and re.search(rf'^step {step}/', stdout, re.M)
  ckpt = checkpoints.read_checkpoint(out)  # Verifies the manifest.
  assert ckpt.step == step and ckpt.manifest['step'] == step
  assert checkpoints.committed_folder(out).endswith(
      os.path.basename(ckpt.path))
  assert 'Finished training' not in stdout


@pytest.mark.slow  # SIGTERM above covers the default suite.
def test_sigint_after_a_resume_saves_and_the_rerun_resumes_there(
    stopped, tmp_path):
  first, data, (_, _, stderr) = stopped
  step = _stopped_line(stderr, 'SIGTERM', first)
  out = str(tmp_path / 'run')
  subprocess.run(['cp', '-a', first, out], check=True)
  rc, stdout, stderr = _signal_after(_start(out, data), out, step + 2,
                                     signal.SIGINT)
  assert f'Resumed from the checkpoint at step {step} in {out}' in stdout
  assert rc == 130, stderr[-4000:]
  again = _stopped_line(stderr, 'SIGINT', out)
  assert again >= step + 2 and re.search(rf'^step {again}/', stdout, re.M)
  assert checkpoints.read_checkpoint(out).step == again


def test_resuming_with_another_batch_size_is_refused_in_one_line(stopped):
  from test_user_errors import _assert_one_line_error, _cli  # pylint: disable=g-import-not-at-top
  out, data, _ = stopped
  result = _cli('trainer', '--config_file', QUICKSTART, '--output_dir', out,
                f"--config=byte_file_inputs.path='{data}'", *TINY,
                '--config=byte_file_inputs.batch_size=4', timeout=240)
  _assert_one_line_error(
      result, 'trainer', rf'{re.escape(out)} was started with other settings '
      r'than these \(train.inputs.bindings.batch_size: 2 -> 4\): resuming')
