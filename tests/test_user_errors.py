"""Every user error, through the command line as a user meets it (issue 14).

Each case runs `python -m trax_hourglass.cli.<script> ...` in a fresh process
and expects: a nonzero exit, no traceback, exactly one `<prog>: error: ...`
line saying what, which value and what would work, and nothing lost (the
run's files unchanged, no code run from a crafted pickle). The cases that are
refused before any model compiles run by default (a CLI process costs ~6 s of
imports); the rest of the table and the cases that need training (a damaged
pointer, copies, divergence, a full disk, a stale lock) run with -m slow.
"""

import contextlib
import gzip
import hashlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'gin', 'quickstart.gin')

# gin/quickstart.gin with a tiny model on a tiny byte file: vocab 64, since
# the run's data (LOW) holds only bytes below 64.
TINY = ['--config=train.inputs=@trax_hourglass.byte_file_inputs',
        '--config=byte_file_inputs.batch_size=2',
        '--config=byte_file_inputs.sequence_length=32',
        '--config=trax_hourglass.HourglassLM.vocab_size=64',
        '--config=trax_hourglass.HourglassLM.d_model=16',
        '--config=trax_hourglass.HourglassLM.d_ff=32',
        '--config=trax_hourglass.HourglassLM.n_heads=2',
        '--config=train.steps=4', '--config=train.eval_frequency=2',
        '--config=train.eval_steps=1', '--config=final_sample.length=0',
        '--config=ProgressReporter.every_secs=0']


def _cli(script, *args, preexec_fn=None, timeout=600, debug_env=False):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('TRAX_HOURGLASS_DEBUG', None)
  if debug_env:
    env['TRAX_HOURGLASS_DEBUG'] = '1'
  return subprocess.run(
      [sys.executable, '-m', f'trax_hourglass.cli.{script}', *args], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=timeout,
      preexec_fn=preexec_fn, check=False)


_PROG = {'trainer': 'trainer', 'evaluate': 'hourglass-eval',
         'sample': 'hourglass-sample'}


def _assert_one_line_error(result, script, pattern):
  prog = _PROG[script]
  assert result.returncode != 0, result.stdout[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-4000:]
  errors = [l for l in result.stderr.splitlines()
            if l.startswith(f'{prog}: error: ')]
  assert len(errors) == 1, result.stderr[-4000:]
  assert re.search(pattern, errors[0]), errors[0]
  assert errors[0].endswith(('(--debug shows the traceback)',
                             f'(see {prog} --help)')), errors[0]


