"""Where dynamic pooling ends its segments, over a paragraph of real text.

Draws (PNG) and prints the segment boundaries the models of the equal-time
benchmark's `boundaries` suite learned: one row per variant, the paragraph's
bytes with each segment shaded and its end marked, and a table of the
average shortening each achieved (bytes per segment) on the test split.

  python benchmarks/equal_time.py --suite boundaries \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/boundaries
  python benchmarks/boundaries.py benchmarks/results/boundaries/equal_time.json

The suite: `fixed` (the hourglass's pooling every k bytes, segment means and
upsampling from the previous complete segment, as the dynamic levels do),
`whitespace`, `entropy`, `gumbel` and `unigram` boundaries
(`HourglassLM(boundaries=...)`), all with the same layers. k is the divisor of
--seq_len nearest the mean distance between whitespace bytes of the training
split: the fixed factor, the dynamic variants' target segment length and
gumbel's prior rate 1/k. unigram's SentencePiece model is trained on the start
of the training split, and its k is the divisor nearest the mean segment
length of its targets there (shorter than words: the shortened length must
hold its segments). After training, off the clock, each worker records
`trax_hourglass.segment_boundaries` of its model on the test windows (bytes
per segment, and the share of positions past the static bound of the
shortened length) and on the first window of plain prose in the test split
(the picture). This script reads them from the benchmark's JSON (several:
variants of runs made apart); it builds no model.
"""

import argparse
import atexit
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np

import harness  # pylint: disable=g-bad-import-order

KINDS = ('fixed', 'whitespace', 'entropy', 'gumbel', 'unigram')
# The unigram variant's SentencePiece model: trained on this much of the
# training split, with at most this many pieces.
UNIGRAM_BYTES = 2_000_000
UNIGRAM_VOCAB = 16384
# The bytes 'whitespace' ends segments after (its default boundary_tokens).
WHITESPACE = b' \t\r\n'


# ------------------------------------------------- equal_time.py's workers --


def _nearest_divisor(mean, seq_len):
  """The divisor of seq_len nearest `mean` (the smaller of two): a factor k."""
  divisors = [d for d in range(2, seq_len + 1) if seq_len % d == 0]
  return min(divisors, key=lambda d: (abs(d - mean), d))


def _split(path, split):
  """A split of a byte file: 'train' or 'test' of the 90/5/5 of
  `trax_hourglass.data.text` (its file offset, its bytes)."""
  n = os.path.getsize(path)
  start, end = {'train': (0, math.floor(0.9 * n)),
                'test': (math.floor(0.95 * n), n)}[split]
  return start, np.memmap(path, np.uint8, 'r')[start:end]


def fixed_factor(path, seq_len):
  """(mean bytes per whitespace segment of the byte file's training split,
  the divisor k of seq_len nearest it): the fixed variant's factor and the
  dynamic variants' target segment length."""
  rate = np.isin(_split(path, 'train')[1],
                 np.frombuffer(WHITESPACE, np.uint8)).mean()
  mean = 1 / rate if rate else float(seq_len)
  return float(mean), _nearest_divisor(mean, seq_len)


def unigram_factor(path, seq_len, model_path):
  """Trains a SentencePiece unigram model (`UNIGRAM_VOCAB` pieces at most) on
  the first `UNIGRAM_BYTES` of the training split into `model_path`; returns
  (mean bytes per segment of its targets there, the divisor of seq_len
  nearest it): the unigram variant's target segment length."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  from trax_hourglass.layers import segmentation  # pylint: disable=g-import-not-at-top
  sample = np.asarray(_split(path, 'train')[1][:UNIGRAM_BYTES])
  text = sample.tobytes()
  with open(model_path, 'wb') as f:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=(text[i:i + 4000].decode('utf-8', 'ignore')
                           for i in range(0, len(text), 4000)),
        model_writer=f, vocab_size=UNIGRAM_VOCAB, hard_vocab_limit=False,
        model_type='unigram', num_threads=1, max_sentence_length=16384,
        minloglevel=2)
  windows = sample[:len(sample) // seq_len * seq_len].reshape(-1, seq_len)
  ends = segmentation.unigram_boundaries(
      np.pad(windows, ((0, 0), (1, 0)))[:, :-1], model_path)
  mean = ends.size / max(ends.sum(), 1)
  return float(mean), _nearest_divisor(mean, seq_len)


def configure(cfg, variants):
  """Sets the suite's factors in `cfg` (and trains the unigram model into a
  folder removed at exit: it is made again, the same, from the data)."""
  if not set(variants) & set(KINDS):
    return
  cfg['whitespace_segment'], cfg['boundary_factor'] = fixed_factor(
      cfg['data'], cfg['seq_len'])
  if 'unigram' in variants:
    folder = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, folder, True)
    cfg['sentencepiece_model'] = os.path.join(folder, 'unigram.model')
    cfg['unigram_segment'], cfg['unigram_factor'] = unigram_factor(
        cfg['data'], cfg['seq_len'], cfg['sentencepiece_model'])


def factor(variant, cfg):
  """The variant's hierarchy factor k: its target segment length."""
  return cfg['unigram_factor' if variant == 'unigram' else 'boundary_factor']


