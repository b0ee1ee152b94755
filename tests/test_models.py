"""The networks match the paper and its reference implementations exactly."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from numerics import assert_trees_close

from configs import default
from resnet_jax import layers
from resnet_jax import models


def cifar(depth, **kwargs):
  return models.create_model(
      model='cifar', depth=depth, num_classes=10, **kwargs
  )


def imagenet(depth, **kwargs):
  return models.create_model(
      model='imagenet', depth=depth, num_classes=1000, **kwargs
  )


def count(model, image_size=32):
  rows, variables = layers.layer_table(model, image_size)
  return models.param_count(variables['params']), sum(r['macs'] for r in rows)


def init(model, x):
  return model.init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize(
    'depth, params',
    [
        (20, 269_722),
        (32, 464_154),
        (44, 658_586),
        (56, 853_018),
        (110, 1_727_962),
        (1202, 19_421_274),
    ],
)
def test_cifar_parameter_counts(depth, params):
  def param_count(model):  # Scanned: shapes in a time independent of depth.
    variables = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )
    return models.param_count(variables['params'])

  assert param_count(cifar(depth, scan_blocks=True)) == params
  # The plain twin.
  assert param_count(cifar(depth, residual=False, scan_blocks=True)) == params


def test_projection_shortcuts_add_exactly_their_parameters():
  # B: a 1x1 conv + BN at the two places where dimensions grow (16->32->64).
  b = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
  assert count(cifar(20, shortcut='B'))[0] == 269_722 + b
  # C: one on each of the 9 blocks.
  c = 3 * (16 * 16 + 2 * 16) + 2 * (32 * 32 + 2 * 32) + 2 * (64 * 64 + 2 * 64)
  assert count(cifar(20, shortcut='C'))[0] == 269_722 + b + c


@pytest.mark.parametrize(
    'depth, params, paper_gmacs',
    [
        (18, 11_689_512, 1.8),
        (34, 21_797_672, 3.6),
        (50, 25_557_032, 3.8),
        (101, 44_549_160, 7.6),
        (152, 60_192_808, 11.3),
    ],
)
def test_imagenet_parameters_and_multiply_adds(depth, params, paper_gmacs):
  n, macs = count(imagenet(depth, shortcut='B'), 224)
  assert n == params
  assert macs / 1e9 == pytest.approx(paper_gmacs, rel=0.05)
  if depth >= 50:  # v1.5 moves the stride to the 3x3 conv: same parameters,
    n15, macs15 = count(  # more work.
        imagenet(depth, shortcut='B', bottleneck_stride='3x3'), 224
    )
    assert n15 == params and macs15 > macs * 1.02


def test_imagenet_plain_nets_match_their_resnets():
  for depth in (18, 34):
    assert count(imagenet(depth, residual=False), 224) == count(
        imagenet(depth, shortcut='A'), 224
    )


def test_cifar_resnet18_of_the_reproductions():
  model = models.create_model(
      model='imagenet', depth=18, num_classes=10, shortcut='B', stem='3x3'
  )
  rows, variables = layers.layer_table(model, 32)
  assert models.param_count(variables['params']) == 11_173_962
  assert rows[-2]['output'] == (4, 4, 512)  # No max pool: 32 -> 4 px.


def test_stage_shapes_follow_table_1():
  rows, _ = layers.layer_table(imagenet(50), 224)
  outputs = {r['name'].split('/')[0]: r['output'] for r in rows}
  assert outputs['conv_init'] == (112, 112, 64)
  assert outputs['stage1_block1'] == (56, 56, 256)
  assert outputs['stage4_block3'] == (7, 7, 2048)


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(model='cifar', depth=21),
        dict(model='cifar', depth=2),
        dict(model='imagenet', depth=20),
        dict(model='vgg', depth=16),
        dict(model='cifar', depth=20, shortcut='D'),
        dict(model='cifar', depth=20, stem='7x7'),
        dict(model='cifar', depth=20, bottleneck_stride='2x2'),
        dict(model='cifar', depth=20, dtype='float16'),
    ],
)
def test_invalid_models_are_rejected(kwargs):
  with pytest.raises(models.ModelError):
    models.create_model(num_classes=10, **kwargs)


def block(**kwargs):
  """One block in inference mode, with the model's conv and BN."""
  return models.BasicBlock(
      conv=functools.partial(models.conv_layer, dtype=jnp.float32),
      norm=functools.partial(nn.BatchNorm, use_running_average=True),
      **kwargs,
  )


