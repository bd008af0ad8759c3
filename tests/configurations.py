"""What tests share: resampling and attention choices the property tests draw
from, a tiny byte-level LM for the `trainer` tests, a pickle that runs code,
and the models of a saved run."""

import functools
import os
import weakref

import gin
import hypothesis.strategies as st
import jax
import numpy as np
import trax.layers as tl
from trax.layers.research import sparsity

import trax_hourglass as th

# Test models are tiny and run a few steps, so compiling is most of their
# time: XLA's quickest compilation (same semantics), for the test processes and
# the processes they start (conftest).
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                          '--xla_llvm_disable_expensive_passes=true')

L = th.layers


def compiled_call(model, x):
  """model(x) as one compiled program. Called eagerly, a trax model runs op
  by op and XLA compiles each op of each new shape on its own: most of a
  small test's time."""
  return _compiled(model)(x, model.weights, model.state, model.rng)[0]


_COMPILED = weakref.WeakKeyDictionary()


def _compiled(model):
  """One jitted pure_fn a model (each new shape of x compiles once)."""
  if model not in _COMPILED:
    _COMPILED[model] = jax.jit(model.pure_fn)
  return _COMPILED[model]
# name: (downsampling_fn, attention_downsampling_fn)
SHORTENING = {
    'attention(average)': (L.AttentionResampling, L.AveragePooling),
    'attention(linear)': (L.AttentionResampling, L.LinearPooling),
    'average': (L.AveragePooling, L.AveragePooling),
    'linear': (L.LinearPooling, L.AveragePooling),
}
# name: (upsampling_fn, attention_upsampling_fn)
UPSAMPLING = {
    'attention(linear)': (L.AttentionResampling, L.LinearUpsampling),
    'attention(repeat)': (L.AttentionResampling, L.NaiveUpsampling),
    'repeat': (L.NaiveUpsampling, L.LinearUpsampling),
    'linear': (L.LinearUpsampling, L.LinearUpsampling),
}
ATTENTION = {  # LSH aside: chunked LSH is not prefix-invariant.
    'relative': L.RelativeAttentionWrapper,
    'rotary': L.RotaryCausalAttention,
    'softmax': tl.CausalAttention,
    'performer': tl.CausalFavor,
    'sparse_qkv': functools.partial(
        sparsity.MultiplicativeConvCausalAttention, sparsity=2),
}


def configuration_strategies(hierarchies):
  """hypothesis strategies for a model's structure: the property tests' draws."""
  return dict(
      hierarchy=st.sampled_from(hierarchies),
      vanilla=st.tuples(st.integers(0, 1), st.integers(0, 1)),
      shortening=st.sampled_from(sorted(SHORTENING)),
      upsampling=st.sampled_from(sorted(UPSAMPLING)),
      vanilla_attn=st.sampled_from(sorted(ATTENTION)),
      middle_attn=st.sampled_from(sorted(ATTENTION)))

# A tiny byte-level LM run with trax's own bindings (train.*, multifactor.*) and
# this project's data; TransformerLM keeps compilation short.
TINY_GIN = """
train.model = @trax.models.TransformerLM
train.inputs = @trax_hourglass.byte_file_inputs
train.optimizer = @trax.optimizers.Adam
train.steps = {steps}
train.eval_frequency = {eval_frequency}
train.eval_steps = 1
train.random_seed = 0
train.save_graphs = False
byte_file_inputs.batch_size = {batch}
byte_file_inputs.sequence_length = 16
multifactor.constant = 0.01
multifactor.factors = 'constant'
TransformerLM.vocab_size = 256
TransformerLM.d_model = 16
TransformerLM.d_ff = 32
TransformerLM.n_heads = 2
TransformerLM.n_layers = 1
TransformerLM.max_len = 16
TransformerLM.dropout = 0.0
ProgressReporter.every_secs = 0
"""


class Payload:
  """Unpickling it creates the folder `marker` (it "runs code")."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def redrawn(weights, seed, scale=0.5):
  """weights' tree with every array drawn again from N(0, scale).

  trax initialises the shared position biases at 1e-6, which would hide a
  wrong position layout, and boundary predictors barely fire: at scale 0.5
  every term counts.
  """
  flat, tree = jax.tree_util.tree_flatten(weights)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
      tree, [np.asarray(rng.normal(0, scale, w.shape), w.dtype) for w in flat])


def save_run(out, gin_config, seed=None):
  """A training output dir as `trainer` leaves it: a Loop's checkpoint (step
  0, model.pkl.gz) of train.model under `gin_config`, and config.gin.

  seed: the weights are `redrawn` with it before saving (None: trax's init).
  """
  from trax import optimizers  # pylint: disable=g-import-not-at-top
  from trax.supervised import training  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin.parse_config(gin_config)
    x = np.frombuffer(b'the quick brown fox jumps over t', np.uint8).astype(
        np.int32).reshape(2, 16)
    batches = iter(lambda: (x, x, np.ones(x.shape, np.float32)), None)
    task = training.TrainTask(batches, tl.WeightedCategoryCrossEntropy(),
                              optimizers.Adam(0.01))
    loop = th.Loop(th.HourglassLM(mode='train'), [task],
                   output_dir=out, checkpoint_at=lambda step: False,
                   random_seed=0)
    if seed is not None:
      loop.model.weights = redrawn(loop.model.weights, seed)
    loop.save_checkpoint('model')
    with open(os.path.join(out, 'config.gin'), 'w') as f:
      # What trax writes after a step: the operative config, with train.model
      # (trainer_lib.train's binding) as the trainer's run has it.
      f.write(gin.operative_config_str() +
              '\ntrain.model = @trax_hourglass.HourglassLM\n')
  finally:
    gin.clear_config()
  return out


def run_models(run_dir, max_len, batch_size=2):
  """(predict model, eval-mode forward: tokens -> logits) of a saved run.

  run_dir holds a Loop's model.pkl.gz and the trainer's config.gin.
  """
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  try:
    predict = decoding.load_predict_model(run_dir, max_len=max_len,
                                          batch_size=batch_size)
    evaluate = gin.query_parameter('train.model').scoped_configurable_fn(
        mode='eval')
    evaluate.init_from_file(os.path.join(run_dir, 'model.pkl.gz'),
                            weights_only=True)
  finally:
    gin.clear_config()
  fwd = jax.jit(lambda x, w, s: evaluate.pure_fn(x, w, s,
                                                 jax.random.PRNGKey(0))[0])
  return predict, lambda x: np.asarray(fwd(x, evaluate.weights,
                                           evaluate.state))
