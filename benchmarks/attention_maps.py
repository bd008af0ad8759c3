"""What a trained hourglass attends to, over a paragraph of real text.

Loads a training run's weights into an eval-mode model, runs
`trax_hourglass.attention_maps` on a window of plain text from a byte file,
draws the head-averaged maps of a full-length layer, the attention pooling,
a shortened layer and the attention upsampling (PNG), and prints a table per
layer: the weight on the newest key a query sees (the "greedy" share; for
upsampling the latest shortened vector), that share under uniform attention
over the visible keys, the weight on the two newest keys, and the mean
distance attended, in tokens.

  python benchmarks/attention_maps.py --run RUN_DIR \\
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/attention

RUN_DIR is a trainer output dir (its config.gin and newest checkpoint) of an
HourglassLM with one shortened level and attention resampling, e.g.

  python -m trax_hourglass.cli.trainer --config_file=gin/quickstart.gin \\
      --config="train.inputs = @trax_hourglass.byte_file_inputs" \\
      --config="byte_file_inputs.path = '../shared/data/enwik8-head.xml'" \\
      --config="byte_file_inputs.sequence_length = 384" \\
      --config="trax_hourglass.HourglassLM.hierarchy = '2@1 2@3 2@1'" \\
      --config="train.eval_frequency = 100" --output_dir=RUN_DIR

`--quick` draws a tiny untrained model instead (a smoke test; the picture
means nothing).
"""

import argparse
import os
import re
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

# Plain prose: letters, digits, spaces and light punctuation (no wiki markup).
_PROSE = re.compile(rb'[A-Za-z0-9 ,.;:\'()-]+')


def prose_window(data, length, start):
  """The first `length` bytes of prose at or after `start`, from a sentence."""
  for match in re.finditer(rb'\. ([A-Z])', data[start:]):
    begin = start + match.start(1)
    window = data[begin:begin + length]
    if len(window) == length and _PROSE.fullmatch(window):
      return begin, window
  raise ValueError(f'no {length} bytes of plain prose after byte {start}; '
                   'pass a smaller --length or another --offset.')


def load_model(run_dir, length):
  """The run's model in eval mode, with its newest checkpoint's weights."""
  import trax_hourglass  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  model_fn = trax_hourglass.runs.parse_run_config(
      trax_hourglass.runs.run_configs([], run_dir))
  model = model_fn(mode='eval')
  model.init(shapes.ShapeDtype((1, length), np.int32))
  return trax_hourglass.load_trax_hourglass_weights(model, run_dir)


def quick_model(length):
  import trax_hourglass  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  model = trax_hourglass.HourglassLM(256, d_model=16, d_ff=16, n_heads=2,
                                     hierarchy='1@1 1@3 1@1', mode='eval')
  model.init(shapes.ShapeDtype((1, length), np.int32))
  return model