def model_kwargs(variant, cfg):
  """HourglassLM arguments of a variant (hierarchy factor k set by the caller)."""
  from trax_hourglass import layers as L  # pylint: disable=g-import-not-at-top
  if variant == 'fixed':  # The dynamic levels' pooling, every k positions.
    return dict(downsampling_fn=L.AveragePooling,
                upsampling_fn=L.NaiveUpsampling)
  return dict(boundaries=variant, sentencepiece_model=cfg.get(
      'sentencepiece_model'))


def loss_layer(variant):
  """The training loss of a variant: learned boundaries add their own term."""
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax_hourglass.layers import boundaries  # pylint: disable=g-import-not-at-top
  if variant in boundaries.LEARNED:
    return boundaries.LossWithBoundaries()
  return tl.WeightedCategoryCrossEntropy()


def record_boundaries(model_fn, weights, batches, k, path, record):
  """Boundary statistics of a trained variant into `record` (off the clock).

  `model_fn(mode=...)` builds it, `batches` are the test split's windows of
  the byte file at `path`. segment_length: test positions per boundary (the
  average shortening); past_bound: the share of positions after more segments
  than the shortened length holds (they read a stale vector); paragraph: the
  first window of prose in the test split: its offset, text and the ends.
  """
  import attention_maps  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  import trax_hourglass  # pylint: disable=g-import-not-at-top
  from trax_hourglass.layers import boundaries  # pylint: disable=g-import-not-at-top
  seq_len = batches[0].shape[1]
  fixed = record['variant'] == 'fixed'
  if not fixed:
    model = model_fn(mode='eval')
    model.init(shapes.ShapeDtype(batches[0].shape, np.int32))
    model.weights = weights

  def ends_of(tokens):
    if fixed:  # Blocks of k positions; the shortened length is len/k.
      return np.broadcast_to(np.arange(tokens.shape[1]) % k == k - 1,
                             tokens.shape)
    return np.asarray(trax_hourglass.segment_boundaries(model, tokens), bool)

  n_ends = n_past = n_positions = 0
  limit = seq_len // k if fixed else boundaries.shortened_length(seq_len, k)
  for x in batches:
    ends = ends_of(x)
    n_ends += int(ends.sum())
    if not fixed:  # Past S-1 closed segments a position reads out[S-1].
      n_past += int((np.cumsum(ends, axis=1) >= limit).sum())
    n_positions += ends.size
  test_start, test = _split(path, 'test')
  test = test.tobytes()
  try:
    offset, text = attention_maps.prose_window(test, seq_len, 0)
  except ValueError:  # No plain prose: the test split's first bytes.
    offset, text = 0, test[:seq_len]
  ends = ends_of(np.frombuffer(text, np.uint8)[None].astype(np.int32))[0]
  record.update(
      segment_length=n_positions / max(n_ends, 1),
      past_bound=n_past / n_positions, shortened_length=limit,
      paragraph=dict(offset=test_start + offset, text=text.decode('latin-1'),
                     ends=np.flatnonzero(ends).tolist()))


# ------------------------------------------------------------- the picture --


