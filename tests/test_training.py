"""A real trax training loop on HourglassLM learns a tiny repeated batch."""

import numpy as np
import trax
import trax.layers as tl

import trax_hourglass as th


def test_loop_reduces_the_loss_on_a_repeated_batch(tmp_path):
  rng = np.random.RandomState(0)
  tokens = rng.randint(1, 16, size=(4, 18)).astype(np.int32)  # Not a multiple of 6.
  batch = (tokens, tokens, np.ones_like(tokens, np.float32))
  model = th.HourglassLM(16, d_model=32, d_ff=64, n_heads=2,
                         hierarchy='1@2 1@6 1@2', dropout=0.1)
  task = trax.supervised.training.TrainTask(
      labeled_data=iter(lambda: batch, None),
      loss_layer=tl.WeightedCategoryCrossEntropy(),
      optimizer=trax.optimizers.Adam(3e-3), n_steps_per_checkpoint=None)
  eval_task = trax.supervised.training.EvalTask(
      labeled_data=iter(lambda: batch, None),
      metrics=[tl.WeightedCategoryCrossEntropy()], n_eval_batches=1)
  # A fixed seed: with none trax seeds the weights and dropout from the OS,
  # and whether the loss falls far enough would vary from run to run.
  loop = trax.supervised.training.Loop(model, [task], eval_tasks=[eval_task],
                                       eval_at=lambda step: step in (1, 40),
                                       output_dir=str(tmp_path), random_seed=0)
  loop.run(40)
  history = loop.history.get('eval', 'metrics/WeightedCategoryCrossEntropy')
  (first_step, first), (last_step, last) = history[0], history[-1]
  assert (first_step, last_step) == (1, 40)
  assert np.isfinite(last) and last < 0.7 * first, history
