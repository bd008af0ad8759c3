"""What trax's training machinery needs fixed, installed by training.

trax 1.4.1's training step (`trax.optimizers.Trainer`, which trax's `Loop`
drives) misplaces arrays on a GPU machine, diverges or fails across several
processes, and calls jax functions that newer jax removed or changed. The
fixes below replace trax's private functions, so they are made for exactly
that trax: `install_training_fixes()` refuses, in one line, any other.

`import trax_hourglass` installs none of them (it applies only the jax shims
a model needs, `jax_shims`). `trax_hourglass.train` and `trax_hourglass.Loop`
install them; a program that trains our model with trax's own `Loop` or
`Trainer` calls `trax_hourglass.install_training_fixes()` first. Each fix has
a test in `tests/test_compat.py` that fails without it.
"""

import functools
import importlib.metadata

import jax
from jax import numpy as jnp
import numpy as np

from trax_hourglass import jax_shims

# The trax these fixes are made for (and tested with).
TESTED_TRAX = '1.4.1'

_INSTALLED = False


class UntestedTraxError(ValueError):
  """The installed trax is not the one the training fixes are made for (a
  ValueError: the `trainer` command reports it in one line)."""


def _trax_version():
  try:
    return importlib.metadata.version('trax')
  except importlib.metadata.PackageNotFoundError:
    return 'of unknown version'


def install_training_fixes():
  """Installs the fixes trax's training step needs (see `trax_fixes`), once.

  `trax_hourglass.train` and `trax_hourglass.Loop` call it. Call it yourself
  before building trax's own `training.Loop` or `Trainer` around a model of
  this package, on one host or many: without it, one-device training runs on
  the host CPU of a GPU machine and processes of a multi-host run train apart
  (or fail).

  Raises:
    UntestedTraxError: the installed trax is not trax 1.4.1.
  """
  global _INSTALLED
  if _INSTALLED:
    return
  installed = _trax_version()
  if installed != TESTED_TRAX:
    raise UntestedTraxError(
        f'trax {installed} is installed, but trax_hourglass trains with trax '
        f'{TESTED_TRAX} only (its training fixes replace that version\'s '
        f'private functions); pip install trax=={TESTED_TRAX}')
  _fix_accelerate_update_fn()
  _fix_on_cpu_multihost()
  _fix_same_rng_on_every_process()
  _fix_for_n_devices()
  _fix_pmap_committed_args()
  _INSTALLED = True


def _fix_accelerate_update_fn():
  # trax's one-device training step (`_accelerate_update_fn`, n_devices=1) is
  # a plain jit. Two things go wrong with it; can go once trax jits its step
  # over arguments on the default device and pmaps it over one device per
  # process (1.4.1 does neither).
  # - One process: the step ran where trax put its arguments. tl.on_cpu
  #   commits the optimizer slots and parameters to the host CPU and fresh
  #   weights are uncommitted; jit runs where committed arguments are, so on a
  #   GPU the whole step ran on the host CPU (an H200 machine trained the
  #   reference model at 1.1 s a step, 280 GFLOP/s), and since a step's
  #   outputs are committed, the first step compiled twice. Commit every
  #   argument to the default device, where a step's outputs then stay.
  # - Several processes, one device each: nothing averaged gradients across
  #   processes and their weights drifted apart (silently). Run the step as
  #   a one-device pmap, whose axis spans all processes, averaging gradients
  #   as trax's multi-device step does.
  from trax.optimizers import trainer  # pylint: disable=g-import-not-at-top
  accelerate_update_fn = trainer._accelerate_update_fn  # pylint: disable=protected-access

  def _accelerate(forward_and_backward_fn, optimizer, n_devices,
                  accelerate=True, adasum=False):
    if n_devices == 1 and accelerate and jax.process_count() > 1:
      return _pmapped_over_processes(forward_and_backward_fn, optimizer,
                                     adasum)
    update = accelerate_update_fn(forward_and_backward_fn, optimizer, n_devices,
                                  accelerate=accelerate, adasum=adasum)
    if n_devices != 1 or not accelerate:
      return update
    return _on_default_device(update)

  trainer._accelerate_update_fn = _accelerate  # pylint: disable=protected-access


