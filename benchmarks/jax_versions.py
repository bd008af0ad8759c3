"""Training speed and compile time of `ours` on several Python/jax installs.

    python benchmarks/jax_versions.py --pythons /venvs/jax0438/bin/python,/venvs/jax010/bin/python

Each interpreter (a venv with this package's dependencies, e.g. one per
`constraints/*.txt`) runs `train_speed.py --models ours --rounds 1` in its own
process, the interpreters alternating, `--rounds` times each, so that the
machine's load falls on every install alike. The same model and batch in each:
the installs differ only in their packages. Prints medians and the ratio to the
first interpreter. A round whose JSON is already in `--out` is not run again.
"""

import argparse
import json
import os
import subprocess
import sys

import harness

TRAIN_SPEED = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'train_speed.py')


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pythons', required=True,
                      help='comma-separated interpreters; the first is the '
                           'baseline of the ratios')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=5,
                      help='timed training steps per round (after 2 untimed, '
                           'the first of which compiles)')
  parser.add_argument('--out', default='/tmp/jax_versions',
                      help='folder for each round\'s JSON')
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.steps < 1:
    parser.error(f'--rounds {args.rounds} and --steps {args.steps} must be >= 1')
  args.pythons = args.pythons.split(',')
  for python in args.pythons:
    if not os.access(python, os.X_OK):
      parser.error(f'--pythons: {python} is not an executable interpreter')
  return args


def _round(python, i, r, args):
  """One train_speed.py run (a fresh process) of `python`; its record."""
  path = os.path.join(args.out, f'python{i}_round{r}.json')
  if not os.path.exists(path):
    subprocess.run([python, TRAIN_SPEED, '--models', 'ours', '--rounds', '1',
                    '--steps', str(args.steps), '--matmul_size', '0',
                    '--json', path], env=harness.worker_env(), check=True)
  with open(path) as f:
    runs = [run for run in json.load(f)['runs'] if run['status'] == 'ok']
  if not runs:
    raise SystemExit(f'{python} failed in round {r}: see {path}')
  return runs[0]


def main(argv=None):
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  os.makedirs(args.out, exist_ok=True)
  runs = [[] for _ in args.pythons]
  for r in range(args.rounds):
    for i, python in enumerate(args.pythons):
      runs[i].append(_round(python, i, r, args))
  base_speed = harness.median([x['tokens_per_s'] for x in runs[0]])
  base_warmup = harness.median([x['warmup_s'] for x in runs[0]])
  rows = []
  for python, rs in zip(args.pythons, runs):
    speed = harness.median([x['tokens_per_s'] for x in rs])
    warmup = harness.median([x['warmup_s'] for x in rs])
    rows.append([
        rs[0]['jax'], python, harness.fmt(speed),
        f"{harness.fmt(min(x['tokens_per_s'] for x in rs))}–"
        f"{harness.fmt(max(x['tokens_per_s'] for x in rs))}",
        f'{speed / base_speed:.2f}×', harness.fmt(warmup, ',.1f'),
        f'{warmup / base_warmup:.2f}×'])
  cfg = runs[0][0]
  print(f"\n`ours`, {cfg['batch']} x {cfg['seq_len']} tokens per step, "
        f'{args.rounds} rounds each (medians), interpreters alternating:\n')
  print(harness.markdown_table(
      ['jax', 'python', 'tokens/s', 'min–max', 'vs first',
       'warmup s (compiles)', 'vs first'], rows))


if __name__ == '__main__':
  main()
