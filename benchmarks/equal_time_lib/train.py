"""equal_time.py's worker: trains one variant for its budget, then scores it.

The step that compiles is untimed; then chunks of steps run until the budget
(`cfg['seconds']` on `cfg['clock']`, or `cfg['steps']`) is spent, with
validation points between them, off the clock. At the end, off the clock too:
bits per byte on the test split, the leak at probe positions, the boundaries
suite's segments, and the sfd family's other factors.
"""

import functools
import math
import os
import sys
import time

import boundaries
import harness
from equal_time_lib import data
from equal_time_lib import models
from equal_time_lib import variants

COMPILE_STEPS = 1  # The first step compiles the training step.
MAX_CHUNK_S = 5.0  # Longest run of steps between two looks at the clock.
LEAK_BATCHES = 2  # Test batches probed for the leak (a forward per position).


class Evaluator:
  """Bits/byte of a weight tree on a fixed list of batches; and the leak."""

  def __init__(self, model_fn, batches, seq_len):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from trax import shapes  # pylint: disable=g-import-not-at-top
    from trax_hourglass import scoring  # pylint: disable=g-import-not-at-top
    self._batches = batches
    model = model_fn(mode='eval')
    model.init(shapes.ShapeDtype((batches[0].shape[0], seq_len), np.int32))
    self._scorer = scoring.Scorer(model)

  def __call__(self, weights):
    bits = -sum(float(self._scorer.log2_probs(x, weights).sum())
                for x in self._batches)
    return bits / sum(x.size for x in self._batches)

  def leak(self, weights, positions):
    """(teacher-forced, future-hidden) bits/byte at `positions` of each window."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    forced, hidden = [], []
    for x in self._batches[:LEAK_BATCHES]:
      forced.append(self._scorer.log2_probs(x, weights)[:, positions])
      # Byte p scored with it and every later byte read as 0.
      hidden.append([self._scorer.log2_probs(
          np.where(np.arange(x.shape[1]) < p, x, 0), weights, targets=x)[:, p]
                     for p in positions])
    return -float(np.mean(forced)), -float(np.mean(hidden))


class _Clock:
  """Runs the loop in timed chunks: seconds on `clock` (both kinds kept)."""

  def __init__(self, loop, clock):
    self._loop, self._clock = loop, clock
    self.train_s = self.wall_s = self.cpu_s = 0.
    self.timed_steps, self.step_s = 0, None

  def run(self, n):
    wall, cpu = time.perf_counter(), time.process_time()
    self._loop.run(n)
    harness.block((self._loop.model.weights, self._loop.model.state))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    self.wall_s += wall
    self.cpu_s += cpu
    elapsed = cpu if self._clock == 'cpu' else wall
    self.train_s += elapsed
    self.timed_steps += n
    self.step_s = elapsed / n

  def next_chunk(self, target, by_steps):
    """Steps to run next toward `target` (steps or seconds); < 1: reached."""
    if by_steps:  # Equal steps: the compiling step counts.
      return min(round(target) - self._loop.step,
                 max(1, int(MAX_CHUNK_S / (self.step_s or MAX_CHUNK_S))))
    remaining = target - self.train_s
    if remaining <= 0:
      return 0
    if self.step_s is None:  # First timed chunk: one step, to learn its cost.
      return 1
    if remaining < 2 * self.step_s:  # Stop within half a step of the target.
      return int(remaining / self.step_s + 0.5)
    # At most half the time left: a slowdown cannot overshoot much.
    return max(1, int(min(MAX_CHUNK_S, remaining / 2) / self.step_s))


class _Curve:
  """Validation bits/byte at points of the training, off the clock."""

  def __init__(self, evaluate, loop, cfg, log):
    self._evaluate, self._loop, self._cfg, self._log = evaluate, loop, cfg, log
    self.points, self.eval_s = [], 0.

  def point(self, train_s, timed_steps):
    t = time.perf_counter()
    bpb = self._evaluate(self._loop.model.weights)
    self.eval_s += time.perf_counter() - t
    step = self._loop.step
    self.points.append(dict(
        train_s=train_s, step=step, bits_per_byte=bpb,
        tokens=step * self._cfg['batch'] * self._cfg['seq_len'],
        timed_steps=timed_steps))
    self._log(f'{train_s:7.1f} s, step {step:6d}: {bpb:.4f} bits/byte')
    if not math.isfinite(bpb):
      raise FloatingPointError(f'validation loss is {bpb} at step {step}')


def _loop(variant, model_fn, stream, cfg, trax, record):
  """trax's training Loop of the variant, saving nothing."""
  from trax.supervised import training  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  task = training.TrainTask(
      labeled_data=stream,
      loss_layer=boundaries.loss_layer(variant),
      optimizer=trax.optimizers.Adam(cfg['learning_rate'],
                                     weight_decay_rate=0.0, b1=0.9, b2=0.98,
                                     eps=1e-9),
      lr_schedule=trax.lr.multifactor(
          constant=cfg['learning_rate'], factors='constant * linear_warmup',
          warmup_steps=cfg['warmup_steps']))
  loop = training.Loop(model_fn(mode='train'), [task], output_dir=None,
                       checkpoint_at=harness.never,
                       permanent_checkpoint_at=harness.never,
                       eval_at=harness.never, n_devices=1,
                       random_seed=harness.SEED)
  harness.block(loop.model.weights)
  record['init_s'] = time.perf_counter() - start
  record['n_params'] = harness.count_params(loop.model.weights)
  return loop