def _on_default_device(update):
  """`update` (a jitted one-device step) with its arguments on the default
  device; one process."""
  # Where jit puts uncommitted arrays: the accelerator if there is one
  # (or jax_default_device), this process's own device under multi-host.
  device, = jnp.zeros(()).devices()

  def misplaced(x):
    return isinstance(x, np.ndarray) or isinstance(x, jax.Array) and not (
        x._committed and x.devices() == {device})  # pylint: disable=protected-access

  def placed_update(weights_and_slots, step, opt_params, batch, state, rng):
    # One pass, no check first: trax sets a fresh learning rate every step.
    # The batch stays as it is: uncommitted, it goes where the rest is.
    weights_and_slots, opt_params, state, rng = jax.tree_util.tree_map(
        lambda x: jax.device_put(x, device) if misplaced(x) else x,
        (weights_and_slots, opt_params, state, rng))
    return update(weights_and_slots, step, opt_params, batch, state, rng)

  return placed_update


def _pmapped_over_processes(forward_and_backward_fn, optimizer, adasum):
  """A one-device training step mapped over axis 'batch', one device per
  process: gradients averaged over all processes."""
  from trax.optimizers import trainer  # pylint: disable=g-import-not-at-top
  average = trainer._average_multidevice_gradients  # pylint: disable=protected-access

  def device_update(weights_and_slots, step, opt_params, batch, state, rng):
    weights, slots = weights_and_slots
    (loss, state), gradients = forward_and_backward_fn(batch, weights, state,
                                                       rng)
    weights, slots, stats = optimizer.tree_update(
        step, average(gradients, adasum=adasum), weights, slots, opt_params,
        store_slots=False)
    stats['loss'] = loss
    return (weights, slots), state, stats

  pmapped = jax.pmap(device_update, axis_name='batch')
  add_axis = jax.jit(lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.asarray(x)[None], tree))

  def update(weights_and_slots, step, opt_params, batch, state, rng):
    out = pmapped(*add_axis((weights_and_slots, jnp.asarray(step, jnp.int32),
                             opt_params, batch, state, rng)))
    return jax.tree_util.tree_map(lambda x: x[0], out)

  return update


def _fix_on_cpu_multihost():
  # trax's on_cpu puts arrays on jax.devices('cpu')[0], which under jax's
  # distributed runtime is process 0's: every other process failed with "Cannot
  # copy array to non-addressable device". Use this process's own CPU. Can go
  # once trax's on_cpu uses a local device (1.4.1 does not).
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.layers import acceleration  # pylint: disable=g-import-not-at-top
  trax_on_cpu = acceleration.on_cpu

  def on_cpu(x):
    if jax.process_count() == 1:
      return trax_on_cpu(x)
    return jax.device_put(x, jax.local_devices(backend='cpu')[0])

  on_cpu.__doc__ = trax_on_cpu.__doc__
  acceleration.on_cpu = on_cpu  # Callers look it up at call time, as tl.on_cpu.
  tl.on_cpu = on_cpu


def _fix_same_rng_on_every_process():
  # A training step splits its key over this process's devices only; with a
  # fixed random_seed every process has the same key, so device k of every
  # process drew the same dropout masks. Make each process's step key its own.
  # Can go once trax's Trainer folds in the process index (1.4.1 does not).
  from trax.optimizers import trainer  # pylint: disable=g-import-not-at-top

  def per_process_key(one_step):
    def one_step_with_own_key(self, batch, rng, step=0, learning_rate=None):
      if jax.process_count() > 1:
        rng = jax.random.fold_in(rng, jax.process_index())
      return one_step(self, batch, rng, step=step, learning_rate=learning_rate)
    one_step_with_own_key.__doc__ = one_step.__doc__
    return one_step_with_own_key

  for cls in (trainer.Trainer, trainer.ReversibleSerialTrainer):
    cls.one_step = per_process_key(cls.one_step)


