"""`tl.Dense` with a backward pass that XLA:CPU runs without transposing copies.

jax differentiates `x @ kernel` into a kernel gradient that XLA:CPU computes as
`x^T @ transpose(g)`, materialising the transpose of every incoming gradient
(a strided copy as large as the activation: 25 MB per feed-forward layer at
batch 8 x 768 x 1024) and fusing into it whatever elementwise backward work
precedes it. Written as one matrix product over the flattened batch,
dot_general(x, g) contracting the rows of both, it needs no copy. On the
reference hourglass (2@1 8@3 2@1, d_model 256, batch 8 x 768) that takes ~20%
off a training step on a 2-core CPU: `benchmarks/train_speed.py --models
ours,ours_tl_dense` measures it against the same model built inside
`jax_backward()`, whose layers differentiate as `tl.Dense` does. Same weights,
same function; only the order of floating-point sums differs.
"""

import contextlib
import contextvars
import functools

import jax
import trax.layers as tl
from trax.fastmath import numpy as jnp


def _rows(x):
  """(..., d) -> (n, d): a reshape, no copy."""
  return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x, kernel, out_dtype=None):
  """x (..., d_in) @ kernel (d_in, d_out) -> (..., d_out), in x's dtype.

  The kernel is cast to x's dtype (bfloat16 activations: a bfloat16 product);
  out_dtype (e.g. float32) accumulates and returns the product in it. The
  kernel's gradient is accumulated in float32 and has the kernel's dtype.
  """
  return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=out_dtype)


def _matmul_forward(x, kernel, out_dtype):
  return jnp.dot(x, kernel.astype(x.dtype),
                 preferred_element_type=out_dtype), (x, kernel)


def _matmul_backward(out_dtype, residuals, g):
  del out_dtype
  x, kernel = residuals
  g = g.astype(x.dtype)
  d_x = jnp.tensordot(g, kernel.astype(x.dtype), axes=[[g.ndim - 1], [1]])
  d_kernel = jnp.tensordot(_rows(x), _rows(g), axes=[[0], [0]],
                           preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)

# Whether `Dense` layers built now take jax's derived backward pass.
_JAX_BACKWARD = contextvars.ContextVar('dense_jax_backward', default=False)


@contextlib.contextmanager
def jax_backward():
  """`Dense` layers built inside differentiate `x @ kernel` as `tl.Dense` does.

  For measuring what the backward pass above saves (benchmarks only): the
  layers, their weights and outputs are those built outside.
  """
  token = _JAX_BACKWARD.set(True)
  try:
    yield
  finally:
    _JAX_BACKWARD.reset(token)


class Dense(tl.Dense):
  """`tl.Dense`: same arguments, weights and outputs; faster to train on CPU.

  vecs (..., d_in) -> (..., n_units), computed in the dtype of vecs (the
  float32 weights are cast to it: see `layers.precision`), or accumulated and
  returned in `out_dtype` if given (float32 logits from bfloat16 vectors).
  """

  def __init__(self, *args, out_dtype=None, **kwargs):
    super().__init__(*args, **kwargs)
    self._out_dtype = out_dtype
    # The undecorated product: jax derives its backward pass.
    self._matmul = matmul.fun if _JAX_BACKWARD.get() else matmul

  def forward(self, x):
    if self._use_bias:
      kernel, bias = self.weights
      y = self._matmul(x, kernel, self._out_dtype)
      return y + bias.astype(y.dtype)
    return self._matmul(x, self.weights, self._out_dtype)
