"""Fixes for what trax 1.4.1 gets wrong on the supported stack (jax 0.4.38 and newer).

Importing `trax_hourglass` imports this module first; each fix is applied once, here,
and has a test in `tests/test_compat.py` that fails without it. Import trax through
`trax_hourglass` (or call `apply()`) rather than before it to get the fast import.
"""

import functools
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import types

_APPLIED = False
_ASSERT_SHAPE = 'trax.layers.assert_shape'


def _fast_stack(context=1):
  """`inspect.stack()` without reading source files or scanning `sys.modules`."""
  del context  # Callers in trax only read the frame itself.
  frames = []
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename,
                                    frame.f_lineno, frame.f_code.co_name,
                                    None, None))
    frame = frame.f_back
  return frames


def _fast_getframeinfo(frame, context=1):
  """`inspect.getframeinfo()` of a frame without its source (no code_context)."""
  if not inspect.isframe(frame):
    return inspect.getframeinfo(frame, context)
  return inspect.Traceback(frame.f_code.co_filename, frame.f_lineno,
                           frame.f_code.co_name, None, None)


class _AfterImport(importlib.abc.MetaPathFinder):
  """Runs `patch(module)` as soon as module `name` has executed, once."""

  def __init__(self, name, patch):
    self._name, self._patch = name, patch

  def find_spec(self, fullname, path, target=None):
    if fullname != self._name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
    if spec is None or spec.loader is None:
      return None  # Let the other finders import it, unpatched.
    exec_module, patch = spec.loader.exec_module, self._patch

    def exec_and_patch(module):
      exec_module(module)
      patch(module)

    spec.loader.exec_module = exec_and_patch
    return spec


def _fix_assert_shape_stack():
  # trax's @assert_shape runs inspect.getframeinfo(inspect.stack()[1][0]) per
  # decorated layer; both resolve modules via inspect.getmodule, which scans all of
  # (tensorflow-sized) sys.modules per frame: `import trax` took ~25 s. Give that
  # module, as soon as it exists, an `inspect` that only reads frames.
  proxy = types.ModuleType('inspect')
  proxy.__dict__.update(inspect.__dict__)
  proxy.stack = _fast_stack
  proxy.getframeinfo = _fast_getframeinfo

  def patch(module):
    module.inspect = proxy

  if _ASSERT_SHAPE in sys.modules:  # trax was imported before us: too late for import.
    patch(sys.modules[_ASSERT_SHAPE])
  else:
    sys.meta_path.insert(0, _AfterImport(_ASSERT_SHAPE, patch))


class _Markers(tuple):
  """A `copy_from_tree` whose `in` never compares an array with a marker."""

  def __contains__(self, tree):
    if tree is not None and not isinstance(tree, (list, tuple, dict)):
      return False  # A leaf (array): never a marker.
    return any(type(tree) is type(m) and tree == m for m in self)  # pylint: disable=unidiomatic-typecheck


def _fix_tree_unflatten():
  # Loop restores optimizer slots with tree_unflatten(..., copy_from_tree=[None, ()])
  # and trax tests `tree in copy_from_tree`, which compares a jax array with a tuple
  # and raises TypeError on numpy 2 / jax 0.4; compare by identity or emptiness.
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  # `trax.fastmath.numpy` the attribute is a backend object; patch the module.
  trax_np = sys.modules['trax.fastmath.numpy']
  trax_unflatten = trax_np.tree_unflatten

  def tree_unflatten(flat, tree, copy_from_tree=None):
    if copy_from_tree is not None:
      copy_from_tree = _Markers(copy_from_tree)
    return trax_unflatten(flat, tree, copy_from_tree=copy_from_tree)

  tree_unflatten.__doc__ = trax_unflatten.__doc__
  # Callers, and trax's own recursion, look it up at call time.
  trax_np.tree_unflatten = fastmath.tree_unflatten = tree_unflatten


