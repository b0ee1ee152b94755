"""Pre-activation ResNets (Identity Mappings, 2016) equal a PyTorch twin.

``PreActNet`` below is written from the authors' Torch code, independently
of models.py: BN-ReLU before each conv; after conv1 the first activation
("before splitting into two paths"); a unit where dimensions grow
pre-activates once for both paths, its projection shortcut (a 1x1 conv, no
BN) starting from the activated input; a BN-ReLU after the last addition.
Its modules carry resnet_jax's names, so weights copy across by name.
"""

import functools

import jax
import numpy as np
import pytest

from numerics import assert_close
from resnet_jax import layers
from resnet_jax import models

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional


class Unit(nn.Module):

  def __init__(self, cin, width, stride, bottleneck, first, stride_on):
    super().__init__()
    cout = width * (4 if bottleneck else 1)
    self.grows = stride != 1 or cin != cout
    self.first = first
    if not first:
      self.bn0 = nn.BatchNorm2d(cin)
    if bottleneck:
      s1, s3 = (stride, 1) if stride_on == '1x1' else (1, stride)
      self.conv1 = nn.Conv2d(cin, width, 1, s1, 0, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, s3, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, cout, 1, 1, 0, bias=False)
      self.layers = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3]
    else:
      self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
      self.layers = [self.conv1, self.bn1, self.conv2]
    if self.grows:
      self.proj_conv = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    if self.first:
      y = x
    elif self.grows:
      x = y = F.relu(self.bn0(x))
    else:
      y = F.relu(self.bn0(x))
    for layer in self.layers:  # conv, BN-ReLU, conv, ...
      y = F.relu(layer(y)) if isinstance(layer, nn.BatchNorm2d) else layer(y)
    return y + (self.proj_conv(x) if self.grows else x)


class PreActNet(nn.Module):

  def __init__(
      self, stage_sizes, widths, bottleneck, imagenet, classes, stride_on='1x1'
  ):
    super().__init__()
    self.imagenet = imagenet
    self.conv_init = (
        nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        if imagenet
        else nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    )
    self.bn_init = nn.BatchNorm2d(widths[0])
    units, cin = {}, widths[0]
    for i, (size, width) in enumerate(zip(stage_sizes, widths)):
      for j in range(size):
        units[f'stage{i + 1}_block{j + 1}'] = Unit(
            cin,
            width,
            2 if i and not j else 1,
            bottleneck,
            not (i or j),
            stride_on,
        )
        cin = width * (4 if bottleneck else 1)
    self.units = nn.ModuleDict(units)
    self.bn_final = nn.BatchNorm2d(cin)
    self.head = nn.Linear(cin, classes)

  def forward(self, x):
    x = F.relu(self.bn_init(self.conv_init(x)))
    if self.imagenet:
      x = F.max_pool2d(x, 3, 2, 1)
    for unit in self.units.values():
      x = unit(x)
    return self.head(F.relu(self.bn_final(x)).mean((2, 3)))


def load(net, variables):
  """Copies resnet_jax variables into the same-named torch modules."""
  variables = models.unroll_blocks(variables)
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, value in jax.tree_util.tree_leaves_with_path(
        variables[collection]
    ):
      flat[tuple(k.key for k in path)] = np.array(value, np.float32)
  as_tensor = torch.from_numpy
  with torch.no_grad():
    for name, module in net.named_modules():
      key = tuple(n for n in name.split('.') if n != 'units')
      if isinstance(module, nn.Conv2d):
        module.weight.copy_(
            as_tensor(flat.pop(key + ('kernel',))).permute(3, 2, 0, 1)
        )
      elif isinstance(module, nn.BatchNorm2d):
        for attr, field in (
            ('weight', 'scale'),
            ('bias', 'bias'),
            ('running_mean', 'mean'),
            ('running_var', 'var'),
        ):
          getattr(module, attr).copy_(as_tensor(flat.pop(key + (field,))))
      elif isinstance(module, nn.Linear):
        module.weight.copy_(as_tensor(flat.pop(key + ('kernel',))).T)
        module.bias.copy_(as_tensor(flat.pop(key + ('bias',))))
  assert not flat, f'resnet_jax variables the torch net lacks: {list(flat)}'


@pytest.mark.parametrize(
    'depth, block, params',
    [
        (164, 'bottleneck', 1_703_258),  # The paper: 1.7M.
        (1001, 'bottleneck', 10_327_706),  # The paper: 10.2M.
        (110, '', 1_730_522),
    ],
)
def test_cifar_parameter_counts_equal_the_pytorch_twins(depth, block, params):
  model = models.create_model(
      model='cifar',
      depth=depth,
      block=block,
      shortcut='B',
      num_classes=10,
      preactivation=True,
      scan_blocks=True,
  )
  variables = jax.eval_shape(
      functools.partial(model.init, train=False),
      jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
  )
  assert models.param_count(variables['params']) == params
  bottleneck = block == 'bottleneck'
  n = (depth - 2) // (9 if bottleneck else 6)
  net = PreActNet((n,) * 3, models.CIFAR_WIDTHS, bottleneck, False, 10)
  assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize(
    'kwargs, stages',
    [
        (
            dict(
                model='cifar',
                depth=20,
                block='bottleneck',
                bottleneck_stride='3x3',
            ),
            (2, 2, 2),
        ),
        (dict(model='cifar', depth=14), (2, 2, 2)),
        (dict(model='imagenet', depth=18), (2, 2, 2, 2)),
    ],
)
def test_logits_equal_the_pytorch_twins(kwargs, stages):
  imagenet = kwargs['model'] == 'imagenet'
  size = 32
  model = models.create_model(
      num_classes=10,
      shortcut='B',
      preactivation=True,
      scan_blocks=True,
      **kwargs,
  )
  x = (
      np.random.default_rng(0)
      .normal(size=(2, size, size, 3))
      .astype(np.float32)
  )
  variables = model.init(jax.random.key(0), x, train=False)
  # BN statistics away from (0, 1), so inference really uses them.
  keys = iter(jax.random.split(jax.random.key(1), 10_000))
  variables = {
      'params': variables['params'],
      'batch_stats': jax.tree.map(
          lambda s: s + 0.2 * jax.random.uniform(next(keys), s.shape),
          variables['batch_stats'],
      ),
  }
  bottleneck = kwargs.get('block') == 'bottleneck'
  widths = models.IMAGENET_WIDTHS if imagenet else models.CIFAR_WIDTHS
  net = PreActNet(
      stages,
      widths,
      bottleneck,
      imagenet,
      10,
      kwargs.get('bottleneck_stride', '1x1'),
  ).eval()
  load(net, variables)
  with torch.no_grad():
    expected = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  # Tens of convolutions by other algorithms (see test_benchmark's PyTorch
  # test): a misplaced BN, ReLU or shortcut would be off by much more.
  assert_close(model.apply(variables, x, train=False), expected, rtol=1e-4)


def test_plain_twin_and_fig7_responses():
  model = models.create_model(
      model='cifar',
      depth=20,
      shortcut='B',
      num_classes=10,
      preactivation=True,
      residual=False,
  )
  x = np.ones((1, 32, 32, 3), np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  # Plain: no projections; the same parameters as the ResNet but for them.
  assert not any(
      'proj' in k
      for block in variables['params'].values()
      if isinstance(block, dict)
      for k in block
  )
  # One response per 3x3 conv: the stem and the 18 of the 9 units.
  assert len(layers.layer_responses(model, variables, x)) == 19
