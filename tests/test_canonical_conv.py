"""The convolution's hand-written gradients are lax's, in XLA:CPU's fast form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import canonical_conv

conv = canonical_conv.conv_general_dilated


def lax_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@pytest.mark.parametrize(
    'kernel, stride, pad, size',
    [
        (3, 1, 1, 8),
        (3, 2, 1, 8),
        (3, 2, 1, 9),
        (1, 1, 0, 7),
        (1, 2, 0, 8),
        (7, 2, 3, 15),
    ],
)
def test_gradients_equal_lax(kernel, stride, pad, size):
  x = jax.random.normal(jax.random.key(0), (3, size, size, 5))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 5, 4))
  args = ((stride, stride), ((pad, pad), (pad, pad)))
  np.testing.assert_array_equal(conv(x, w, *args), lax_conv(x, w, *args))
  y = jax.random.normal(jax.random.key(2), lax_conv(x, w, *args).shape)
  expected = jax.vjp(lambda x, w: lax_conv(x, w, *args), x, w)[1](y)
  found = jax.vjp(lambda x, w: conv(x, w, *args), x, w)[1](y)
  # Each gradient element is a sum of products, at most k*k*c_out of them
  # for dx and batch*h*w for dw. Summed in another order in float32, two
  # results differ by at most ~2 n eps times the sum of the products'
  # magnitudes, which the same gradient of |x|, |w| and |dy| gives.
  magnitudes = jax.vjp(
      lambda x, w: lax_conv(x, w, *args), jnp.abs(x), jnp.abs(w)
  )[1](jnp.abs(y))
  terms = (kernel * kernel * w.shape[3], x.shape[0] * size * size)
  eps = np.finfo(np.float32).eps
  for a, b, m, n in zip(found, expected, magnitudes, terms):
    assert a.shape == b.shape
    assert np.all(np.abs(a - b) <= 2 * n * eps * m)


def test_gradients_inside_a_loop_use_canonical_convolutions():
  # XLA:CPU runs a convolution with its fast kernels only as NHWC x HWIO ->
  # NHWC; inside a loop it would keep lax's transposed forms, ~50x slower.
  def loss(w, x):
    x, _ = jax.lax.scan(
        lambda x, k: (jax.nn.relu(conv(x, k, (1, 1), ((1, 1), (1, 1)))), None),
        x,
        w,
    )
    return x.sum()

  w = jnp.ones((3, 3, 3, 4, 4))
  x = jnp.ones((2, 8, 8, 4))
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(w, x).compile().as_text()
  labels = [
      line.split('dim_labels=')[1].split(',')[0]
      for line in hlo.splitlines()
      if ' convolution(' in line
  ]
  assert len(labels) >= 3  # Forward, input and kernel gradients.
  assert set(labels) == {'b01f_01io->b01f'}, labels