def _train(out, data, *extra):
  result = _cli('trainer', '--config_file', QUICKSTART, '--output_dir', out,
                f"--config=byte_file_inputs.path='{data}'", *TINY, *extra)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _snapshot(directory):
  """{relative path: sha256 or link target} of everything under `directory`."""
  found = {}
  for dirpath, dirnames, filenames in os.walk(directory):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, directory)
      if os.path.islink(path):
        found[rel] = 'link:' + os.readlink(path)
      elif os.path.isfile(path):
        with open(path, 'rb') as f:
          found[rel] = hashlib.sha256(f.read()).hexdigest()
  return found


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A trained tiny run, a diverged copy of it and a crafted (evil) one."""
  from configurations import Payload  # pylint: disable=g-import-not-at-top
  from trax_hourglass import checkpoints  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('user_errors')
  rng = np.random.default_rng(0)
  low = tmp / 'low.txt'  # Bytes 32..63 only: ' ', digits, punctuation.
  low.write_bytes(bytes(rng.integers(32, 64, 20_000).astype(np.uint8)))
  text = tmp / 'text.txt'
  text.write_bytes(b'the quick brown fox jumps over the lazy dog. ' * 400)
  base = str(tmp / 'base')
  _train(base, low)

  nan = str(tmp / 'nan')  # The same checkpoint, its weights made NaN.
  shutil.copytree(base, nan, symlinks=True)
  folder = checkpoints.committed_folder(nan)
  files = {}
  for name in os.listdir(folder):
    if name == checkpoints.MANIFEST:
      continue
    with open(os.path.join(folder, name), 'rb') as f:
      content = f.read()
    if name == 'model.weights.npy.gz':
      arrays = checkpoints.read_arrays(os.path.join(folder, name))
      files[name] = checkpoints.format.arrays_writer(
          [np.full_like(a, np.nan) for a in arrays], 2)
    else:
      files[name] = lambda f, content=content: f.write(content)
  checkpoints.commit(nan, 'model', files, 4)

  evil = tmp / 'evil'  # A plain trax output dir whose pickle runs code.
  evil.mkdir()
  shutil.copy(os.path.join(base, 'config.gin'), evil / 'config.gin')
  marker = str(tmp / 'CODE_RAN')
  with open(evil / 'model.pkl.gz', 'wb') as f:
    f.write(gzip.compress(pickle.dumps({'step': 1, 'x': Payload(marker)})))
  return dict(tmp=str(tmp), low=str(low), text=str(text), base=base, nan=nan,
              evil=str(evil), marker=marker, gin=QUICKSTART)


@contextlib.contextmanager
def _lock_held_by_another_process(output_dir):
  """A process holding the trainer lock as the trainer does (no trax import)."""
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import fcntl, os, socket, sys, time\n'
       'os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n'
       'fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n'
       'fcntl.flock(fd, fcntl.LOCK_EX)\n'
       'os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}"'
       '.encode())\n'
       'print("locked", flush=True)\n'
       'time.sleep(600)\n',
       os.path.join(output_dir, 'checkpoints', 'LOCK')],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    yield holder
  finally:
    if holder.poll() is None:
      holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)


@contextlib.contextmanager
def _read_only(path):
  """Makes `path` (recursively) unwritable, for root too (chattr +i)."""
  if os.geteuid() == 0:
    paths = [path] + [os.path.join(d, n) for d, dirs, files in os.walk(path)
                      for n in dirs + files
                      if not os.path.islink(os.path.join(d, n))]
    if shutil.which('chattr') is None or subprocess.run(
        ['chattr', '+i'] + paths, capture_output=True, check=False).returncode:
      subprocess.run(['chattr', '-i'] + paths, capture_output=True, check=False)
      pytest.skip('running as root without chattr +i: nothing is read-only')
    undo = ['chattr', '-i'] + paths
  else:
    subprocess.run(['chmod', '-R', 'a-w', path], check=True)
    undo = ['chmod', '-R', 'u+w', path]
  try:
    yield
  finally:
    subprocess.run(undo, check=False)


# (id, script, arguments, expected error (regex), runs in the default suite).
# Arguments are formatted with the `runs` fixture's paths.
CASES = [
    # trainer: refused before anything compiles.
    ('use_loop=False', 'trainer',
     ['--config_file', '{gin}', '--output_dir', '{evil}',
      '--config=train.use_loop=False'],
     r"train.use_loop=False runs trax's old Trainer, whose checkpoints are "
     r'neither crash-safe nor read safely; remove the binding', True),
    ('gin text for a number', 'trainer',
     ['--config_file', '{gin}', '--output_dir', '{tmp}/abc',
      "--config=trax_hourglass.HourglassLM.d_model='abc'"],
     r"gin binding trax_hourglass.HourglassLM.d_model='abc' is text; it must "
     r'be an integer \(its default is 512\)', True),
    ('config file is a directory', 'trainer',
     ['--config_file', '{tmp}', '--output_dir', '{tmp}/cfg'],
     r'--config_file \S+ is a directory; pass a gin file', False),
    ('output dir is a file', 'trainer',
     ['--config_file', '{gin}', '--output_dir', '{low}'],
     r'output dir \S+low.txt is a file, not a directory; pass a directory',
     False),
    ('data file is a directory', 'trainer',
     ['--config_file', '{gin}', '--output_dir', '{tmp}/datadir',
      "--config=train.inputs=@trax_hourglass.byte_file_inputs",
      "--config=byte_file_inputs.path='{tmp}'"],
     r'Is a directory: \S+ \(pass a file, not a directory\)', False),
    ('token ids past the vocabulary', 'trainer',
     ['--config_file', '{gin}', '--output_dir', '{tmp}/v64',
      "--config=byte_file_inputs.path='{text}'"] + TINY,
     r"text.txt \(train split\): holds token id 122, outside the model's "
     r'vocabulary \[0, 64\); use a model with vocab_size >= 123', True),
    ('unknown flag', 'trainer', ['--config_file', '{gin}', '--bogus'],
     r'unrecognized arguments: --bogus', False),
    # hourglass-eval.
    ('eval --stride=0', 'evaluate', ['--output_dir', '{base}', '--stride=0'],
     r'--stride=0; use 1 or more', True),
    ('eval --sequence_length=0', 'evaluate',
     ['--output_dir', '{base}', '--sequence_length=0'],
     r'--sequence_length=0; use 2 or more', False),
    ('eval --sequence_length=-3', 'evaluate',
     ['--output_dir', '{base}', '--sequence_length=-3'],
     r'--sequence_length=-3; use 2 or more', False),
    ('eval --max_bytes=-9000', 'evaluate',
     ['--output_dir', '{base}', '--max_bytes=-9000'],
     r'--max_bytes=-9000; use 2 or more', False),
    ('eval --byte_file with --npz', 'evaluate',
     ['--output_dir', '{base}', '--byte_file={text}', '--npz=x.npz'],
     r'--byte_file and --npz are two kinds of data; pass one', False),
    ('eval --batch_size=0', 'evaluate',
     ['--output_dir', '{base}', '--batch_size=0'],
     r'--batch_size=0; use 1 or more', False),
    ('eval --json=<dir>', 'evaluate', ['--output_dir', '{base}',
                                       '--json={tmp}'],
     r'--json=\S+ is a directory; pass a file path', False),
    ('eval ids past the vocabulary', 'evaluate',
     ['--output_dir', '{base}', '--byte_file={text}'],
     r"text.txt \[test: bytes [\d,]+\.\.[\d,]+\): holds token id \d+, outside "
     r"the model's vocabulary \[0, 64\)", True),
    ('eval non-finite weights', 'evaluate', ['--output_dir', '{nan}'],
     r'model.weights.npy.gz \(step 4\): weight array 0 \([\d, ]+\) holds '
     r'[\d,]+ NaN '
     r'or infinite values \(the run diverged\)', True),
    ('eval crafted pickle', 'evaluate', ['--output_dir', '{evil}'],
     r'evil/model.pkl.gz: refusing to load os.makedirs', True),
    ('eval config is a directory', 'evaluate',
     ['--output_dir', '{base}', '--config_file={tmp}'],
     r'gin config \S+ is a directory; pass a gin file', False),
    # hourglass-sample.
    ('sample --n_tokens=1e9', 'sample',
     ['--output_dir', '{base}', '--n_tokens=1e9'],
     r"argument --n_tokens: invalid int value: '1e9'", False),
    ('sample --n_tokens=1000000000', 'sample',
     ['--output_dir', '{base}', '--n_tokens=1000000000'],
     r'--n_tokens=1000000000: the caches for 1,000,000,000 tokens x batch 1 '
     r'need [\d,.]+ GiB, more than fits in the [\d,.]+ GiB of .*; ask for at '
     r'most [\d,]+ tokens', True),
    ('sample non-finite weights', 'sample', ['--output_dir', '{nan}'],
     r'holds [\d,]+ NaN or infinite values \(the run diverged\)', False),
    ('sample crafted pickle', 'sample', ['--output_dir', '{evil}'],
     r'refusing to load os.makedirs', True),
    ('sample config is a directory', 'sample',
     ['--output_dir', '{base}', '--config_file={tmp}'],
     r'--config_file \S+ is a directory; pass a gin file', False),
]


@pytest.mark.parametrize('case', [
    pytest.param(c, id=c[0], marks=() if c[4] else pytest.mark.slow)
    for c in CASES])
def test_user_error_is_one_line_and_loses_nothing(runs, case):
  _, script, args, pattern, _ = case
  before = {d: _snapshot(runs[d]) for d in ('base', 'nan', 'evil')}
  result = _cli(script, *[a.format(**runs) for a in args])
  _assert_one_line_error(result, script, pattern)
  assert not os.path.exists(runs['marker']), 'code ran from a pickle'
  for d, snapshot in before.items():
    assert _snapshot(runs[d]) == snapshot, f'{d} changed'


def test_a_second_trainer_is_refused_naming_the_holder(runs):
  out = os.path.join(runs['tmp'], 'locked')
  with _lock_held_by_another_process(out) as holder:
    result = _cli('trainer', '--config_file', QUICKSTART, '--output_dir', out,
                  f"--config=byte_file_inputs.path='{runs['low']}'", *TINY)
  _assert_one_line_error(
      result, 'trainer', rf'output dir \S+locked is in use by another trainer '
      rf'\(pid {holder.pid} on host \S+\); wait for it to finish or stop it')


@pytest.mark.parametrize('how', [
    '--debug', pytest.param('--traceback', marks=pytest.mark.slow),
    pytest.param('TRAX_HOURGLASS_DEBUG=1', marks=pytest.mark.slow)])
def test_debug_shows_the_traceback(runs, how):
  args = ['--config_file', runs['tmp'], '--output_dir', runs['tmp'] + '/dbg']
  if how.startswith('--'):
    args.append(how)
  result = _cli('trainer', *args, debug_env=not how.startswith('--'))
  assert result.returncode != 0 and 'Traceback' in result.stderr
  assert 'is a directory; pass a gin file' in result.stderr


# --- Cases that need training: -m slow. ------------------------------------


def _copy(runs, name):
  out = os.path.join(runs['tmp'], name)
  shutil.copytree(runs['base'], out, symlinks=True)
  return out


def _resume(runs, out, *extra, preexec_fn=None):
  return _cli('trainer', '--config_file', QUICKSTART, '--output_dir', out,
              f"--config=byte_file_inputs.path='{runs['low']}'", *TINY,
              '--config=train.steps=6', *extra, preexec_fn=preexec_fn)


def _steps(out):
  from trax_hourglass import checkpoints  # pylint: disable=g-import-not-at-top
  root = os.path.join(out, checkpoints.CHECKPOINTS_DIR, 'model')
  return sorted(int(e[5:14]) for e in os.listdir(root) if e.startswith('step_'))


@pytest.mark.slow
def test_missing_pointer_resumes_from_the_newest_intact_and_says_so(runs):
  out = _copy(runs, 'no_pointer')
  os.unlink(os.path.join(out, 'checkpoints', 'model', 'CURRENT'))
  result = _resume(runs, out)
  assert result.returncode == 0, result.stderr[-4000:]
  assert re.search(r'CURRENT is missing; using the newest intact checkpoint, '
                   r'\S+step_000000004\.\w+ \(step 4\)', result.stderr)
  assert 'Resumed from the checkpoint at step 4' in result.stdout
  assert _steps(out) == [4, 6]


@pytest.mark.slow
@pytest.mark.parametrize('how', ['cp -rL', 'cp -r'])
def test_a_copy_resumes_and_keeps_saving(runs, how):
  out = os.path.join(runs['tmp'], how.replace(' ', ''))
  subprocess.run(how.split() + [runs['base'], out], check=True)
  result = _resume(runs, out)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Resumed from the checkpoint at step 4' in result.stdout
  assert 6 in _steps(out)
  assert os.path.islink(os.path.join(out, 'checkpoints', 'model', 'CURRENT'))


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_naming_both(runs):
  out = _copy(runs, 'corrupt')
  root = os.path.join(out, 'checkpoints', 'model')
  newest = os.path.realpath(os.path.join(root, 'CURRENT'))
  with open(os.path.join(newest, 'model.opt_slots0.npy.gz'), 'ab') as f:
    f.write(b'garbage')
  result = _resume(runs, out)
  assert result.returncode == 0, result.stderr[-4000:]
  assert re.search(rf'the newest checkpoint {re.escape(newest)} is damaged: '
                   r'.*; using the newest intact checkpoint, \S+step_000000002'
                   r'\.\w+ \(step 2\)', result.stderr)
  assert 'Resumed from the checkpoint at step 2' in result.stdout


@pytest.mark.slow
def test_divergence_stops_naming_the_step_and_keeps_the_finite_checkpoint(
    runs):
  from trax_hourglass import checkpoints  # pylint: disable=g-import-not-at-top
  out = _copy(runs, 'diverged')
  result = _resume(runs, out, '--config=multifactor.constant=1e30',
                   '--config=train.steps=12')
  _assert_one_line_error(result, 'trainer',
                         r'training diverged: the loss is nan at step \d+; '
                         r'stopping \(the last finite checkpoint is kept\)')
  ckpt = checkpoints.read_checkpoint(out)
  checkpoints.check_finite(ckpt.flat_weights, 'kept')
  assert ckpt.step >= 4


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_no_partial_folder(runs):
  import resource  # pylint: disable=g-import-not-at-top
  from trax_hourglass import checkpoints  # pylint: disable=g-import-not-at-top
  out = _copy(runs, 'full')
  limit = os.path.getsize(os.path.join(out, 'model.weights.npy.gz')) - 512

  def small_files():  # A file may not grow past `limit`: like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

  result = _resume(runs, out, preexec_fn=small_files)
  _assert_one_line_error(
      result, 'trainer', r'could not save the checkpoint of step \d+ \(File '
      r'too large\); the previous checkpoint is kept. Free disk space')
  root = os.path.join(out, 'checkpoints', 'model')
  assert not [e for e in os.listdir(root) if '.tmp-' in e]
  assert checkpoints.read_checkpoint(out).step == 4


@pytest.mark.slow
def test_a_stale_lock_of_a_killed_trainer_does_not_block(runs):
  out = _copy(runs, 'stale')
  with _lock_held_by_another_process(out) as holder:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    result = _resume(runs, out)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Resumed from the checkpoint at step 4' in result.stdout


@pytest.mark.slow
def test_a_read_only_output_dir_and_run_are_one_line(runs):
  parent = os.path.join(runs['tmp'], 'ro_parent')
  os.makedirs(parent)
  out = _copy(runs, 'ro_run')
  before = _snapshot(out)
  with _read_only(parent), _read_only(out):
    result = _resume(runs, os.path.join(parent, 'run'))
    _assert_one_line_error(
        result, 'trainer', r'(Operation not permitted|Permission denied): '
        r"'\S+ro_parent/run\S*' \(use a path you may write to")
    result = _cli('evaluate', '--output_dir', out)
    _assert_one_line_error(
        result, 'evaluate',
        r"(Operation not permitted|Permission denied): '\S+ro_run/"
        r"eval_test.json.probe-\d+' \(use a path you may write to")
  assert _snapshot(out) == before


@pytest.mark.slow
def test_trainer_resume_refuses_a_crafted_pickle(runs):
  result = _cli('trainer', '--config_file', QUICKSTART, '--output_dir',
                runs['evil'], f"--config=byte_file_inputs.path='{runs['low']}'",
                *TINY)
  _assert_one_line_error(result, 'trainer',
                         r'evil/model.pkl.gz: refusing to load os.makedirs')
  assert not os.path.exists(runs['marker'])