def _newest_key(n_queries, n_keys):
  """Index of the newest key each query sees (see `attention_maps`' masks)."""
  q = np.arange(n_queries)
  if n_keys > n_queries:  # Shortening: the query's own block ends there.
    return (n_keys // n_queries) * (q + 1) - 1
  return q // (n_queries // n_keys)


def positions(record, k):
  """(query ends, query span, key ends, key span), in full-length positions.

  Full-length position t has read tokens < t (the input shift), so its end
  is t and its span one token; shortened position i ends at k*i and spans k
  tokens; the shortening's keys are full-length positions shifted right by
  k-1 (key t is position t-k+1).
  """
  n_queries, n_keys = record.weights.shape[2:]
  full_q, full_k = np.arange(n_queries), np.arange(n_keys)
  return {'full': (full_q, 1, full_k, 1),
          'shortened': (k * full_q, k, k * full_k, k),
          'shortening': (k * full_q, k, full_k - (k - 1), 1),
          'upsampling': (full_q, 1, k * full_k, k)}[record.kind]


def layer_stats(record, k):
  """Per head: weight on the newest key, on the two newest, the newest's share
  under uniform attention, mean distance attended in tokens."""
  w = record.weights[0]  # (heads, queries, keys)
  n_queries, n_keys = w.shape[1:]
  newest = _newest_key(n_queries, n_keys)
  rows = np.arange(n_queries)
  greedy = w[:, rows, newest].mean(-1)
  newest_two = greedy + np.where(newest > 0, w[:, rows, newest - 1], 0).mean(-1)
  uniform = np.mean(1.0 / (newest + 1))
  q_end, _, k_end, _ = positions(record, k)
  distance = (w * (q_end[:, None] - k_end[None, :]).clip(0)).sum(-1)
  return greedy, newest_two, uniform, distance.mean(-1)


def labels(text, ends, span):
  """Tick labels: the bytes a position has read last ('^': none yet)."""
  return [text[max(0, end - span):max(0, end)].decode('latin-1') or '^'
          for end in ends]


def draw(maps, k, text, path, title):
  """One panel per map: head-mean weights, the text on the axes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 5.6))
  for ax, record in zip(np.atleast_1d(axes), maps):
    weights = record.weights[0].mean(0)
    ax.imshow(weights ** 0.5, cmap='viridis', interpolation='nearest',
              aspect='auto')
    q_end, q_span, k_end, k_span = positions(record, k)
    for ticks, tick_labels in ((ax.set_yticks, labels(text, q_end, q_span)),
                               (ax.set_xticks, labels(text, k_end, k_span))):
      ticks(range(len(tick_labels)), tick_labels, fontfamily='monospace',
            fontsize=3.5 if len(tick_labels) > 40 else 6)
    ax.tick_params(axis='x', labelrotation=90, length=0)
    ax.tick_params(axis='y', length=0)
    ax.set_title(f'{record.name} ({record.kind}, x{record.shorten_factor}): '
                 f'{weights.shape[0]} queries x {weights.shape[1]} keys',
                 fontsize=9)
    ax.set_xlabel('keys (the bytes read last)', fontsize=8)
    ax.set_ylabel('queries', fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--run', help='trainer output dir (config.gin and a '
                      'checkpoint).')
  parser.add_argument('--data', required=True,
                      help='byte file for the text, e.g. '
                      '../shared/data/enwik8-head.xml.')
  parser.add_argument('--offset', type=int, default=None,
                      help='look for prose from this byte (default: the start '
                      'of the held-out 10%%, unseen in training).')
  parser.add_argument('--length', type=int, default=96,
                      help='bytes of text, a multiple of the shorten factor.')
  parser.add_argument('--out', default='benchmarks/results/attention',
                      help='folder for attention_maps.png.')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny untrained model (smoke test).')
  args = parser.parse_args(argv)
  if not args.quick and not args.run:
    parser.error('give --run RUN_DIR (a trainer output dir), or --quick.')
  if not os.path.isfile(args.data):
    parser.error(f'--data {args.data} is not a file; pass a byte file, e.g. '
                 '../shared/data/enwik8-head.xml.')
  if args.length < 3:
    parser.error(f'--length {args.length} is too short; use e.g. 96.')
  with open(args.data, 'rb') as f:
    data = f.read()
  offset = int(len(data) * 0.9) if args.offset is None else args.offset
  try:
    begin, text = prose_window(data, args.length, offset)
    model = quick_model(args.length) if args.quick else load_model(
        args.run, args.length)
  except (ValueError, FileNotFoundError) as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  import trax_hourglass  # pylint: disable=g-import-not-at-top
  maps = trax_hourglass.attention_maps(
      model, np.frombuffer(text, np.uint8)[None].astype(np.int32))
  by_name = {record.name: record for record in maps}
  level = 'level1/'
  if level + 'shortened/0' not in by_name:
    parser.exit(2, f'{parser.prog}: error: the model has no shortened level; '
                'draw a run of an hourglass, e.g. hierarchy 2@1 2@3 2@1.\n')
  k = by_name[level + 'shortened/0'].shorten_factor
  print(f'Text: bytes {begin}..{begin + len(text)} of {args.data}: '
        f'{text.decode()!r}\n')
  print('| layer | kind | newest key: share (mean of heads) | per head | '
        'uniform | two newest: per head | mean distance (tokens) |')
  print('| :--- | :--- | ---: | :--- | ---: | :--- | ---: |')
  for record in maps:
    greedy, newest_two, uniform, distance = layer_stats(record, k)
    print(f'| {record.name} | {record.kind} | {greedy.mean():.2f} | '
          f'{" ".join(f"{g:.2f}" for g in greedy)} | {uniform:.2f} | '
          f'{" ".join(f"{g:.2f}" for g in newest_two)} | '
          f'{distance.mean():.1f} |')
  names = ['pre/0', level + 'shortening', level + 'shortened/0',
           level + 'upsampling']
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'attention_maps.png')
  draw([by_name[n] for n in names if n in by_name], k, text, path,
       'Head-averaged attention weights (square root, brighter = more) over '
       f'{len(text)} bytes of held-out text' +
       (' [--quick: untrained]' if args.quick else ''))
  print(f'\nWrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