def _replicate(x, devices):
  """`x` stacked once per device along a new axis 0, slice i on `devices[i]`."""
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), ('devices',)),
      jax.sharding.PartitionSpec('devices'))
  if not isinstance(x, (jax.Array, np.ndarray)):  # A Python scalar stays weakly typed.
    return jax.device_put(
        jax.numpy.broadcast_to(jax.numpy.asarray(x), (len(devices),)), sharding)
  # One copy per device, never n copies on one.
  return jax.make_array_from_single_device_arrays(
      (len(devices),) + x.shape, sharding,
      [jax.device_put(x[None], device) for device in devices])


def _fix_for_n_devices():
  # jax 0.10 removed jax.device_put_replicated, which trax's for_n_devices calls to
  # replicate weights, slots and state for pmap: multi-device training crashed.
  # Probed: applied only to a jax without it; can go once trax replicates
  # without it (1.4.1 does not).
  if hasattr(jax, 'device_put_replicated'):
    return
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.layers import acceleration  # pylint: disable=g-import-not-at-top
  broadcast = acceleration.for_n_devices

  def for_n_devices(x, n_devices):
    if n_devices > 1 and fastmath.is_backend(fastmath.Backend.JAX):
      devices = jax.local_devices()
      return fastmath.nested_map(lambda y: _replicate(y, devices), x)
    return broadcast(x, n_devices)  # trax's, for what never reached jax.

  for_n_devices.__doc__ = broadcast.__doc__
  # Callers look it up in the module (acceleration.py) or in trax.layers.
  acceleration.for_n_devices = tl.for_n_devices = for_n_devices


def _fix_pmap_committed_args():
  # Newer jax runs pmap as jit + shard_map (no C++ PmapFunction), and jit refuses
  # arguments committed elsewhere, e.g. trax's optimizer slots after on_cpu: the
  # first multi-device step crashed. The C++ pmap copied them; copy them first.
  # Probed: applied only to a jit-based pmap; can go once trax places its
  # pmap's arguments itself (1.4.1 does not).
  if not jax_shims.pmap_is_jit_based():
    return
  from trax.fastmath import jax as fastmath_jax  # pylint: disable=g-import-not-at-top

  @functools.lru_cache(maxsize=1024)  # Asked per argument leaf on every step.
  def _equivalent(a, b, ndim):
    return a.is_equivalent_to(b, ndim)

  def _misplaced(x, sharding):
    return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and
            x.committed and not _equivalent(x.sharding, sharding, x.ndim))

  def pmap(fun, axis_name=None, **kwargs):
    pmapped = jax.pmap(fun, axis_name, **kwargs)
    if kwargs.get('in_axes', 0) != 0 or kwargs.get('static_broadcasted_argnums'):
      return pmapped  # Not how trax calls it: nothing to place.

    def placed(*args):
      arrays = [x for x in jax.tree_util.tree_leaves(args)
                if isinstance(x, jax.Array) and x.ndim]
      if arrays:
        devices = kwargs.get('devices') or jax.local_devices(
            backend=kwargs.get('backend'))[:arrays[0].shape[0]]
        sharding = jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.array(devices), ('pmap',)),
            jax.sharding.PartitionSpec('pmap'))
        args = jax.tree_util.tree_map(
            lambda x: jax.device_put(x, sharding) if _misplaced(x, sharding)
            else x, args)
      return pmapped(*args)

    placed.lower = pmapped.lower
    return placed

  fastmath_jax.JAX_BACKEND['pmap'] = pmap  # fastmath.pmap reads it per call.
