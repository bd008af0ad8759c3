"""`lax` control flow that runs as plain Python when nothing is traced.

A layer called outside jit (`model(tok)`, as trax's examples call a model)
runs its operations one at a time, each compiled once per shape and cached by
jax. `lax.cond`, `lax.switch` and `lax.while_loop` are not cached that way:
their branches are traced anew at every call (our branches close over the
call's layers and weights), so each call compiled new executables, ~1 s a
token, and memory grew until the process died. With a concrete predicate
these helpers pick the branch in Python, as `jax.disable_jit` does; under jit,
vmap or grad (a traced predicate) they are the `lax` functions.
"""

import jax


def is_traced(*xs):
  """Whether any leaf of `xs` is a tracer (inside jit, scan, vmap, grad...)."""
  return any(isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(xs))


def cond(pred, true_fn, false_fn, *operands):
  """`jax.lax.cond`, or the chosen branch alone when `pred` is concrete."""
  if is_traced(pred):
    return jax.lax.cond(pred, true_fn, false_fn, *operands)
  return true_fn(*operands) if bool(pred) else false_fn(*operands)


def switch(index, branches, *operands):
  """`jax.lax.switch`, or the chosen branch alone when `index` is concrete.

  As lax.switch, an index out of range is clamped.
  """
  if is_traced(index):
    return jax.lax.switch(index, branches, *operands)
  return branches[min(max(int(index), 0), len(branches) - 1)](*operands)


def while_loop(cond_fn, body_fn, init):
  """`jax.lax.while_loop`, or a Python loop while its tests are concrete."""
  if is_traced(init):
    return jax.lax.while_loop(cond_fn, body_fn, init)
  carry = init
  while True:
    test = cond_fn(carry)
    if is_traced(test, carry):  # The rest under lax, from where it is.
      return jax.lax.while_loop(cond_fn, body_fn, carry)
    if not bool(test):
      return carry
    carry = body_fn(carry)
