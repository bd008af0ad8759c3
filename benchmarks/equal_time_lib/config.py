"""equal_time.py's command line and the config each run resolves from it.

A run's config is the reference configuration, with what its suite changes
(`Suites.suite_config`), and every flag given on top; --quick starts from the
tiny sizes instead. `resolve` checks it (one line per user error).
"""

import dataclasses
import math
import os

import boundaries
import harness
from equal_time_lib import data
from equal_time_lib import variants as registry
from equal_time_lib.train import COMPILE_STEPS

QUICK_STEPS = 3  # --quick --suite with an equal-steps budget.


@dataclasses.dataclass(frozen=True)
class Suites:
  """What equal_time.py defines: its suites and configurations, its file."""
  suites: dict  # suite: its variants, the reference first.
  suite_config: dict  # suite: what it changes of `reference`.
  reference: dict
  quick: dict
  doc: str  # The script's docstring (--help).
  script: str  # The script's path: workers run it.

  @property
  def all_variants(self):
    return tuple(dict.fromkeys(v for vs in self.suites.values() for v in vs))


def parser(suites):
  """The flags: harness's shared ones, the suite, the data, the sizes."""
  flags = harness.benchmark_parser(
      suites.doc, quick='Smoke test: tiny sizes, ~10 s per variant, XLA '
      'optimization off; explicit flags below still override.',
      timeout='2 * --seconds + 1200; 10 * with --clock cpu; none with --steps')
  flags.add_argument('--data', metavar='PATH',
                     help='Byte file to train and score on (required), '
                     'e.g. ../shared/data/enwik8-head.xml.')
  flags.add_argument('--suite', choices=sorted(suites.suites), default='claim',
                     help='Which variants to run (default %(default)s).')
  flags.add_argument('--variants',
                     help='Comma-separated variants instead of --suite\'s, '
                     f'from {",".join(suites.all_variants)}.')
  flags.add_argument('--jobs', type=int, default=1,
                     help='Variants trained at once (default 1); more than '
                     'one needs --clock cpu.')
  flags.add_argument('--clock', choices=('wall', 'cpu'), default=None,
                     help='What --seconds counts: wall seconds, XLA on every '
                     'core (default; an idle machine), or the worker\'s CPU '
                     'seconds, XLA on one thread (a shared machine).')
  flags.add_argument('--out', metavar='DIR',
                     help='Write equal_time.json and equal_time.png '
                     '(validation bits/byte vs training time) here.')
  harness.add_config_flags(flags, suites.reference, suites.quick, [
      ('seconds', float),
      ('steps', int, 'Train this many steps each instead (0: --seconds).'),
      ('seq_len', int, 'Images: their H * W * C.'), ('batch', int),
      ('d_model', int), ('d_ff', int), ('n_heads', int), ('hierarchy', str),
      ('dropout', float), ('learning_rate', float), ('warmup_steps', int),
      ('eval_points', int), ('eval_batches', int),
      ('test_batches', int, '0 = every whole test window.'),
      ('probe_positions', int), ('lsh_chunk_len', int)])
  return flags


def resolve(args, variants, suites):
  """The run's config from `args`, or SystemExit saying what would work."""
  suite = suites.suite_config.get(args.suite, {})
  cfg = harness.config_from_args(
      args, dict(suites.reference, **suite),
      dict(suites.quick, steps=QUICK_STEPS if suite.get('steps') else 0))
  if not args.data:
    raise SystemExit('--data PATH is required: a byte file to train on, e.g. '
                     '../shared/data/enwik8-head.xml.')
  if not os.path.isfile(args.data):
    raise SystemExit(f'--data {args.data}: no such file.')
  cfg['data'] = os.path.abspath(args.data)
  boundaries.configure(cfg, variants)
  if (cfg['seconds'] <= 0 or cfg['eval_points'] < 1 or
      cfg['eval_batches'] < 1 or cfg['test_batches'] < 0 or
      cfg['probe_positions'] < 1 or cfg['steps'] < 0 or
      cfg['steps'] == COMPILE_STEPS):
    raise SystemExit('--seconds, --eval_points, --eval_batches and '
                     '--probe_positions must be positive, --test_batches >= 0, '
                     f'--steps 0 or more than {COMPILE_STEPS}.')
  if data.is_images(cfg):
    cfg['seq_len'] = data.image_length(args, cfg)
  if args.jobs < 1 or (args.jobs > 1 and cfg['clock'] != 'cpu'):
    raise SystemExit(f'--jobs {args.jobs}: use 1, or more with --clock cpu '
                     '(variants training at once share the wall clock).')
  _check_lengths(cfg, variants)
  n_bytes = os.path.getsize(cfg['data'])
  smallest = math.floor(0.95 * n_bytes) - math.floor(0.9 * n_bytes)
  if not data.is_images(cfg) and smallest < cfg['seq_len']:
    raise SystemExit(f'--data {args.data}: {n_bytes:,} bytes is too small for '
                     f'--seq_len {cfg["seq_len"]} (5% of it is validation, 5% '
                     'test).')
  return cfg


def _check_lengths(cfg, variants):
  """SystemExit unless every variant's shortenings divide --seq_len."""
  hierarchies = {v: registry.variant_hierarchy(v, cfg) for v in variants}
  for v in variants:
    for other in registry.factors(v, cfg)[1]:
      hierarchies[f'{v}@{other}'] = registry.with_factor(cfg['hierarchy'],
                                                         other, v)
  for name, hierarchy in hierarchies.items():
    multiple = registry.parsed(hierarchy).total_factor if hierarchy else 1
    if cfg['seq_len'] % multiple:
      raise SystemExit(f'--seq_len {cfg["seq_len"]} must be divisible by '
                       f'{multiple}, the shortening of {name} (hierarchy '
                       f'{hierarchy!r}).')
  if 'lsh' in variants:
    lengths = [cfg['seq_len']] + [
        cfg['seq_len'] // level.total_factor
        for level in registry.parsed(cfg['hierarchy']).levels]
    bad = [n for n in lengths if (2 * n) % cfg['lsh_chunk_len']]
    if bad:
      raise SystemExit(
          f'lsh: 2 * length must be a multiple of --lsh_chunk_len '
          f'{cfg["lsh_chunk_len"]} at every level; lengths {lengths}.')
