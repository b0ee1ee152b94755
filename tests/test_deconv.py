"""Deconvnet projections (Zeiler & Fergus, 2014) against hand-written ones."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close

from resnet_jax import layers
from resnet_jax import models

NHWC = ('NHWC', 'HWIO', 'NHWC')


def tiny(stem, shortcut='A'):
  """Two stages of one basic block: 4 then 8 channels, the second strided."""
  return models.ResNet(
      stage_sizes=(1, 1),
      widths=(4, 8),
      block_cls=functools.partial(models.BasicBlock, shortcut=shortcut),
      stem_cls=models.STEMS[stem],
  )


def random_variables(model, x):
  """Initial weights with BN statistics, scales (of both signs) and biases
  drawn at random, so that folding BN in and the ReLUs' rules matter."""
  variables = model.init(jax.random.key(0), x, train=False)
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  draws = {
      'scale': lambda k, s: jax.random.normal(k, s),
      'bias': lambda k, s: 0.5 * jax.random.normal(k, s),
      'mean': lambda k, s: 0.5 * jax.random.normal(k, s),
      'var': lambda k, s: jax.random.uniform(k, s, minval=0.5, maxval=2),
  }
  return jax.tree.unflatten(
      tree,
      [
          draws[path[-1].key](k, leaf.shape) if path[-1].key in draws else leaf
          for (path, leaf), k in zip(leaves, keys)
      ],
  )


def bn_scale(variables, *path):
  """What inference-mode BN multiplies by: scale / sqrt(var + eps)."""
  params, stats = variables['params'], variables['batch_stats']
  for name in path:
    params, stats = params[name], stats[name]
  return params['scale'] / jnp.sqrt(stats['var'] + 1e-5)


def transposed_conv(g, kernel, strides, size):
  """The transpose of the models' conv (k x k, padding k // 2 on each side)
  back to a ``size`` x ``size`` input: a stride-1 conv of ``g`` dilated by
  the stride, with the kernel flipped and its in/out channels swapped."""
  k = kernel.shape[0]
  low = k - 1 - k // 2
  high = size - (g.shape[1] - 1) * strides - 1 - low + k - 1
  return lax.conv_general_dilated(
      g,
      jnp.swapaxes(kernel[::-1, ::-1], 2, 3),
      (1, 1),
      ((low, high), (low, high)),
      lhs_dilation=(strides, strides),
      dimension_numbers=NHWC,
  )


def kept_map(fmap, channel, keep):
  """The cotangent: only ``channel``'s map (or its maximum) of (1, h, w, c)."""
  kept = jnp.zeros_like(fmap).at[..., channel].set(fmap[..., channel])
  if keep == 'max':
    kept = jnp.where(kept == kept.max(), kept, 0)
  return kept