def test_option_a_subsamples_and_zero_pads_evenly():
  # With the residual branch's last BN scale at zero, a block outputs
  # relu(shortcut(x)): the shortcut alone.
  b = block(width=32, strides=2, zero_init_residual=True)
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 16))
  y = b.apply(b.init(jax.random.key(0), x), x)
  assert y.shape == (2, 4, 4, 32)
  np.testing.assert_array_equal(y[..., :8], 0)
  np.testing.assert_array_equal(y[..., 24:], 0)
  np.testing.assert_allclose(y[..., 8:24], x[:, ::2, ::2, :], rtol=1e-6)


def test_strided_blocks_pad_symmetrically():
  # Output row 0 of a 3x3/2 conv padded by 1 on both sides sees input rows
  # 0-1; the next 3x3 conv widens that to rows 0-3. Flax 'SAME' pads a
  # stride-2 conv by 0 before and 1 after, which would reach row 4.
  b = block(width=32, strides=2, residual=False)
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 16))
  variables = b.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: b.apply(variables, x)[0, 0, 0].sum())(x)
  rows = np.nonzero(np.abs(grad).sum(axis=(0, 2, 3)))[0]
  assert list(rows) == [0, 1, 2, 3]


def test_he_normal_initialisation_is_untruncated():
  variables = init(cifar(20), jnp.ones((1, 32, 32, 3)))
  kernel = variables['params']['stage3_block2']['conv1']['kernel']
  std = np.sqrt(2 / (3 * 3 * 64))
  assert np.std(kernel) == pytest.approx(std, rel=0.03)
  assert np.abs(kernel).max() > 3 * std  # A 2-sigma truncation cuts these.
  head = variables['params']['head']
  np.testing.assert_array_equal(head['bias'], 0)
  assert np.std(head['kernel']) == pytest.approx(np.sqrt(2 / 64), rel=0.2)


def test_batchnorm_uses_pytorch_momentum_and_epsilon():
  model = cifar(8)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = init(model, x)
  _, state = model.apply(
      variables,
      x,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=True,
  )
  conv_out = state['intermediates']['conv_init']['__call__'][0]
  mean = state['batch_stats']['bn_init']['mean']
  # Means of 4096 float32 values, summed in other orders: apart by far less
  # than 1e-5 of the largest value (a few ulps per level of a tree sum).
  assert_close(
      mean,
      0.1 * conv_out.mean(axis=(0, 1, 2)),
      rtol=1e-5,
      scale=0.1 * float(np.abs(conv_out).max()),
  )
  # Training-mode output is (h - mean) / sqrt(var + 1e-5).
  response = state['intermediates']['response'][0]
  var = conv_out.var(axis=(0, 1, 2))
  expected = (conv_out - conv_out.mean(axis=(0, 1, 2))) / np.sqrt(var + 1e-5)
  assert_close(response, expected, rtol=1e-5)


