"""The images suite's completion grid: the best model completes test images.

The parent (`complete_best`) runs a worker (`complete`) for the variant with
the lowest test score; it loads the weights that variant's worker saved and
draws the first test images (the top row) and samples of their bottom halves
given the top halves (the paper's Figure 7), each pixel a square.
"""

import os
import time

import harness
from equal_time_lib import data
from equal_time_lib import models

COMPLETION_IMAGES, COMPLETION_ROWS, COMPLETION_SCALE = 8, 2, 4


def complete(variant, cfg, trax, record):
  """Completes the first test images with `variant`'s saved weights: a PNG.

  Top row the originals, below them `COMPLETION_ROWS` samples of their
  bottom halves given the top halves (the paper's Figure 7).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  del trax
  with np.load(os.path.join(cfg['weights_dir'], variant + '.npz'),
               allow_pickle=False) as f:
    weights = [f[f'arr_{i}'] for i in range(len(f.files))]
  originals = data.load_images(cfg['data'])[1][:COMPLETION_IMAGES]
  model = decoding.load_predict_model(
      weights, model_fn=models.model_fn(variant, cfg), max_len=cfg['seq_len'],
      batch_size=len(originals))
  start = time.perf_counter()
  rows = [decoding.complete_images(model, originals, seed=harness.SEED + i)
          for i in range(COMPLETION_ROWS)]
  record['sample_s'] = time.perf_counter() - start
  grid = decoding.image_grid(originals, np.stack(rows))
  decoding.save_png(grid.repeat(COMPLETION_SCALE, 0).repeat(
      COMPLETION_SCALE, 1), cfg['completion_png'])
  record.update(png=cfg['completion_png'], images=len(originals),
                rows=COMPLETION_ROWS)


def complete_best(script, results, cfg, out, timeout_s):
  """Runs the completion worker of `script` for the lowest test score; its
  record."""
  ok = [v for v, r in results.items() if r['status'] == 'ok']
  best = min(ok, key=lambda v: results[v]['test_bits_per_byte'])
  png = os.path.join(os.path.abspath(out), 'completions.png')
  record = harness.measure(script, f'complete:{results[best]["variant"]}',
                           dict(cfg, completion_png=png, flat_layers=results[
                               best].get('flat_layers')), timeout_s,
                           key='variant')
  harness.log(f'completions by {best}: ' + harness.record_line(
      record, lambda r: f'{r["png"]}, sampled in {r["sample_s"]:.0f} s'))
  return record
