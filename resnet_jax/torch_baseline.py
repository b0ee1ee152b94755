"""The PyTorch baseline of the benchmark: the same CIFAR nets (§4.2) in torch.

A CIFAR ResNet with option-A shortcuts (or its plain twin), trained by
``torch.optim.SGD`` with momentum and weight decay on the same batch, in
channels-last memory format, optionally under ``torch.compile``. Only the
benchmark imports this module, and only when ``torch`` is installed (it is
never a dependency of resnet_jax). ``load_flax_variables`` copies a resnet_jax
model's weights in, so a test can check that both compute the same function.
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from resnet_jax import models


class Block(nn.Module):
  """Two 3x3 conv-BN layers; option-A shortcut where dimensions grow."""

  def __init__(self, in_width: int, width: int, stride: int, residual: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(in_width, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.stride, self.extra, self.residual = stride, width - in_width, residual

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    if not self.residual:
      return F.relu(y)
    if self.stride != 1 or self.extra:
      x = x[:, :, :: self.stride, :: self.stride]
      x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return F.relu(x + y)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) of §4.2 with option A, or its plain twin."""

  def __init__(self, depth: int, residual: bool = True, num_classes: int = 10):
    super().__init__()
    n = models.cifar_blocks_per_stage(depth)
    widths = models.CIFAR_WIDTHS
    self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm2d(widths[0])
    blocks, in_width = [], widths[0]
    for i, width in enumerate(widths):
      for j in range(n):
        blocks.append(
            Block(in_width, width, 2 if i > 0 and j == 0 else 1, residual)
        )
        in_width = width
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.bn(self.conv(x))))
    return self.head(x.mean((2, 3)))


def load_flax_variables(net: CifarResNet, variables):
  """Copies resnet_jax CIFAR variables (params, batch_stats; either form of
  ``scan_blocks``) into ``net``."""
  variables = models.unroll_blocks(variables)
  params, stats = variables['params'], variables['batch_stats']
  pairs = [
      (
          net.conv,
          net.bn,
          params['conv_init'],
          params['bn_init'],
          stats['bn_init'],
      )
  ]
  blocks = models.blocks_in_order(params)
  for torch_block, (name, _, _) in zip(net.blocks, blocks, strict=True):
    for i in (1, 2):
      pairs.append(
          (
              getattr(torch_block, f'conv{i}'),
              getattr(torch_block, f'bn{i}'),
              params[name][f'conv{i}'],
              params[name][f'bn{i}'],
              stats[name][f'bn{i}'],
          )
      )
  as_tensor = lambda a: torch.from_numpy(np.array(a, np.float32))
  with torch.no_grad():
    for conv, bn, conv_p, bn_p, bn_s in pairs:
      conv.weight.copy_(as_tensor(conv_p['kernel']).permute(3, 2, 0, 1))
      bn.weight.copy_(as_tensor(bn_p['scale']))
      bn.bias.copy_(as_tensor(bn_p['bias']))
      bn.running_mean.copy_(as_tensor(bn_s['mean']))
      bn.running_var.copy_(as_tensor(bn_s['var']))
    net.head.weight.copy_(as_tensor(params['head']['kernel']).T)
    net.head.bias.copy_(as_tensor(params['head']['bias']))


def make_step(
    depth: int, batch_size: int, dtype: str, mode: str, compiled: bool
):
  """One training step (SGD, momentum 0.9, weight decay 1e-4) or inference.

  Returns a function that runs it once on a fixed random batch, on the CPU.
  """
  torch.manual_seed(0)
  net = CifarResNet(depth).to(memory_format=torch.channels_last)
  x = torch.randn(batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch_size,))
  autocast = lambda: torch.autocast(
      'cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'
  )
  forward = torch.compile(net) if compiled else net
  if mode == 'train':
    opt = torch.optim.SGD(
        net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4
    )

    def step():
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = F.cross_entropy(forward(x), y)
      loss.backward()
      opt.step()

  else:
    net.eval()

    def step():
      with torch.no_grad(), autocast():
        forward(x)

  return step
