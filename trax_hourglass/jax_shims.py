"""What a model needs of trax on the installed jax: shims for jax's API.

trax 1.4.1 calls jax (and numpy) as they were in 2021; a model built with it
meets three changes since. `import trax_hourglass` applies a shim for each,
through `compat.apply_jax_shims()`, only where a probe finds the installed jax
changed (the probes trace, so no backend starts: `jax.distributed` may still
come after the import). Each can go when no supported jax needs it, or when
trax calls the current API itself. trax's training machinery needs more:
`trax_fixes`. Each shim has a test in `tests/test_compat.py`.
"""

import sys

import jax


class _Markers(tuple):
  """A `copy_from_tree` whose `in` never compares an array with a marker."""

  def __contains__(self, tree):
    if tree is not None and not isinstance(tree, (list, tuple, dict)):
      return False  # A leaf (array): never a marker.
    return any(type(tree) is type(m) and tree == m for m in self)  # pylint: disable=unidiomatic-typecheck


def _array_in_markers_fails():
  """Whether `array in [None, ()]`, as trax tests it, fails (or is True)."""
  found = []

  def probe():
    try:
      found.append(jax.numpy.zeros(2) in [None, ()])
    except Exception:  # pylint: disable=broad-except
      found.append(None)  # TypeError (array == tuple) or an ambiguous bool.

  jax.eval_shape(probe)  # Traces only: starts no backend.
  return found != [False]


def _fix_tree_unflatten():
  # trax's tree_unflatten tests `tree in copy_from_tree` (markers [None, ()]),
  # which compares a jax array with a tuple: a TypeError with numpy 2 and jax
  # 0.4 on. It restores a Loop's optimizer slots and `Layer.init_from_file`'s
  # weights. Compare by identity or emptiness. Probed: can go once jax
  # compares an array with a tuple again, or trax tests markers by identity.
  if not _array_in_markers_fails():
    return
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


def _fix_cond_per_branch_operands():
  # Newer jax's lax.cond dropped the keyword form cond(pred=, true_operand=,
  # true_fun=, false_operand=, false_fun=) that trax's LSH attention calls in
  # predict mode (TypeError); pass both operands to the current form instead.
  # Probed: can go once no supported jax lacks the keyword form, or trax
  # calls the current one.
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
  # gradient: keep it. Probed: can go once no supported jax converts ints, or
  # trax stops branching on the result.
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


def apply():
  """Applies each shim the installed jax needs; trax is imported first."""
  _fix_tree_unflatten()
  _fix_cond_per_branch_operands()
  _fix_stop_gradient_python_ints()


def pmap_is_jit_based():
  """Whether jax's pmap is jit + shard_map (newer jax), not the C++ PmapFunction."""
  return type(jax.pmap(lambda x: x)).__name__ != 'PmapFunction'
