"""Comparisons of float32 results computed in another order.

The same sums, fused, split over devices or ordered differently, round
differently in their last bits, and differently again on CPUs with other
vector units (AVX2, AVX-512). Elementwise relative tolerances fail on values
near zero; these compare against the scale of what is being compared.
"""

import jax
import numpy as np


def assert_close(actual, expected, rtol, scale=None):
  """Equal up to ``rtol`` times ``scale`` (default: the expected array's
  largest magnitude)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  if scale is None:
    scale = float(np.abs(expected).max())
  scale = max(scale, np.finfo(np.float32).tiny)
  error = float(np.abs(actual - expected).max())
  assert error <= rtol * scale, (error, rtol * scale)


def assert_trees_close(actual, expected, rtol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert_close(a, b, rtol)