@pytest.mark.parametrize('keep', layers.DECONV_KEEP)
@pytest.mark.parametrize('stem, size', [('3x3', 16), ('7x7', 32)])
def test_conv1_projection_is_the_transposed_conv_of_the_kept_map(
    stem, size, keep
):
  model = tiny(stem)
  x = jax.random.normal(jax.random.key(2), (1, size, size, 3))
  variables = random_variables(model, x)
  kernel = variables['params']['conv_init']['kernel']
  k, strides = kernel.shape[0], 1 if stem == '3x3' else 2
  bn = variables['batch_stats']['bn_init']
  conv = lax.conv_general_dilated(
      x,
      kernel,
      (strides, strides),
      ((k // 2, k // 2),) * 2,
      dimension_numbers=NHWC,
  )
  scale = bn_scale(variables, 'bn_init')
  fmap = jax.nn.relu(
      (conv - bn['mean']) * scale + variables['params']['bn_init']['bias']
  )
  channels, maxima, projections = layers.deconv(
      model, variables, x, 'conv1', 3, keep
  )
  order = np.argsort(-fmap[0].max((0, 1)))[:3]
  np.testing.assert_array_equal(channels, order)
  assert projections.shape == (3,) + x.shape[1:]
  for channel, maximum, projection in zip(channels, maxima, projections):
    # Sums of at most 7 * 7 * 3 = 147 float32 products forward and 49 back,
    # in another order: apart by a few hundred roundings of 2**-24 at most,
    # about 1e-5 of the values' scale.
    assert_close(maximum, fmap[..., channel].max(), rtol=1e-5)
    kept = kept_map(fmap, channel, keep)[..., channel : channel + 1]
    expected = transposed_conv(
        kept * scale[channel], kernel[..., channel : channel + 1], strides, size
    )
    assert_close(projection, expected[0], rtol=1e-5)


def hand_written_deconvnet(variables, g, shortcut):
  """The deconvnet of ``tiny('3x3', shortcut=...)`` from its stage2 output
  down to a 16 x 16 input, spelled out layer by layer."""
  params = variables['params']
  for name, strides, size in (
      ('stage2_block1', 2, 16),
      ('stage1_block1', 1, 16),
  ):
    p = params[name]
    g = jax.nn.relu(g)  # After the addition.
    y = transposed_conv(
        g * bn_scale(variables, name, 'bn2'),
        p['conv2']['kernel'],
        1,
        g.shape[1],
    )
    y = transposed_conv(
        jax.nn.relu(y) * bn_scale(variables, name, 'bn1'),
        p['conv1']['kernel'],
        strides,
        size,
    )
    if 'proj_conv' in p:  # Option B where dimensions grow.
      g = transposed_conv(
          g * bn_scale(variables, name, 'proj_bn'),
          p['proj_conv']['kernel'],
          strides,
          size,
      )
    elif strides > 1:  # Option A: the subsampled input's channels, unpadded.
      extra = g.shape[-1] - y.shape[-1]
      g = (
          jnp.zeros_like(y)
          .at[:, ::2, ::2]
          .set(g[..., extra // 2 : extra // 2 + y.shape[-1]])
      )
    g = g + y
  g = jax.nn.relu(g) * bn_scale(variables, 'bn_init')  # The stem.
  return transposed_conv(g, params['conv_init']['kernel'], 1, 16)


@pytest.mark.parametrize('shortcut', ['A', 'B'])
def test_projection_through_residual_stages_rectifies_the_signal(shortcut):
  model = tiny('3x3', shortcut=shortcut)
  x = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))
  variables = random_variables(model, x)
  channels, _, projections = layers.deconv(model, variables, x, 'stage2', 2)

  def stage2(x):
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    return state['intermediates']['stage2'][0]

  fmap, gradient = jax.vjp(stage2, x)
  for channel, projection in zip(channels, projections):
    kept = kept_map(fmap, channel, 'map')
    expected = hand_written_deconvnet(variables, kept, shortcut)[0]
    # Five transposed convs of at most 3 * 3 * 8 = 72 products on the longest
    # path, summed in other orders: at most about 360 roundings of 2**-24,
    # 2e-5 of the scale.
    assert_close(projection, expected, rtol=2e-5)
    # The gradient (ReLUs masked where the forward input was negative) is
    # another picture: what the test tells apart.
    assert (
        np.abs(gradient(kept)[0][0] - expected).max()
        > 0.1 * np.abs(expected).max()
    )


def test_imagenet_stem_unpools_to_the_input_in_either_block_form():
  model = models.ResNet(
      stage_sizes=(2, 1),
      widths=(4, 8),
      block_cls=models.BottleneckBlock,
      stem_cls=models.ImageNetStem,
  )
  x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
  variables = random_variables(model, x)
  _, _, unrolled = layers.deconv(model, variables, x, 'stage2', 2, 'max')
  assert unrolled.shape == (2,) + x.shape[1:]
  assert np.all(np.isfinite(unrolled)) and np.abs(unrolled).max() > 0
  scanned = model.clone(scan_blocks=True, remat=True)
  _, _, projections = layers.deconv(
      scanned, models.stack_blocks(variables), x, 'stage2', 2, 'max'
  )
  # The same sums, in a loop: a few roundings apart.
  assert_close(projections, unrolled, rtol=1e-5)
