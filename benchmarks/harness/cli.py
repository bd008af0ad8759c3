"""Command lines: the flags every benchmark shares, its config, its entry.

A script is both a parent and a worker: `main` runs its parent, or with the
hidden `--_worker NAME --_config JSON` flags one measurement in this process.
A script's config is its reference (or --quick) dict with every flag the user
gave on top (`add_config_flags`, `config_from_args`).
"""

import argparse
import json
import sys

from harness.models import ABLATION_MODELS
from harness.models import ALL_MODELS

QUICK_NOTE = (' [--quick: XLA optimization off, smoke test only, not a '
              'measurement]')


def benchmark_parser(doc, quick, timeout, models=None, json_help=None,
                     plot_help=None):
  """The shared flags: --quick, --worker_timeout, the hidden worker flags, and
  if given --models, --json, --plot."""
  parser = argparse.ArgumentParser(
      description=doc.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  if models is not None:
    parser.add_argument('--models', default=','.join(models),
                        help='Comma-separated subset of %(default)s'
                        + (', or the ablation ' + ','.join(ABLATION_MODELS)
                           + ' (see benchmarks/harness/models.py)'
                           if models == ALL_MODELS else '') + '.')
  parser.add_argument('--quick', action='store_true', help=quick)
  if json_help:
    parser.add_argument('--json', metavar='PATH',
                        help=f'Also write {json_help} here.')
  if plot_help:
    parser.add_argument('--plot', metavar='PATH',
                        help=f'PNG of {plot_help} (default: the --json path '
                        'with .png, else no plot).')
  parser.add_argument('--worker_timeout', type=float, default=None,
                      help=f'Seconds before a worker is killed (default '
                      f'{timeout}).')
  # Internal: run one measurement in this process (spawned by the parent).
  parser.add_argument('--_worker', metavar='MODEL', help=argparse.SUPPRESS)
  parser.add_argument('--_config', help=argparse.SUPPRESS)
  return parser


def add_config_flags(parser, reference, quick, flags):
  """A --name flag per (name, type[, help]) overriding `config_from_args`'s."""
  for name, type_, *text in flags:
    # None = "take it from the reference (or --quick) configuration".
    parser.add_argument(f'--{name}', type=type_, default=None,
                        help=' '.join(text + [
                            f'Default {reference[name]!r} ({quick[name]!r} '
                            'with --quick).']))


def config_from_args(args, reference, quick, skip=()):
  """`quick` if args.quick else `reference`, with every flag the user gave.

  A flag overrides the config key of its name when it is not None; names in
  `skip` are left for the caller (flags that need parsing).
  """
  cfg = dict(quick if args.quick else reference)
  for name in cfg:
    value = getattr(args, name, None)
    if value is not None and name not in skip:
      cfg[name] = value
  return cfg


def main(parser, worker, parent, argv=None):
  """A script's entry: `worker(name, cfg)` with --_worker, else `parent(args)`.

  Both return the exit status; `args.argv` is the command line.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  args.argv = argv
  if args._worker:  # pylint: disable=protected-access
    return worker(args._worker, json.loads(args._config))  # pylint: disable=protected-access
  return parent(args)


def parse_int_tuple(text):
  """'2,2' or '(2, 2)' -> (2, 2)."""
  return tuple(int(x) for x in text.strip('()[] ').split(',') if x.strip())


def parse_names(text, known, flag='--models'):
  """'a,b' -> ['a', 'b']; SystemExit naming the unknown ones."""
  names = [m.strip() for m in text.split(',') if m.strip()]
  unknown = sorted(set(names) - set(known))
  if unknown or not names:
    raise SystemExit(f'Unknown {flag} {unknown}; choose from '
                     f'{",".join(known)}.')
  return names
