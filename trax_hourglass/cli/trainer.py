"""`trainer`: trains a gin-configured model (`trax_hourglass.train`).

    trainer --config_file=gin/quickstart.gin --output_dir=~/runs/quick
    trainer --config_file=gin/enwik8_hourglass.gin --data_dir=~/data \
        --config='train.steps=1000' --output_dir=~/runs/enwik8

Flags are trax's trainer's (`--config_file`, `--config` bindings applied after
the files, `--output_dir`, `--data_dir`, `--dataset`, `--model`); gin files use
trax's bindings plus this project's configurables. Rerunning the same command
after a crash or `kill -9` resumes at the last checkpoint (crash-safe, see
`trax_hourglass.checkpoints`) with the same weights, slots and data position.
Multi-host: one process per host, with `--coordinator_address`,
`--num_processes`, `--process_id` (or their $JAX_* variables, or none in a
SLURM job or TPU pod slice); batch sizes are then per process, and process 0
prints and writes the checkpoints. Progress is one line (the last field: the
compute precision, `--dtype`):
  step 1200/5000 | loss 1.0412 | 1.502 bits/byte | 8.1k tok/s | 0.25 s/step | left 0:15:50 | float32
"""

import argparse
import contextlib
import os
import re
import sys
import traceback

import gin
import numpy as np

from trax_hourglass import cli
from trax_hourglass.cli import run_command
from trax_hourglass.cli import supervise
# pylint: disable=g-importing-member,unused-import
from trax_hourglass.cli.distributed import _detected_cluster
from trax_hourglass.cli.distributed import distributed_settings
from trax_hourglass.cli.distributed import init_distributed
from trax_hourglass.cli.distributed import lost_a_process
from trax_hourglass.cli.distributed import lost_contact_line
from trax_hourglass.cli.distributed import one_of_several
# pylint: enable=g-importing-member,unused-import


def _parse_args(argv):
  parser = cli.ArgumentParser(
      prog='trainer', description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config_file', action='append', default=[],
                      help='gin config file (repeatable)')
  parser.add_argument('--config', action='append', default=[],
                      help="gin binding, e.g. 'train.steps=100' (repeatable)")
  parser.add_argument('--output_dir', default=None,
                      help='where checkpoints and summaries go; a run resumes '
                           'from the checkpoint there')
  parser.add_argument('--data_dir', default=None,
                      help='directory with the data (enwik8, TFDS data)')
  parser.add_argument('--dataset', default=None,
                      help="trax's data_streams.dataset_name")
  parser.add_argument('--model', default=None,
                      help='a model in trax.models, e.g. TransformerLM')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                      help="compute precision: binds train.model's dtype, "
                           'e.g. HourglassLM.dtype (weights stay float32)')
  multihost = parser.add_argument_group(
      'multi-host training (one process per host; none of these on one host)')
  multihost.add_argument(
      '--coordinator_address', default=None,
      help='host:port of process 0, reachable from every process '
           '(default $JAX_COORDINATOR_ADDRESS)')
  multihost.add_argument('--num_processes', default=None,
                         help='number of processes (default $JAX_NUM_PROCESSES)')
  multihost.add_argument('--process_id', default=None,
                         help="this process's index, 0..num_processes-1 "
                              '(default $JAX_PROCESS_ID)')
  multihost.add_argument(
      '--coordinator_timeout', default='300',
      help='seconds to wait for all the processes to join the coordinator '
           'before giving up with an error (default 300, as jax)')
  multihost.add_argument(
      '--heartbeat_timeout', default='100',
      help='seconds without a heartbeat after which the processes give up on '
           'a lost one and exit (default 100, as jax)')
  return parser.parse_args(argv)