def table(variants, results):
  """Markdown: each variant's bits/byte and the shortening it achieved."""
  rows = [[v, harness.fmt(r['test_bits_per_byte'], '.3f'),
           harness.fmt(r['segment_length'], '.2f'),
           harness.fmt(r['shortened_length']),
           harness.fmt(100 * r['past_bound'], '.2f', suffix='%')]
          for v, r in ((v, results[v]) for v in variants)
          if 'segment_length' in r]
  return harness.markdown_table(
      ['variant', 'test bits/byte', 'bytes/segment (shortening)',
       'shortened length', 'positions past it'], rows)


def marked(text, ends):
  """The text with '|' after each segment (position t holds byte t-1)."""
  cut = set(ends)
  return ''.join(c + ('|' if i + 1 in cut else '') for i, c in enumerate(text))


def draw(rows, path, title, width=84):
  """One block of lines per (label, text, ends): segments shaded, ends marked."""
  plt = harness.pyplot()
  n_lines = max(math.ceil(len(text) / width) for _, text, _ in rows)
  height = len(rows) * (n_lines + 1.5)
  fig, ax = plt.subplots(figsize=(width * 0.13 + 1.5, height * 0.24 + 0.8))
  y = 0.
  for label, text, ends in rows:
    ax.text(-1, y, label, fontsize=9, fontweight='bold', va='center')
    y += 1.2
    segment = np.concatenate([[0], np.cumsum(np.isin(
        np.arange(1, len(text) + 1), ends))[:-1]])  # Of each byte.
    for i, char in enumerate(text):
      line, col = divmod(i, width)
      ax.add_patch(plt.Rectangle(
          (col, y + line - 0.5), 1, 1, linewidth=0,
          color=('#cfe3f7', '#f7e1c6')[segment[i] % 2]))
      ax.text(col + 0.5, y + line, char if char.isprintable() else '.',
              fontsize=7, fontfamily='monospace', ha='center', va='center')
      if i + 1 in ends:  # A segment ends after this byte.
        ax.plot([col + 1, col + 1], [y + line - 0.5, y + line + 0.5],
                color='#c0392b', linewidth=1.2)
    y += n_lines + 0.3
  ax.set_xlim(-1, width + 0.5)
  ax.set_ylim(y, -1)
  ax.axis('off')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results', nargs='+', help='equal_time.json of runs of '
                      'the boundaries suite (several: their variants together, '
                      'each from the first file that has it).')
  parser.add_argument('--out', help='PNG to write (default: boundaries.png '
                      'beside the first JSON).')
  args = parser.parse_args(argv)
  results, cfg = {}, {}
  for path in args.results:
    try:
      with open(path) as f:
        report = json.load(f)
    except (OSError, ValueError) as e:
      parser.error(f'{path}: cannot read it as JSON ({e}); pass the '
                   'equal_time.json of a --suite boundaries run.')
    for v in report.get('variants', ()):
      r = report['results'][v]
      if r.get('status') == 'ok' and 'paragraph' in r:
        results.setdefault(v, r)
        cfg = dict(report['config'], **cfg)  # The first file's first.
  if not results:
    parser.error(f'{" ".join(args.results)}: no trained variant of the '
                 'boundaries suite; run equal_time.py --suite boundaries.')
  variants = list(results)
  paragraph = results[variants[0]]['paragraph']
  print(f'Segments over bytes {paragraph["offset"]:,}..'
        f'{paragraph["offset"] + len(paragraph["text"]):,} of '
        f'{os.path.basename(cfg["data"])} (held out), "|" after each:\n')
  print(table(variants, results) + '\n')
  for v in variants:
    p = results[v]['paragraph']
    print(f'{v:>10}: {marked(p["text"], p["ends"])}')
  path = args.out or os.path.join(os.path.dirname(args.results[0]) or '.',
                                  'boundaries.png')
  draw([(f'{v}: {results[v]["segment_length"]:.1f} bytes/segment on the test'
         f' split, {results[v]["test_bits_per_byte"]:.3f} bits/byte',
         results[v]['paragraph']['text'], results[v]['paragraph']['ends'])
        for v in variants], path,
       f'Segment ends (red) after {cfg["seconds"]:g} '
       f'{"CPU " if cfg.get("clock") == "cpu" else ""}s of training each, '
       f'd_model {cfg["d_model"]}, target segment length k = '
       f'{cfg["boundary_factor"]}' + (f' (unigram: {cfg["unigram_factor"]})'
                                      if 'unigram_factor' in cfg else ''))
  print(f'\nWrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