def _fix_one_device_step_placement():
  # With one device trax jits its training step over arguments it placed itself:
  # tl.on_cpu commits the optimizer slots and parameters to the host CPU, and
  # fresh weights are uncommitted. jit runs where committed arguments are, so on
  # a GPU the whole step ran on the host CPU (an H200 machine trained the
  # reference model at 1.1 s a step, 280 GFLOP/s); and since a step's outputs
  # are committed, the first step compiled twice. Commit every argument to the
  # default device, where a step's outputs then stay.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax.optimizers import trainer  # pylint: disable=g-import-not-at-top
  accelerate_update_fn = trainer._accelerate_update_fn  # pylint: disable=protected-access

  def _accelerate(forward_and_backward_fn, optimizer, n_devices,
                  accelerate=True, adasum=False):
    update = accelerate_update_fn(forward_and_backward_fn, optimizer, n_devices,
                                  accelerate=accelerate, adasum=adasum)
    if n_devices != 1 or not accelerate:
      return update
    # Where jit puts uncommitted arrays: the accelerator if there is one
    # (or jax_default_device), this process's own device under multi-host.
    device, = jax.numpy.zeros(()).devices()

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

  trainer._accelerate_update_fn = _accelerate  # pylint: disable=protected-access


def _fix_on_cpu_multihost():
  # trax's on_cpu puts arrays on jax.devices('cpu')[0], which under jax's
  # distributed runtime is process 0's: every other process failed with "Cannot
  # copy array to non-addressable device". Use this process's own CPU.
  import jax  # pylint: disable=g-import-not-at-top
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


def _fix_one_device_per_process():
  # With one device per process trax's training step is a plain jit of the
  # local batch: nothing averaged gradients across processes and their weights
  # drifted apart (silently). Run it as a one-device pmap, whose axis spans all
  # processes, averaging gradients as trax's multi-device step does.
  import jax  # pylint: disable=g-import-not-at-top
  from jax import numpy as jnp  # pylint: disable=g-import-not-at-top
  from trax.optimizers import trainer  # pylint: disable=g-import-not-at-top
  accelerate_update_fn = trainer._accelerate_update_fn  # pylint: disable=protected-access
  average = trainer._average_multidevice_gradients  # pylint: disable=protected-access

  def _accelerate(forward_and_backward_fn, optimizer, n_devices,
                  accelerate=True, adasum=False):
    if n_devices != 1 or not accelerate or jax.process_count() == 1:
      return accelerate_update_fn(forward_and_backward_fn, optimizer,
                                  n_devices, accelerate=accelerate,
                                  adasum=adasum)

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

  trainer._accelerate_update_fn = _accelerate  # pylint: disable=protected-access


def _fix_same_rng_on_every_process():
  # A training step splits its key over this process's devices only; with a
  # fixed random_seed every process has the same key, so device k of every
  # process drew the same dropout masks. Make each process's step key its own.
  import jax  # pylint: disable=g-import-not-at-top
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
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
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
  import jax  # pylint: disable=g-import-not-at-top
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
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not _pmap_is_jit_based():
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


def multiprocess_cpu_training_hangs():
  """Whether several CPU devices per process can deadlock multi-process runs.

  With jax 0.10.2 (whose pmap is jit-based) a 2-process x 2-CPU-device trainer
  hangs after a few steps, at random: one local device's part of a
  cross-process all-reduce waits on that device's in-flight-computations
  semaphore in XLA's CPU client while the other part waits in gloo. jax 0.4.38
  (C++ pmap) trains; the pmap kind tells the two runtimes apart.
  """
  return _pmap_is_jit_based()


def _pmap_is_jit_based():
  """Whether jax's pmap is jit + shard_map (newer jax), not the C++ PmapFunction."""
  import jax  # pylint: disable=g-import-not-at-top
  return type(jax.pmap(lambda x: x)).__name__ != 'PmapFunction'


def _fix_cond_per_branch_operands():
  # Newer jax's lax.cond dropped the keyword form cond(pred=, true_operand=,
  # true_fun=, false_operand=, false_fun=) that trax's LSH attention calls in
  # predict mode (TypeError); pass both operands to the current form instead.
  import jax  # pylint: disable=g-import-not-at-top
  try:  # Traces only: starts no backend (jax.distributed may come later).
    jax.eval_shape(lambda: jax.lax.cond(
        pred=True, true_operand=0, true_fun=lambda x: x, false_operand=0,
        false_fun=lambda x: x))
    return
  except TypeError:
    pass
  from trax.fastmath import jax as fastmath_jax  # pylint: disable=g-import-not-at-top
  cond = fastmath_jax.JAX_BACKEND['cond']

  def per_branch_cond(*args, **kwargs):
    if 'true_operand' not in kwargs:
      return cond(*args, **kwargs)
    pred = args[0] if args else kwargs['pred']
    true_fun, false_fun = kwargs['true_fun'], kwargs['false_fun']
    return cond(pred, lambda ops: true_fun(ops[0]),
                lambda ops: false_fun(ops[1]),
                (kwargs['true_operand'], kwargs['false_operand']))

  fastmath_jax.JAX_BACKEND['cond'] = per_branch_cond  # fastmath.cond reads it per call.


