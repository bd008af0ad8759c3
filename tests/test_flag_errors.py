"""The trainer's flags and gin files as a user gets them wrong (issue 29).

Flag values reach gin as literals, never as gin text; a gin syntax error, a
zero eval frequency, a `LOCK` directory and a missing temporary directory are one line each; a run resumed with another
model, data file or batch size than it started with is refused in one line.
Refused before anything compiles: in-process, cheap (one subprocess where the
error comes before any handler).
"""

import os
import re
import resource
import signal

import gin
import pytest

from trax_hourglass import checkpoints
from trax_hourglass import data
from trax_hourglass import runs
from trax_hourglass.cli import trainer

from test_user_errors import QUICKSTART, _assert_one_line_error, _cli  # pylint: disable=g-bad-import-order


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()  # Unlocks a config an earlier test finalized.
  yield
  gin.clear_config()
  data.set_default_data_dir(None)  # --data_dir sets it.


def _one_line(capsys, *args):
  """trainer.main(args): exit 1 and its one error line."""
  assert trainer.main(list(args)) == 1
  err = [l for l in capsys.readouterr().err.splitlines()
         if l.startswith('trainer: ')]
  assert len(err) == 1 and err[0].startswith('trainer: error: '), err
  assert err[0].endswith('(--debug shows the traceback)')
  return err[0]


# Refused after parsing, before anything runs: shows the values arrived.
STOP_AFTER_PARSING = '--config=train.use_loop=False'


@pytest.mark.parametrize('value', ["it's", 'a"b\'c', 'x\nimport os',
                                   'back\\slash'])
def test_data_dir_and_dataset_reach_gin_as_literals(capsys, tmp_path, value):
  line = _one_line(capsys, '--config_file', QUICKSTART, '--output_dir',
                   str(tmp_path / 'run'), f'--data_dir={value}',
                   f'--dataset={value}', STOP_AFTER_PARSING)
  assert 'train.use_loop=False' in line, line
  assert gin.query_parameter('data_streams.data_dir') == value
  assert gin.query_parameter('data_streams.dataset_name') == value


def test_a_model_name_is_a_name_not_gin_text(capsys, tmp_path):
  line = _one_line(capsys, '--config_file', QUICKSTART, '--output_dir',
                   str(tmp_path / 'run'),
                   '--model=TransformerLM\nimport trax_hourglass.cli.sample',
                   STOP_AFTER_PARSING)
  assert "--model='TransformerLM\\nimport trax_hourglass.cli.sample' is not " \
         'a model name; pass one of trax.models, e.g. TransformerLM' in line


def test_gin_syntax_errors_name_the_flag_or_file_and_line(capsys, tmp_path):
  line = _one_line(capsys, '--config_file', QUICKSTART, '--output_dir',
                   str(tmp_path / 'run'), '--config=train.steps==')
  assert ("gin syntax error in --config='train.steps==', line 1: Couldn't "
          "parse statement, expected ':' or '='") in line, line
  bad = tmp_path / 'unclosed.gin'
  bad.write_text('train.steps = 3\ntrax_hourglass.HourglassLM.vanilla_layers '
                 '= (1,\n')
  line = _one_line(capsys, '--config_file', str(bad), '--output_dir',
                   str(tmp_path / 'run'))
  # Python 3.13's tokenizer names the line the bracket opened in, 3.11's the end.
  assert f'gin syntax error in {bad}' in line, line
  assert re.search(r'line [23]\b', line), line
  assert 'unclosed bracket' in line


@pytest.mark.parametrize('value', ['0', '-5'])
def test_a_zero_eval_frequency_is_one_line(capsys, tmp_path, value):
  line = _one_line(capsys, '--config_file', QUICKSTART, '--output_dir',
                   str(tmp_path / 'run'), f'--config=train.eval_frequency='
                   f'{value}')
  assert (f'train.eval_frequency={value}: the Loop evaluates and saves a '
          'checkpoint every eval_frequency steps; use a positive integer'
          ) in line, line


def test_a_lock_directory_says_what_it_is(tmp_path):
  os.makedirs(tmp_path / 'run' / 'checkpoints' / 'LOCK')
  with pytest.raises(ValueError, match=r'checkpoints/LOCK is a directory, '
                     'where the trainer keeps its lock file; move it away'):
    checkpoints.lock_output_dir(str(tmp_path / 'run'))


def _no_temporary_directory():
  """As if every temporary directory were full: no file may grow."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_no_temporary_directory_at_start_up_is_one_line():
  result = _cli('trainer', '--config_file', QUICKSTART, '--output_dir',
                '/nonexistent/run', preexec_fn=_no_temporary_directory,
                timeout=120)
  _assert_one_line_error(result, 'trainer',
                         r'no usable temporary directory \(.*\); free disk '
                         'space there, or set TMPDIR to a writable directory')


# --- Resuming with other settings. ----------------------------------------


def _settings(batch_size=8, path='a.txt', d_model=16, processes=1):
  gin.clear_config()
  gin.parse_config(f"""
      train.model = @trax_hourglass.HourglassLM
      train.inputs = @trax_hourglass.byte_file_inputs
      byte_file_inputs.path = '{path}'
      byte_file_inputs.batch_size = {batch_size}
      trax_hourglass.HourglassLM.d_model = {d_model}
      trax_hourglass.HourglassLM.ff_activation = @trax.layers.FastGelu
  """)
  settings = runs.run_settings()
  settings['processes'] = processes
  return settings


def test_resuming_with_another_model_data_or_batch_is_refused(tmp_path):
  out = str(tmp_path)
  runs.check_run_settings(out, _settings(), resuming=False)
  assert os.path.isfile(os.path.join(out, runs.RUN_SETTINGS))
  runs.check_run_settings(out, _settings(), resuming=True)  # The same: fine.
  for changed, message in [
      (dict(path='b.txt'), "train.inputs.bindings.path: 'a.txt' -> 'b.txt'"),
      (dict(batch_size=4), 'train.inputs.bindings.batch_size: 8 -> 4'),
      (dict(d_model=32), 'train.model.bindings.d_model: 16 -> 32'),
      (dict(processes=2), 'processes: 1 -> 2')]:
    with pytest.raises(ValueError) as e:
      runs.check_run_settings(out, _settings(**changed), resuming=True)
    text = str(e.value)
    assert '\n' not in text and message in text, text
    assert f'{out} was started with other settings than these' in text
    assert f'remove {os.path.join(out, runs.RUN_SETTINGS)} to resume' in text
  # Not resuming (no checkpoint yet): the new settings are recorded.
  runs.check_run_settings(out, _settings(d_model=32), resuming=False)
  runs.check_run_settings(out, _settings(d_model=32), resuming=True)