def test_layer_responses_in_network_order():
  model = cifar(20)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = init(model, x)
  responses = layers.layer_responses(model, variables, x)
  assert len(responses) == 19  # The stem and the 18 convs of 9 blocks.
  assert [r.shape[1:] for r in responses] == (
      [(32, 32, 16)] * 7 + [(16, 16, 32)] * 6 + [(8, 8, 64)] * 6
  )
  # The read-out leaves the model's output unchanged.
  np.testing.assert_array_equal(
      model.apply(variables, x, train=False),
      model.apply(variables, x, train=False, mutable=['intermediates'])[0],
  )
  # Bottlenecks have one 3x3 conv per block; the 7x7 stem is not 3x3.
  model = imagenet(50)
  x = jnp.ones((1, 64, 64, 3))
  assert len(layers.layer_responses(model, init(model, x), x)) == 16


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  f32, bf16 = cifar(20), cifar(20, dtype='bfloat16')
  variables = init(f32, x)
  assert all(
      p.dtype == jnp.float32 for p in jax.tree.leaves(init(bf16, x)['params'])
  )
  responses = layers.layer_responses(bf16, variables, x)
  assert responses[0].dtype == jnp.bfloat16
  out32 = f32.apply(variables, x, train=False)
  out16 = bf16.apply(variables, x, train=False)
  assert out16.dtype == jnp.float32
  assert not np.array_equal(out16, out32)
  np.testing.assert_allclose(out16, out32, atol=0.1 * np.abs(out32).max())


# Float32 has 24-bit significands (eps 1.2e-7). The two forms run the same
# operations per layer; fusing them differently changes results by a few
# ulps per layer, here ~20 layers of BN deep: 1e-5 of the scale is ample, and
# a wrong weight or statistic anywhere changes results by far more.
FORMS_RTOL = 1e-5


@pytest.mark.parametrize(
    'remat, platform', [(False, 'cpu'), (True, 'cpu'), (False, 'tpu')]
)
def test_scanned_blocks_compute_what_unrolled_blocks_do(remat, platform):
  # On an accelerator the scanned form's loop is written out in the program
  # (unroll_scan): the same variables, the same network.
  unrolled = cifar(20, remat=remat)
  config = default.get_config()
  config.remat = remat
  scanned = models.from_config(config, 10, platform)
  assert scanned.scan_blocks and scanned.unroll_scan == (platform != 'cpu')
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  variables = init(unrolled, x)
  stacked = models.stack_blocks(variables)
  # The stacked tree is exactly the scanned model's.
  assert jax.tree.structure(stacked) == jax.tree.structure(init(scanned, x))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
      jnp.shape, init(scanned, x)
  )
  assert stacked['params']['stage1_blocks']['conv1']['kernel'].shape == (
      2,
      3,
      3,
      16,
      16,
  )

  def loss(model, params, batch_stats):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
    )
    return jnp.sum(logits**2), (logits, updates['batch_stats'])

  def grads(model, v):
    return jax.jit(jax.grad(functools.partial(loss, model), has_aux=True))(
        v['params'], v['batch_stats']
    )

  g_unrolled, (logits_unrolled, stats_unrolled) = grads(unrolled, variables)
  g_scanned, (logits_scanned, stats_scanned) = grads(scanned, stacked)
  assert_close(logits_scanned, logits_unrolled, FORMS_RTOL)
  assert_trees_close(
      models.unroll_blocks({'params': g_scanned, 'batch_stats': stats_scanned}),
      {'params': g_unrolled, 'batch_stats': stats_unrolled},
      FORMS_RTOL,
  )
  assert_close(
      scanned.apply(stacked, x, train=False),
      unrolled.apply(variables, x, train=False),
      FORMS_RTOL,
  )


def test_scanned_bottlenecks_with_projections():
  unrolled = imagenet(50, shortcut='B')
  scanned = imagenet(50, shortcut='B', scan_blocks=True)
  # 64 px: the last stage's BN still sees 4 x 2 x 2 values per channel.
  x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  variables = init(unrolled, x)
  stacked = models.stack_blocks(variables)
  # Stage 3 of ResNet-50: block 1 projects, blocks 2-6 are stacked.
  assert 'proj_conv' in stacked['params']['stage3_block1']
  assert stacked['params']['stage3_blocks']['conv2']['kernel'].shape == (
      5,
      3,
      3,
      256,
      256,
  )
  out_unrolled, _ = unrolled.apply(variables, x, mutable=['batch_stats'])
  out_scanned, _ = scanned.apply(stacked, x, mutable=['batch_stats'])
  # ResNet-50 is 53 layers deep, and the last stage's BN (training mode)
  # normalises 16 values per channel, which magnifies its inputs' rounding:
  # a few ulps per layer over this depth are some 3e-5 of the scale (2e-5
  # measured where the forms round apart). 1e-4 of the scale is still far
  # below what a wrong weight or statistic changes.
  assert_close(out_scanned, out_unrolled, 1e-4)