def _fix_stop_gradient_python_ints():
  # Newer jax's stop_gradient turns a Python int into a jax value (a tracer under
  # jit); trax's LSH attention passes its length through it and then branches on
  # it in Python (TracerBoolConversionError in predict mode). An int has no
  # gradient: keep it.
  import jax  # pylint: disable=g-import-not-at-top
  kept = []
  jax.eval_shape(lambda: kept.append(type(jax.lax.stop_gradient(3))))
  if kept == [int]:
    return
  from trax.fastmath import jax as fastmath_jax  # pylint: disable=g-import-not-at-top
  stop_gradient = fastmath_jax.JAX_BACKEND['stop_gradient']

  def stop_gradient_keeping_ints(x):
    return jax.tree_util.tree_map(
        lambda y: y if type(y) in (int, bool) else stop_gradient(y), x)  # pylint: disable=unidiomatic-typecheck

  fastmath_jax.JAX_BACKEND['stop_gradient'] = stop_gradient_keeping_ints


# The console scripts, by the module `python -m` runs.
_PROGS = {'trax_hourglass.cli.trainer': 'trainer',
          'trax_hourglass.cli.evaluate': 'hourglass-eval',
          'trax_hourglass.cli.sample': 'hourglass-sample'}


class NoTemporaryDirectoryError(OSError):
  """No writable temporary directory: trax's imports cannot start."""


def _check_temporary_directory():
  """Refuses, in one line, to import trax without a usable temporary directory.

  TensorFlow (which trax imports) asks for one at import time (absl's test
  directory), before any script's error handling runs: a full or unwritable
  /tmp ended in a 40-frame traceback. A script (`trainer`, ...) prints
  `prog: error: ...` instead; a library import raises the error.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  try:
    tempfile.gettempdir()
    return
  except FileNotFoundError as e:
    error = NoTemporaryDirectoryError(
        f'no usable temporary directory ({e.strerror or e}: every one tried '
        'is full or not writable); free disk space there, or set TMPDIR to '
        'a writable directory')
  argv = list(getattr(sys, 'orig_argv', sys.argv))
  prog = (_PROGS.get(argv[argv.index('-m') + 1], None)
          if '-m' in argv[:-1] else os.path.basename(sys.argv[0] or ''))
  debug = ({'--debug', '--traceback'} & set(argv) or
           os.environ.get('TRAX_HOURGLASS_DEBUG', '') not in ('', '0'))
  if prog in _PROGS.values() and not debug:
    def one_line(kind, value, tb):
      if kind is not NoTemporaryDirectoryError:
        return sys.__excepthook__(kind, value, tb)
      print(f'{prog}: error: {value} (--debug shows the traceback)',
            file=sys.stderr, flush=True)
    sys.excepthook = one_line
  raise error


def apply():
  """Imports trax (fast) and applies every fix, once."""
  global _APPLIED
  if _APPLIED:
    return
  _fix_assert_shape_stack()  # Before `import trax`, which decorates its layers.
  _check_temporary_directory()
  import trax  # pylint: disable=g-import-not-at-top,unused-import
  import trax.layers  # pylint: disable=g-import-not-at-top,unused-import
  import trax.supervised  # pylint: disable=g-import-not-at-top,unused-import
  _fix_tree_unflatten()
  _fix_one_device_step_placement()
  _fix_on_cpu_multihost()
  _fix_one_device_per_process()
  _fix_same_rng_on_every_process()
  _fix_for_n_devices()
  _fix_pmap_committed_args()
  _fix_cond_per_branch_operands()
  _fix_stop_gradient_python_ints()
  _APPLIED = True