def _train_for_budget(loop, curve, cfg):
  """Trains to `cfg['steps']` or `cfg['seconds']`: `eval_points` chunks, each
  followed by a validation point; returns the clock."""
  clock = _Clock(loop, cfg['clock'])
  budget = cfg['steps'] or cfg['seconds']
  for i in range(cfg['eval_points']):
    target = budget * (i + 1) / cfg['eval_points']
    while (n := clock.next_chunk(target, cfg['steps'])) >= 1:
      clock.run(n)
    curve.point(clock.train_s, clock.timed_steps)
  return clock


def _score(variant, model_fn, weights, test_batches, cfg, record, log):
  """Test bits/byte, the leak at random probe positions, and the segments
  (boundaries suite) into `record`; off the clock."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  test = Evaluator(model_fn, test_batches, cfg['seq_len'])
  record['test_bits_per_byte'] = test(weights)
  positions = np.sort(np.random.default_rng(harness.SEED).choice(
      cfg['seq_len'], min(cfg['probe_positions'], cfg['seq_len']),
      replace=False))
  forced, hidden = test.leak(weights, positions)
  record.update(probe_positions=positions.tolist(), probe_forced_bpb=forced,
                probe_hidden_bpb=hidden, leak_bits_per_byte=hidden - forced,
                test_s=time.perf_counter() - t)
  log(f'test: {record["test_bits_per_byte"]:.4f} bits/byte; at '
      f'{len(positions)} probe positions {forced:.4f} teacher-forced, '
      f'{hidden:.4f} with the future hidden')
  if variant in boundaries.KINDS:  # Off the clock: the segments it makes.
    boundaries.record_boundaries(
        model_fn, weights, test_batches, boundaries.factor(variant, cfg),
        cfg['data'], record)


def _score_other_factors(variant, model_fn, weights, test_batches, cfg,
                         record, log):
  """The sfd family: test bits/byte of the same weights at other factors."""
  factor, others = variants.factors(variant, cfg)
  if factor:
    record['factor'] = factor
  for other in others:  # The same weights, shortening by `other`.
    at = variants.with_factor(cfg['hierarchy'], other, variant)
    fn = functools.partial(model_fn, hierarchy=at, shorten_factor_dropout=())
    t = time.perf_counter()
    record[f'test_bits_per_byte_at_{other}'] = Evaluator(
        fn, test_batches, cfg['seq_len'])(weights)
    record[f'eval_at_{other}_s'] = time.perf_counter() - t
    record[f'hierarchy_at_{other}'] = at
    log(f'at factor {other} ({at!r}): '
        f'{record[f"test_bits_per_byte_at_{other}"]:.4f} test bits/byte')


def train(variant, cfg, trax, record):
  """Trains `variant` for `cfg['steps']`, else `cfg['seconds']` on
  `cfg['clock']`, scoring it into `record`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  stream, valid_batches, test_batches = (
      data.image_data if data.is_images(cfg) else data.text_data)(cfg, record)
  if variant == 'same_params':
    flat_layers, hourglass_params = models.same_params_depth(cfg)
    cfg = dict(cfg, flat_layers=flat_layers)
    record.update(flat_layers=flat_layers, hourglass_params=hourglass_params)
  model_fn = models.model_fn(variant, cfg)
  loop = _loop(variant, model_fn, stream, cfg, trax, record)
  evaluate = Evaluator(model_fn, valid_batches, cfg['seq_len'])

  # Untimed: the step that compiles the training step.
  record['compile_s'] = harness.run_steps(loop, COMPILE_STEPS)
  log = lambda msg: print(f'[{variant}] {msg}', file=sys.stderr, flush=True)
  curve = _Curve(evaluate, loop, cfg, log)
  t = time.perf_counter()
  curve.point(0., 0)
  record['first_eval_s'] = time.perf_counter() - t  # Includes its compile.
  clock = _train_for_budget(loop, curve, cfg)

  weights = loop.model.weights
  _score(variant, model_fn, weights, test_batches, cfg, record, log)
  _score_other_factors(variant, model_fn, weights, test_batches, cfg, record,
                       log)
  if cfg.get('weights_dir'):  # For the completions of the best model.
    import jax  # pylint: disable=g-import-not-at-top
    np.savez(os.path.join(cfg['weights_dir'], variant + '.npz'),
             *map(np.asarray, jax.tree_util.tree_leaves(weights)))
  record.update(
      curve=curve.points, valid_bits_per_byte=curve.points[-1]['bits_per_byte'],
      clock=cfg['clock'], train_s=clock.train_s, train_wall_s=clock.wall_s,
      train_cpu_s=clock.cpu_s, steps=loop.step, timed_steps=clock.timed_steps,
      tokens_per_s=(clock.timed_steps * cfg['batch'] * cfg['seq_len']
                    / clock.train_s),
      step_ms=1000. * clock.train_s / clock.timed_steps, eval_s=curve.eval_s,
      xla_threads=harness.xla_threads(), load_after=os.getloadavg())