def test_block_forms_convert_both_ways_exactly():
  x = jnp.ones((1, 32, 32, 3))
  variables = init(cifar(32), x)  # n = 5: blocks 2-5 of each stage stacked.
  stacked = models.stack_blocks(variables)
  assert set(stacked['params']) == {
      'conv_init',
      'bn_init',
      'head',
      *(f'stage{i}_block1' for i in (1, 2, 3)),
      *(f'stage{i}_blocks' for i in (1, 2, 3)),
  }
  np.testing.assert_array_equal(
      stacked['batch_stats']['stage2_blocks']['bn1']['mean'][2],
      variables['batch_stats']['stage2_block4']['bn1']['mean'],
  )
  back = models.unroll_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  assert models.param_count(stacked['params']) == 464_154


def test_summary_and_layer_responses_are_the_same_in_both_forms():
  unrolled, scanned = cifar(20), cifar(20, scan_blocks=True)
  assert (
      layers.layer_table(scanned, 32)[0] == layers.layer_table(unrolled, 32)[0]
  )
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = init(unrolled, x)
  expected = layers.layer_responses(unrolled, variables, x)
  found = layers.layer_responses(scanned, models.stack_blocks(variables), x)
  assert len(found) == len(expected) == 19
  for a, b in zip(found, expected):  # In network order.
    assert_close(a, b, FORMS_RTOL)


def test_scanned_program_does_not_grow_with_depth():
  # ResNet-1202's training gradient traces to as many operations as
  # ResNet-20's: one loop body per stage, whatever its length.
  def operations(depth):
    model = cifar(depth, scan_blocks=True)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), x
    )
    loss = lambda params, batch_stats: model.apply(
        {'params': params, 'batch_stats': batch_stats},
        x,
        mutable=['batch_stats'],
    )[0].sum()
    return len(
        jax.make_jaxpr(jax.grad(loss))(
            variables['params'], variables['batch_stats']
        ).eqns
    )

  assert operations(1202) == operations(20)
  assert operations(8) < operations(20)  # n = 1: nothing to scan.


def test_layer_responses_of_scanned_rematerialised_blocks():
  # ResNet-1202's form: remat inside the scan still reads out every layer.
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = init(cifar(20), x)
  expected = layers.layer_responses(cifar(20), variables, x)
  found = layers.layer_responses(
      cifar(20, scan_blocks=True, remat=True), models.stack_blocks(variables), x
  )
  assert len(found) == len(expected)
  for a, b in zip(found, expected):
    assert_close(a, b, FORMS_RTOL)


@pytest.mark.parametrize('num_devices', [1, 8])
def test_batchnorm_groups_of_64_are_two_independent_batchnorms(num_devices):
  # §4.2: batch 128 on two GPUs, each GPU's BatchNorm normalising its own 64
  # images. The halves differ in scale and offset, so statistics of the whole
  # batch would give other outputs altogether. (8x8 images keep it quick.)
  x = jax.random.normal(jax.random.key(1), (128, 8, 8, 3))
  x = x.at[64:].set(3 * x[64:] + 1)
  whole = cifar(14, scan_blocks=True)
  grouped = cifar(14, scan_blocks=True, bn_group_size=64)
  variables = init(whole, x[:1])
  train = lambda model, v, x: model.apply(
      v, x, train=True, mutable=['batch_stats']
  )
  mesh = jax.make_mesh(
      (num_devices,),
      ('data',),
      devices=jax.devices()[:num_devices],
      axis_types=(jax.sharding.AxisType.Auto,),
  )
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  logits, updates = jax.jit(functools.partial(train, grouped))(
      variables, jax.device_put(x, batch)
  )
  halves = [train(whole, variables, half) for half in (x[:64], x[64:])]
  expected = jnp.concatenate([logits for logits, _ in halves])
  # Each BN's output is the same normalisation with its sums taken in
  # another order (and over devices): float32 rounding, renormalised at
  # every layer; 1e-5 of the scale is far below what other statistics do.
  assert_close(logits, expected, FORMS_RTOL)
  assert np.abs(train(whole, variables, x)[0] - expected).max() > 0.1
  # The running statistics move towards the mean of the groups' statistics.
  assert_trees_close(
      updates,
      jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1]),
      FORMS_RTOL,
  )
  # Evaluation is unchanged: the same variables, nn.BatchNorm's running
  # averages.
  np.testing.assert_array_equal(
      grouped.apply(variables, x, train=False),
      whole.apply(variables, x, train=False),
  )


