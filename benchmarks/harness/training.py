"""Training throughput: a model's timed steps in trax's training Loop."""

import tempfile
import time
import traceback

from harness import models
from harness import timing
from harness import workers


def train_throughput(model_name, cfg, trax, record):
  """Times `cfg['steps']` training steps of `model_name` into `record`.

  The worker of train_speed.py (and so of max_length.py): a model of
  `models.make_model` in trax's training `Loop` on random tokens,
  `cfg['warmup']` untimed steps (the first compiles), then the timed ones;
  after them, XLA's FLOP count of a step.
  """
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.supervised import training  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  model = models.make_model(model_name, cfg, mode='train')
  batches = models.random_lm_batches(
      cfg['vocab_size'], cfg['batch'], cfg['seq_len'])
  task = training.TrainTask(
      labeled_data=batches,
      loss_layer=tl.WeightedCategoryCrossEntropy(),
      optimizer=trax.optimizers.Adam(cfg['learning_rate']),
      lr_schedule=trax.lr.constant(cfg['learning_rate']))
  with tempfile.TemporaryDirectory() as output_dir:
    loop = training.Loop(model, [task], output_dir=output_dir,
                         checkpoint_at=models.never,
                         permanent_checkpoint_at=models.never,
                         n_devices=1, random_seed=workers.SEED)
    timing.block(loop.model.weights)
    record['init_s'] = time.perf_counter() - start
    record['n_params'] = models.count_params(loop.model.weights)

    # Untimed: compilation (step 1) and a warm step.
    record['warmup_s'] = timing.run_steps(loop, cfg['warmup'])

    # Timed: JAX dispatches asynchronously, so stop the clock only once the
    # last step's weights exist (they depend on every earlier step).
    elapsed = timing.run_steps(loop, cfg['steps'])

    # After the timing, so it cannot disturb it; lowering only traces.
    if cfg.get('count_flops', True):
      start = time.perf_counter()
      try:
        record['flops_per_step'] = models.train_step_flops(
            loop.model, next(batches))
      except Exception as e:  # pylint: disable=broad-except
        # Throughput is still a result; report why FLOPs are missing.
        traceback.print_exc()
        record['flops_error'] = f'{type(e).__name__}: {e}'
      record['cost_analysis_s'] = time.perf_counter() - start

  tokens = cfg['steps'] * cfg['batch'] * cfg['seq_len']
  record.update(timed_s=elapsed, steps=cfg['steps'],
                tokens_per_s=tokens / elapsed,
                step_ms=1000. * elapsed / cfg['steps'])
  if record.get('flops_per_step'):
    record['gflops_per_s'] = (
        record['flops_per_step'] * cfg['steps'] / elapsed / 1e9)
