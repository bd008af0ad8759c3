"""A run or data directory is data, never code (issue 29).

Someone who can write a run's directory (a shared file system) must not run
code as whoever evaluates, samples or resumes it: its config.gin is read as
data, planted links are never written through, a FIFO or device in a
checkpoint is refused, a damaged manifest of any shape falls back to the
intact checkpoint; and processes preparing the same data at once all end with
the same verified file.
"""

import glob
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import zipfile

import gin
import numpy as np
import pytest

import trax_hourglass as th
from trax_hourglass import checkpoints
from trax_hourglass import decoding
from trax_hourglass import runs
from trax_hourglass.data import text

from configurations import Payload  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'gin', 'quickstart.gin')


def _cli(script, *args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('TRAX_HOURGLASS_DEBUG', None)
  return subprocess.run(
      [sys.executable, '-m', f'trax_hourglass.cli.{script}', *args], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _one_error_line(result, prog):
  assert result.returncode != 0, result.stdout[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-4000:]
  errors = [l for l in result.stderr.splitlines()
            if l.startswith(f'{prog}: error: ')]
  assert len(errors) == 1, result.stderr[-4000:]
  return errors[0]


# --- 1. A run's config.gin is data. ----------------------------------------


def _attacked_run(tmp_path):
  """A run dir whose config.gin (quickstart's + 4 lines) makes trax's RLTask
  unpickle `trajectories.pkl` beside it, which would create `marker`."""
  run = tmp_path / 'run'
  run.mkdir()
  marker = str(tmp_path / 'RAN')
  with open(run / 'trajectories.pkl', 'wb') as f:
    pickle.dump({'all_epochs': [Payload(marker)]}, f)
  config = open(QUICKSTART).read() + (
      "\nRLTask.env = 'CartPole-v1'\nRLTask.max_steps = 0\n"
      f"RLTask.initial_trajectories = '{run}'\n"
      'trax_hourglass.HourglassLM.d_model = @trax.rl.task.RLTask()\n')
  (run / 'config.gin').write_text(config)
  # A committed checkpoint that reads (its weights need not fit: the attack
  # fires when the model is built, before they are loaded).
  data = pickle.dumps({'step': 1, 'flat_weights': [np.zeros(2, np.float32)],
                       'flat_state': [], 'input_signature': None})
  checkpoints.commit(str(run), 'model',
                     {'model.pkl.gz': lambda f: f.write(gzip.compress(data))},
                     1)
  return str(run), marker


def test_the_rltask_attack_is_refused_by_load_predict_model(tmp_path):
  run, marker = _attacked_run(tmp_path)
  with pytest.raises(runs.UnsafeConfigError,
                     match=r'config\.gin:\d+: refers to @trax\.rl\.task\.'
                           r'RLTask, refused'):
    decoding.load_predict_model([np.zeros(2, np.float32)],
                                config_file=os.path.join(run, 'config.gin'))
  with pytest.raises(runs.UnsafeConfigError):
    decoding.load_predict_model(run)  # Its config.gin by default.
  assert not os.path.exists(marker)


@pytest.mark.parametrize('script, prog, args', [
    ('evaluate', 'hourglass-eval', ['--byte_file', QUICKSTART]),
    ('sample', 'hourglass-sample', ['--n_tokens', '2']),
])
def test_the_rltask_attack_is_refused_by_eval_and_sample(tmp_path, script,
                                                         prog, args):
  run, marker = _attacked_run(tmp_path)
  before = sorted(os.listdir(run))
  error = _one_error_line(_cli(script, '--output_dir', run, *args), prog)
  assert 'refers to @trax.rl.task.RLTask, refused' in error, error
  assert 'config.gin:' in error, error
  assert not os.path.exists(marker)
  assert sorted(os.listdir(run)) == before


@pytest.mark.parametrize('line, says', [
    ('import os', "'import os'"),
    ('from __gin__ import dynamic_registration', 'dynamic_registration'),
    ("include '{outside}'", 'includes'),
    ("RLTask.initial_trajectories = 'x'", 'binds trax.rl.task.RLTask'),
    ('X = @trax.supervised.trainer_lib.train()', 'refers to @trax.supervised'),
    ('train.model = @no_such_thing', 'no such configurable'),
])
def test_a_config_that_could_run_code_is_refused_naming_file_and_line(
    tmp_path, line, says):
  outside = tmp_path / 'outside.gin'
  outside.write_text('train.steps = 1\n')
  run = tmp_path / 'run'
  run.mkdir()
  config = run / 'config.gin'
  config.write_text(open(QUICKSTART).read() + '\n' +
                    line.format(outside=outside) + '\n')
  n_lines = len(config.read_text().splitlines())
  with pytest.raises(runs.UnsafeConfigError) as e:
    runs.parse_run_config([str(config)])
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'{config}:{n_lines}: '), message
  assert says in message, message


def test_every_gin_file_and_a_trained_runs_config_still_load(tmp_path):
  for path in sorted(glob.glob(os.path.join(REPO, 'gin', '*.gin'))):
    assert callable(runs.parse_run_config([path])), path
  # What trax writes as a run's config.gin (every configurable it called).
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.gin').write_text(_OPERATIVE_CONFIG)
  model_fn = runs.parse_run_config([str(run / 'config.gin')])
  assert gin.query_parameter('trax_hourglass.HourglassLM.d_model') == 16
  assert model_fn is not None
  # An include inside the run is read (and checked) in its place.
  (run / 'model.gin').write_text(
      'trax_hourglass.HourglassLM.d_model = 24\n')
  (run / 'top.gin').write_text(
      _OPERATIVE_CONFIG + "include 'model.gin'\ntrain.steps = 9\n")
  runs.parse_run_config([str(run / 'top.gin')])
  assert gin.query_parameter('trax_hourglass.HourglassLM.d_model') == 24
  assert gin.query_parameter('train.steps') == 9
  (run / 'model.gin').write_text('import os\n')
  with pytest.raises(runs.UnsafeConfigError, match=r'model\.gin:1: '):
    runs.parse_run_config([str(run / 'top.gin')])


# The start of a tiny run's config.gin as trax 1.4.1 writes it.
_OPERATIVE_CONFIG = """import trax_hourglass

# Parameters for Adam:
# ==============================================================================
Adam.b1 = 0.9
Adam.clip_grad_norm = None
Adam.learning_rate = 0.0001

# Parameters for backend:
# ==============================================================================
backend.name = 'jax'

# Parameters for byte_file_inputs:
# ==============================================================================
byte_file_inputs.batch_size = 2
byte_file_inputs.path = '/tmp/low.txt'
byte_file_inputs.splits = (0.9, 0.05, 0.05)

# Parameters for debug_pipeline:
# ==============================================================================
debug_pipeline.debug = False

# Parameters for EvalTask:
# ==============================================================================
EvalTask.export_prefix = None

# Parameters for trax_hourglass.HourglassLM:
# ==============================================================================
trax_hourglass.HourglassLM.d_model = 16
trax_hourglass.HourglassLM.ff_activation = @trax.layers.FastGelu
trax_hourglass.HourglassLM.hierarchy = '2@4'
trax_hourglass.HourglassLM.vocab_size = 64

# Parameters for LayerNorm:
# ==============================================================================
LayerNorm.epsilon = 1e-06

# Parameters for multifactor:
# ==============================================================================
multifactor.constant = 0.002

# Parameters for num_devices:
# ==============================================================================
num_devices.value = None

# Parameters for ProgressReporter:
# ==============================================================================
ProgressReporter.unit = 'byte'

# Parameters for train:
# ==============================================================================
train.inputs = @trax_hourglass.byte_file_inputs
train.model = @trax_hourglass.HourglassLM
train.optimizer = @trax.optimizers.Adam
train.steps = 4

# Parameters for TrainTask:
# ==============================================================================
TrainTask.export_prefix = None

# Parameters for WeightedCategoryCrossEntropy:
# ==============================================================================
WeightedCategoryCrossEntropy.cutoff = 0.0
"""


# --- 4. Processes preparing one data dir at once. --------------------------

_PREPARE = r'''
import hashlib, os, sys, time
from trax_hourglass.data import text
data_dir, zip_sha256, sha256, n_bytes, ready, go = sys.argv[1:]
open(ready, 'w').close()
deadline = time.time() + 120
while not os.path.exists(go) and time.time() < deadline:  # The barrier.
  time.sleep(0.001)
path = text.enwik8_path(data_dir, download=False, sha256=sha256,
                        zip_sha256=zip_sha256, n_bytes=int(n_bytes))
with open(path, 'rb') as f:
  print(hashlib.sha256(f.read()).hexdigest())
'''


def test_processes_preparing_enwik8_at_once_all_get_the_whole_file(tmp_path):
  rng = np.random.default_rng(0)
  content = rng.integers(32, 48, 12_000_000).astype(np.uint8).tobytes()
  with zipfile.ZipFile(tmp_path / 'enwik8.zip', 'w', zipfile.ZIP_DEFLATED,
                       compresslevel=1) as z:
    z.writestr('enwik8', content)
  zip_sha256 = hashlib.sha256((tmp_path / 'enwik8.zip').read_bytes()).hexdigest()
  sha256 = hashlib.sha256(content).hexdigest()
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  go = str(tmp_path / 'go')
  children = []
  for i in range(3):
    ready = str(tmp_path / f'ready{i}')
    children.append((ready, subprocess.Popen(
        [sys.executable, '-c', _PREPARE, str(tmp_path), zip_sha256, sha256,
         str(len(content)), ready, go], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)))
  try:
    deadline = time.time() + 240
    while (not all(os.path.exists(r) for r, _ in children) and
           time.time() < deadline):
      time.sleep(0.01)
    open(go, 'w').close()  # All start unzipping at once.
    results = [p.communicate(timeout=240) + (p.returncode,)
               for _, p in children]
  finally:
    for _, p in children:
      if p.poll() is None:
        p.kill()
  for out, err, code in results:
    assert code == 0, err[-3000:]
    assert out.split() == [sha256]
  assert (tmp_path / 'enwik8').read_bytes() == content
  assert sorted(os.listdir(tmp_path)) == sorted(
      ['enwik8', 'enwik8.zip', 'go'] + [f'ready{i}' for i in range(3)])
  # A zip whose member is not what `sha256` says is refused, nothing kept.
  (tmp_path / 'enwik8').unlink()
  with pytest.raises(ValueError, match='unzips to 12,000,000 bytes with '
                     'sha256 .*, expected'):
    text.enwik8_path(str(tmp_path), download=False, sha256='0' * 64,
                     zip_sha256=zip_sha256, n_bytes=len(content))
  assert not os.path.exists(tmp_path / 'enwik8')
  assert not [e for e in os.listdir(tmp_path) if '.tmp-' in e]


# --- 2. Files are created, never followed; 3. any damaged manifest. --------


def _commit_two(out):
  """Commits checkpoints of steps 1 and 2 (plain pickles) in `out`."""
  for step in (1, 2):
    data = pickle.dumps({'step': step, 'flat_weights': [np.full(3, step,
                                                                np.float32)],
                         'input_signature': None, 'slots': []})
    checkpoints.commit(out, 'model', {
        'model.pkl.gz': lambda f, data=data: f.write(gzip.compress(data)),
        'extra.bin': lambda f: f.write(b'')}, step)
  return checkpoints.committed_folder(out)


def _edit_manifest(folder, edit):
  path = os.path.join(folder, checkpoints.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  manifest = edit(manifest)
  with open(path, 'w') as f:
    json.dump(manifest, f)


_BAD_MANIFESTS = {
    'files a list': lambda m: dict(m, files=list(m['files'])),
    'a record without bytes': lambda m: dict(m, files={
        k: {'sha256': r['sha256']} for k, r in m['files'].items()}),
    'a record a string': lambda m: dict(m, files={
        k: 'x' for k in m['files']}),
    'bytes a string': lambda m: dict(m, files={
        k: dict(r, bytes=str(r['bytes'])) for k, r in m['files'].items()}),
    'sha256 a number': lambda m: dict(m, files={
        k: dict(r, sha256=7) for k, r in m['files'].items()}),
    'a name outside the folder': lambda m: dict(m, files={
        '../' + k: r for k, r in m['files'].items()}),
    'step a string': lambda m: dict(m, step='2'),
    'not an object': lambda m: [m],
    'null': lambda m: None,
}


@pytest.mark.parametrize('damage', sorted(_BAD_MANIFESTS))
def test_a_manifest_of_any_wrong_shape_falls_back_to_the_intact_one(
    tmp_path, damage):
  out = str(tmp_path / 'run')
  newest = _commit_two(out)
  _edit_manifest(newest, _BAD_MANIFESTS[damage])
  ckpt = checkpoints.read_checkpoint(out)
  assert ckpt.step == 1 and ckpt.path != newest


@pytest.mark.parametrize('kind', ['fifo', 'link to /dev/zero', 'link'])
def test_a_checkpoint_file_that_is_not_a_regular_file_is_refused(tmp_path,
                                                                 kind):
  out = str(tmp_path / 'run')
  newest = _commit_two(out)
  extra = os.path.join(newest, 'extra.bin')  # The manifest says 0 bytes.
  os.unlink(extra)
  if kind == 'fifo':
    os.mkfifo(extra)
  elif kind == 'link to /dev/zero':
    os.symlink('/dev/zero', extra)
  else:  # A link to a file of the same (empty) content.
    (tmp_path / 'empty').write_bytes(b'')
    os.symlink(str(tmp_path / 'empty'), extra)
  # Refused (never read: a FIFO would hang, /dev/zero never end), falling
  # back to the intact checkpoint.
  ckpt = checkpoints.read_checkpoint(out)
  assert ckpt.step == 1
  with pytest.raises(checkpoints.CheckpointError, match='not a regular file'):
    checkpoints.store._verify_manifest(newest)  # pylint: disable=protected-access
  os.unlink(extra)
  os.mkfifo(extra)
  with pytest.raises(checkpoints.CheckpointError, match='FIFO'):
    checkpoints.read_arrays(extra)
  with pytest.raises(checkpoints.CheckpointError, match='FIFO'):
    checkpoints.safe_unpickle(extra)


def test_a_pointer_out_of_the_checkpoints_folder_is_not_followed(tmp_path):
  out = str(tmp_path / 'run')
  newest = _commit_two(out)
  elsewhere = str(tmp_path / 'elsewhere')
  shutil.copytree(newest, elsewhere)
  pointer = os.path.join(out, 'checkpoints', 'model', checkpoints.CURRENT)
  os.unlink(pointer)
  os.symlink(elsewhere, pointer)
  ckpt = checkpoints.read_checkpoint(out)
  assert ckpt.path == newest  # The newest folder beside it, not `elsewhere`.


@pytest.mark.parametrize('kind', ['symlink', 'directory', 'fifo'])
def test_a_planted_lock_is_refused_in_one_line_and_never_written(tmp_path,
                                                                 kind):
  out = tmp_path / 'run'
  (out / 'checkpoints').mkdir(parents=True)
  lock = out / 'checkpoints' / 'LOCK'
  victim = tmp_path / 'victim'
  victim.write_text('precious')
  if kind == 'symlink':
    os.symlink(victim, lock)
  elif kind == 'directory':
    lock.mkdir()
  else:
    os.mkfifo(lock)
  with pytest.raises(ValueError) as e:
    checkpoints.lock_output_dir(str(out))
  message = str(e.value)
  assert '\n' not in message and 'remove it' in message, message
  assert 'pass a file, not a directory' not in message
  assert {'symlink': 'symbolic link', 'directory': 'a directory',
          'fifo': 'FIFO'}[kind] in message, message
  assert victim.read_text() == 'precious'


def test_written_files_replace_planted_links_never_write_through(tmp_path):
  from trax_hourglass.cli import evaluate  # pylint: disable=g-import-not-at-top
  victim = tmp_path / 'victim'
  victim.write_text('precious')
  # hourglass-eval's JSON: links at its name and at the old temporary name.
  json_path = tmp_path / 'eval_test.json'
  os.symlink(victim, json_path)
  os.symlink(victim, str(json_path) + '.tmp')
  evaluate._check_writable(str(json_path))  # pylint: disable=protected-access
  evaluate._write_json(str(json_path), {'value': 1.5})  # pylint: disable=protected-access
  assert not os.path.islink(json_path)
  assert json.loads(json_path.read_text()) == {'value': 1.5}
  # The trainer's config.gin (trax's Loop writes it) and data counters.
  out = tmp_path / 'run'
  out.mkdir()
  os.symlink(victim, out / 'config.gin')
  os.symlink(victim, out / 'data_counters0.pkl')
  loop = type('Loop', (), {'is_chief': True, '_output_dir': str(out)})()
  th.Loop._save_gin(loop, None)  # pylint: disable=protected-access
  checkpoints.data_position.save_data_counters(str(out))
  assert not os.path.islink(out / 'config.gin')
  assert not os.path.islink(out / 'data_counters0.pkl')
  assert victim.read_text() == 'precious'