@pytest.mark.parametrize(
    'net',
    [
        dict(block_cls=models.BasicBlock),
        dict(block_cls=functools.partial(models.BasicBlock, shortcut='B')),
        dict(block_cls=functools.partial(models.BottleneckBlock, shortcut='B')),
        dict(
            block_cls=functools.partial(
                models.BottleneckBlock, shortcut='B', bottleneck_stride='3x3'
            )
        ),
        dict(block_cls=models.PreActBlock, preactivation=True),
        dict(
            block_cls=functools.partial(
                models.BasicBlock, shortcut='B', residual=False
            )
        ),
    ],
    ids=['A', 'B', 'bottleneck', 'bottleneck-v1.5', 'preact', 'plain'],
)
def test_padded_images_score_as_unpadded(net):
  # Multi-scale testing (§3.4) pads views of many shapes to one bucket. A
  # small ImageNet-form net (7x7/2 stem, max pool, four stages, a scanned
  # stage) with BN statistics and biases far from their initial values, so
  # that an unmasked padding would be read as data.
  model = models.ResNet(
      stage_sizes=(1, 2, 1, 1),
      widths=(8, 16, 16, 24),
      stem_cls=models.ImageNetStem,
      num_classes=7,
      scan_blocks=True,
      **net,
  )
  rng = np.random.default_rng(0)
  variables = model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False
  )
  variables = {
      'params': jax.tree.map(
          lambda a: a + rng.normal(0, 0.3, a.shape).astype(a.dtype),
          variables['params'],
      ),
      'batch_stats': jax.tree.map(
          lambda a: a + rng.uniform(0.5, 1.5, a.shape).astype(a.dtype),
          variables['batch_stats'],
      ),
  }
  apply = jax.jit(functools.partial(model.apply, train=False))
  # Odd and even sides, portrait and landscape, one side a single stride.
  sizes = [(33, 47), (64, 64), (50, 31), (37, 90), (96, 40), (32, 33)]
  images = [rng.normal(0, 1, (h, w, 3)).astype(np.float32) for h, w in sizes]
  alone = np.stack([apply(variables, x[None])[0] for x in images])
  # Padded with non-zeros: the net must not read them.
  padded = np.stack(
      [
          np.pad(
              x,
              ((0, 96 - x.shape[0]), (0, 128 - x.shape[1]), (0, 0)),
              constant_values=0.7,
          )
          for x in images
      ]
  )
  together = apply(variables, padded, sizes=jnp.array(sizes))
  # The same products, summed in another order (XLA tiles a convolution by
  # its shape): float32 reassociation, ~1e-7 of the logits' scale here.
  # A padded pixel read as data moves them by 1e-2 of it or more.
  assert_close(together, alone, 1e-5)


def test_padding_must_be_a_multiple_of_the_total_stride():
  model = models.ResNet(
      stage_sizes=(1, 1), widths=(8, 8), stem_cls=models.ImageNetStem
  )
  x = jnp.zeros((1, 72, 64, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert model.total_stride == 8
  with pytest.raises(models.ModelError, match='68x64'):
    model.apply(variables, x[:, :68], train=False, sizes=jnp.array([[60, 60]]))
