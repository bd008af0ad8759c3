"""Equal training time: which model reaches the lowest bits per byte?

The paper's claim in miniature ("at the same compute, Hourglass beats the
Transformer"), its ablations, and the attention swaps, all measured the same
way: every variant trains for the same wall time, from the same seed, on the
same batches of the same real text, and is scored on the same held-out bytes.

Suites (`--suite`, or any mix with `--variants`):

  claim       hourglass     HourglassLM '2@1 4@3 2@1', relative attention,
                            attention resampling (the default model)
              vanilla       the same 8 relative-attention blocks, no
                            shortening ('8@1'): differs in the shortening only
              transformer6  trax TransformerLM, 6 layers, same width
              transformer12 trax TransformerLM, 12 layers, same width
  ablations   hourglass and, changing one thing each:
              <shorten>_<upsample> for shortening avg (average pooling),
                            linear (linear pooling), attn (attention pooling,
                            the default) x upsampling repeat, linear, attn
                            (the default): avg_repeat ... attn_linear
              factor2, factor4  shortening by 2 or 4 instead of 3
              no_shift      without the k-1 shift before shortening: the
                            model sees the future (see "leak" below)
  swaps       hourglass (relative attention) and rotary, softmax, lsh,
              performer, sparse_qkv (attention swaps), sparse_ff (sparse
              feed-forward + loss), sfd (shorten-factor dropout (2, 3); also
              scored at factor 2 with the same weights, row "sfd@2")
  boundaries  fixed, whitespace, entropy, gumbel, unigram: dynamic pooling
              (HourglassLM's `boundaries`) against fixed pooling every k
              bytes, same layers; k matches the whitespace segments of the
              training split. Also the average shortening each achieved;
              benchmarks/boundaries.py draws their boundaries (its
              docstring has the details).
The paper's claims at its lengths, each with its own configuration
(SUITE_CONFIG; flags still override it):
  length      hourglass '2@1 8@3 2@1', vanilla ('12@1'), transformer12 at
              2,046 bytes per window (2,048 rounded to a multiple of 2 and 3)
  params      hourglass and same_params: the same blocks flat, as many as
              give the nearest parameter count (the worker counts), at
              equal steps (`--steps`)
  sfd         the slides' Table 4: sfd, fixed2, fixed3 (the same model with
              shorten factor 2 or 3 and no dropout), each also scored at the
              other factor with the same weights, at equal steps
  images      hourglass '1@1 8@3 1@1', vanilla ('10@1'), transformer10 on an
              .npz of images (`--data`, e.g. the CIFAR-10 head: 3,072 tokens);
              bits per dimension, and with --out a grid of the best model's
              completions (completions.png: top halves given, bottoms sampled
              with `trax_hourglass.decoding`)

Reference configuration (the defaults): d_model 128, d_ff 512, 4 heads,
hierarchy '2@1 4@3 2@1', dropout 0, 16 x 384 bytes per step, Adam (b2 0.98,
eps 1e-9) at 1e-3 after 100 linear warmup steps, 240 s of training each.
TransformerLM keeps its own choices (absolute positions, ReLU); attentions
without positions of their own get trax's `PositionalEncoding` at the embedding.

Data: any byte file (`--data`), split 90/5/5 by
`trax_hourglass.data.text.byte_file_splits`; or an .npz of uint8 images
(`train_images`, `test_images` [N, H, W, C]): the last 5% of the train images
validate, the test images test, an image is H * W * C tokens (bits per byte
are then bits per dimension). Training batches are random windows of the
train split (random images), the same for every variant. Bits per byte: on
`--eval_batches` validation batches during training (the plot), at the end on
every whole window of the test split (the table). Leak: at the end
`--probe_positions` positions of the first 2 test batches are scored again
with that byte and all later ones replaced by 0; a causal model scores the
same (leak 0), a model that peeks (no_shift) scores worse without the future.

Clock: each variant trains in its own worker process; the step that compiles
is untimed, then chunks of steps run until `--seconds` of training time have
passed; evaluations are off the clock. `--clock wall` (the default) counts
wall seconds, with XLA using every core: run it on an otherwise idle machine.
`--clock cpu` counts the worker's CPU seconds (`time.process_time`) with XLA
computing on one thread: the work a model does, not the time others take from
it, so it stays fair on a shared machine (not entirely: cache and memory
bandwidth are shared too). Each worker records which clock, both kinds of
seconds, and the load average before and after. `--jobs N` trains N variants
at once (`--clock cpu` only). `--steps N` trains each variant N steps
instead (equal steps: the params and sfd suites).

Reproduce (each variant takes --seconds plus 1-2 minutes):

  python benchmarks/equal_time.py --suite claim \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/claim
  python benchmarks/equal_time.py --suite ablations --seconds 120 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/ablations
  python benchmarks/equal_time.py --suite swaps --seconds 60 --batch 8 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/swaps
  python benchmarks/equal_time.py --suite boundaries --clock cpu --jobs 4 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/boundaries
  python benchmarks/equal_time.py --suite length --clock cpu --jobs 3 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/length
  python benchmarks/equal_time.py --suite params --clock cpu --jobs 2 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/params
  python benchmarks/equal_time.py --suite sfd --clock cpu --jobs 3 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/sfd
  python benchmarks/equal_time.py --suite images --clock cpu --jobs 3 \
      --data ../shared/data/cifar10-head.npz --out benchmarks/results/images

Quick smoke run (tiny sizes, XLA optimization off; numbers mean nothing):

  python benchmarks/equal_time.py --quick --data SMALL_TEXT_FILE \
      --variants hourglass,no_shift --out /tmp/equal_time_quick
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
import boundaries
from equal_time_lib import config
from equal_time_lib import report
from equal_time_lib import run
from equal_time_lib import variants
from equal_time_lib.variants import FIXED
from equal_time_lib.variants import RESAMPLING
from equal_time_lib.variants import SWAPS
# pylint: enable=g-import-not-at-top,wrong-import-position

SUITES = {
    'claim': ('hourglass', 'vanilla', 'transformer6', 'transformer12'),
    # The paper's claims at its lengths, with their own configs (SUITE_CONFIG).
    'length': ('hourglass', 'vanilla', 'transformer12'),
    'params': ('hourglass', 'same_params'),
    'sfd': ('sfd',) + FIXED,
    'images': ('hourglass', 'vanilla', 'transformer10'),
    'ablations': ('hourglass',) + RESAMPLING + ('factor2', 'factor4',
                                                'no_shift'),
    'swaps': ('hourglass',) + SWAPS,
    'boundaries': boundaries.KINDS,
}

REFERENCE = dict(vocab_size=256, d_model=128, d_ff=512, n_heads=4,
                 hierarchy='2@1 4@3 2@1', dropout=0.0, seq_len=384, batch=16,
                 learning_rate=1e-3, warmup_steps=100, seconds=240.,
                 eval_points=8, eval_batches=8, test_batches=0,
                 probe_positions=16, lsh_chunk_len=64, ff_sparsity=32,
                 loss_sparsity=4, fast_compile=False, clock='wall', steps=0)
# Tiny sizes that compile in seconds. lsh_chunk_len 16: LSH needs 2 * length a
# multiple of the chunk at every level (96 and 32 here).
QUICK = dict(REFERENCE, d_model=32, d_ff=64, n_heads=2,
             hierarchy='1@1 1@3 1@1', seq_len=48, batch=2, warmup_steps=10,
             seconds=10., eval_points=2, eval_batches=2, test_batches=2,
             probe_positions=4, lsh_chunk_len=16, fast_compile=True)
# What a suite changes of REFERENCE (explicit flags still win; --quick is QUICK).
# 2,046: the paper's 2,048 rounded down to a multiple of the shortenings 2, 3.
SUITE_CONFIG = {
    'length': dict(hierarchy='2@1 8@3 2@1', seq_len=2046, batch=1,
                   warmup_steps=50, seconds=240., eval_batches=4,
                   test_batches=16, probe_positions=8),
    # Equal steps, shorter windows: steps cost what they cost.
    'params': dict(hierarchy='2@1 8@3 2@1', seq_len=768, batch=1,
                   warmup_steps=50, steps=150, test_batches=32),
    'sfd': dict(hierarchy='2@1 8@3 2@1', seq_len=768, batch=1,
                warmup_steps=50, steps=150, test_batches=32),
    # --data: an .npz of images, e.g. ../shared/data/cifar10-head.npz. Half
    # the width and heads: 3,072-token attention weights fit beside the rest.
    'images': dict(hierarchy='1@1 8@3 1@1', d_model=64, d_ff=256, n_heads=2,
                   batch=1, warmup_steps=50, seconds=240., eval_batches=4,
                   test_batches=16, probe_positions=8),
    # 336 = 48 x 7: k = 7 on enwik8 (6.9 bytes per whitespace segment).
    'boundaries': dict(seq_len=336),
}
DEFINITION = config.Suites(suites=SUITES, suite_config=SUITE_CONFIG,
                           reference=REFERENCE, quick=QUICK, doc=__doc__,
                           script=__file__)
ALL_VARIANTS = DEFINITION.all_variants

# The variants' hierarchies and legends, and the sfd suite's table, by the
# names tests/test_benchmark_equal_time.py reads here.
variant_hierarchy = variants.variant_hierarchy
describe = variants.describe
_factors = variants.factors
_factor_table = report.factor_table


def main(argv=None):
  return run.main(DEFINITION, argv)


if __name__ == '__main__':
  sys.exit(main())
