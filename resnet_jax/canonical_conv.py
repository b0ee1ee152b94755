"""A convolution whose gradients XLA:CPU computes with its fast kernels.

XLA:CPU hands a convolution to its fast kernels only in the canonical
NHWC x HWIO -> NHWC form. Outside loops it rewrites the two convolutions of
the backward pass (input and kernel gradient) into that form itself; inside a
loop body (``scan_blocks``) it does not, and falls back to a naive loop that is
~50x slower for the kernel gradient (BENCHMARKS.md). ``conv_general_dilated``
writes both gradients in the canonical form directly on the CPU: the same
sums, no other change to what is computed. Other platforms differentiate
``lax.conv_general_dilated`` as usual (their compilers pick the kernels).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, w, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
  return lax.conv_general_dilated(
      x,
      w,
      strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers=_NHWC,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, w, strides, padding):
  return _conv(x, w, strides, padding)


def _forward(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _backward(strides, padding, residuals, dy):
  x, w = residuals
  return lax.platform_dependent(
      x,
      w,
      dy,
      cpu=functools.partial(_canonical_gradients, strides, padding),
      default=lambda x, w, dy: jax.vjp(
          functools.partial(_conv, strides=strides, padding=padding), x, w
      )[1](dy),
  )


def _canonical_gradients(strides, padding, x, w, dy):
  kernel = w.shape[:2]
  # Input rows (columns) past the last window, which the gradient skips.
  unused = [
      (x.shape[1 + d] + sum(padding[d]) - kernel[d]) % strides[d]
      for d in (0, 1)
  ]
  # dL/dx: the flipped kernel, in/out swapped, over dy dilated by the stride.
  dx = _conv(
      dy,
      jnp.flip(w, (0, 1)).swapaxes(2, 3),
      (1, 1),
      [
          (
              kernel[d] - 1 - padding[d][0],
              kernel[d] - 1 - padding[d][1] + unused[d],
          )
          for d in (0, 1)
      ],
      lhs_dilation=strides,
  )
  # dL/dw: x's channels as the batch, its batch as the features, dy (dilated
  # by the stride) as the kernel; the result is (c_in, kh, kw, c_out).
  dw = _conv(
      x.transpose(3, 1, 2, 0),
      dy.transpose(1, 2, 0, 3),
      (1, 1),
      [(padding[d][0], padding[d][1] - unused[d]) for d in (0, 1)],
      rhs_dilation=strides,
  )
  return dx, dw.transpose(1, 2, 0, 3).astype(w.dtype)


_canonical_conv.defvjp(_forward, _backward)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
  """``lax.conv_general_dilated`` for flax's ``nn.Conv`` (NHWC, HWIO, no
  dilation, one group), differentiated in the canonical form."""
  del dimension_numbers  # nn.Conv's for 2-D inputs: NHWC, HWIO.
  if (
      any(d != 1 for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
      or feature_group_count != 1
      or precision is not None
      or lhs.ndim != 4
  ):
    raise NotImplementedError('only undilated, ungrouped 2-D convolutions')
  return _canonical_conv(
      lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding)
  )