def run(args):
  """Parses gin, trains; returns the trax Loop."""
  n_processes = init_distributed(args)
  if n_processes == 1:
    return _train(args)
  import jax  # pylint: disable=g-import-not-at-top
  from trax_hourglass import compat  # pylint: disable=g-import-not-at-top
  if (jax.default_backend() == 'cpu' and jax.local_device_count() > 1 and
      compat.multiprocess_cpu_training_hangs()):
    # Refuse rather than hang (every process stops here, alike).
    raise ValueError(
        f'{jax.local_device_count()} CPU devices per process hang '
        f'multi-process training with jax {jax.__version__} (its CPU runtime '
        'deadlocks in cross-process collectives); use one CPU device per '
        'process, one process, GPUs/TPUs, or jax 0.4.38 (pip install -e . '
        '-c constraints/oldest.txt)')
  try:
    if not jax.process_index():
      return _train(args)
    # Process 0 prints for all (errors still show).
    print(f'Process {jax.process_index()} of {n_processes}: training with '
          f'{jax.local_device_count()} local device(s); process 0 prints '
          'the progress and writes the checkpoints.', flush=True)
    with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
      return _train(args)
  except Exception as e:  # pylint: disable=broad-except
    if not lost_a_process(e):
      raise
    if cli.wants_traceback(args):
      traceback.print_exc()
    print(lost_contact_line(jax.process_index(), n_processes, e),
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Exiting normally would wait on jax's shutdown barrier for the lost
    # process, and then abort.
    os._exit(1)  # pylint: disable=protected-access


def _train(args):
  """`run` after the distributed runtime is up: flags -> gin -> `train`."""
  from trax_hourglass import data  # pylint: disable=g-import-not-at-top
  from trax_hourglass import progress  # pylint: disable=g-import-not-at-top
  from trax_hourglass import training  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  bindings = [(f'--config={b!r}', b) for b in args.config]
  # Flag values reach gin as literals (repr), never as gin text.
  if args.dataset:
    bindings.append(('--dataset',
                     f'data_streams.dataset_name={args.dataset!r}'))
  if args.data_dir:
    data.set_default_data_dir(os.path.expanduser(args.data_dir))
    bindings.append(('--data_dir', f'data_streams.data_dir={args.data_dir!r}'))
  if args.model:
    if not re.fullmatch(r'[A-Za-z_]\w*', args.model):
      raise ValueError(f'--model={args.model!r} is not a model name; pass '
                       'one of trax.models, e.g. TransformerLM')
    bindings.append(('--model', f'train.model=@trax.models.{args.model}'))
  cli.check_gin_files(args.config_file)
  cli.parse_gin(args.config_file, bindings)
  cli.check_gin_value_types()
  try:
    loop = training.train(args.output_dir, dtype=args.dtype)
  except progress.TrainingStopped as stopped:  # Exit 128 + the signal.
    print(f'trainer: {stopped.message}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    raise SystemExit(stopped.exit_code) from None
  settings = progress.final_sample()
  if settings['length'] > 0 and not jax.process_index():  # Printed by 0.
    _print_sample(loop, settings)
  return loop


def _print_sample(loop, settings):
  """Samples from the trained weights in predict mode (`decoding.sample`)."""
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  prompt = np.frombuffer(settings['prompt'].encode('utf-8'), np.uint8)
  model = decoding.load_predict_model(
      loop.model.weights,
      model_fn=gin.query_parameter('train.model').scoped_configurable_fn,
      max_len=len(prompt) + settings['length'])
  out = decoding.sample(model, settings['length'],
                        prompt=prompt if len(prompt) else None,
                        temperature=settings['temperature'],
                        seed=settings['seed'])[0]
  text = (prompt.tobytes() + bytes(np.clip(out, 0, 255).astype(np.uint8))
          ).decode('utf-8', errors='replace')
  kind = 'greedy' if settings['temperature'] <= 0 else (
      f'temperature {settings["temperature"]}')
  print(f'Sample ({kind}, {settings["length"]} bytes after the prompt):\n'
        f'{text}', flush=True)


def main(argv=None):
  """Console entry point: `trainer --config_file=... --output_dir=...`."""
  argv = sys.argv[1:] if argv is None else list(argv)
  who = one_of_several(argv, _parse_args)
  if who:  # jax aborts on a lost process: a parent reports it in one line.
    return supervise.run(argv, who if None not in who else None,
                         lost_contact_line, debug='--debug' in argv)
  return run_command('trainer', _parse_args, run, argv)


if __name__ == '__main__':
  sys.exit(main())
