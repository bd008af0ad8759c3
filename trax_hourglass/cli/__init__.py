"""Console scripts of trax_hourglass (`trainer`, `hourglass-eval`,
`hourglass-sample`)."""

import sys


def run_command(prog, parse_args, run, argv=None):
  """Runs a console script: a user's error prints one line and exits 1."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from trax_hourglass import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    run(args)
  except (ValueError, KeyError, FileNotFoundError,
          checkpoints.CheckpointError) as e:
    if args.traceback:
      raise
    print(f'{prog}: error: {e}\n(rerun with --traceback for details)',
          file=sys.stderr, flush=True)
    return 1
  return 0
