"""PyTorch weights in and out: the same logits, and back bit for bit.

The torchvision nets are torchvision's own when it imports; torchvision's
PyPI wheel does not load against the CPU build of torch this project tests
with, so otherwise ``torchvision_resnet`` below builds them as torchvision
does (the same module names, shapes and strides: "v1.5" bottlenecks).
"""

import jax
import numpy as np
import pytest

from commands import assert_names
from commands import refused
from configs import imagenet_resnet18
from configs import imagenet_resnet50
from configs import resnet20
from configs import resnet32
from numerics import assert_close
from resnet_jax import convert
from resnet_jax import models
from resnet_jax import train
from resnet_jax import workdir as workdir_lib

torch = pytest.importorskip('torch')
nn = torch.nn


class BasicBlock(nn.Module):

  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = None
    if stride != 1 or cin != width:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
      )
    self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2)]

  def forward(self, x):
    y = x
    for i, (conv, bn) in enumerate(self.convs):
      y = bn(conv(y))
      y = torch.relu(y) if i < len(self.convs) - 1 else y
    return torch.relu(y + (self.downsample(x) if self.downsample else x))


class Bottleneck(BasicBlock):

  def __init__(self, cin, width, stride):
    nn.Module.__init__(self)
    self.conv1 = nn.Conv2d(cin, width, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, 4 * width, 1, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * width)
    self.downsample = None
    if stride != 1 or cin != 4 * width:
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, 4 * width, 1, stride, bias=False),
          nn.BatchNorm2d(4 * width),
      )
    self.convs = [
        (self.conv1, self.bn1),
        (self.conv2, self.bn2),
        (self.conv3, self.bn3),
    ]


class TorchvisionResNet(nn.Module):

  def __init__(self, depth, num_classes=1000):
    super().__init__()
    sizes, bottleneck = models.IMAGENET_STAGES[depth]
    block = Bottleneck if bottleneck else BasicBlock
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, (size, width) in enumerate(zip(sizes, models.IMAGENET_WIDTHS)):
      blocks = []
      for j in range(size):
        blocks.append(block(cin, width, 2 if i and not j else 1))
        cin = width * (4 if bottleneck else 1)
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    for i in range(1, 5):
      x = getattr(self, f'layer{i}')(x)
    return self.fc(x.mean((2, 3)))


def torchvision_resnet(depth):
  try:
    import torchvision  # pylint: disable=g-import-not-at-top

    return getattr(torchvision.models, f'resnet{depth}')(weights=None)
  except (ImportError, RuntimeError):
    return TorchvisionResNet(depth)


def randomized(net):
  """A net in eval mode with BN statistics and affine terms away from (0, 1)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        for tensor in (module.weight, module.bias, module.running_mean):
          tensor.add_(0.2 * torch.rand_like(tensor))
        module.running_var.add_(torch.rand_like(module.running_var))
  return net.eval()


def jax_logits(workdir, x):
  config = workdir_lib.saved_config(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = workdir_lib.load(
      workdir, workdir_lib.abstract(train.state_shapes(config), device)
  )
  model = models.from_config(config, 1000 if config.model == 'imagenet' else 10)
  return np.asarray(
      model.apply(
          {'params': state.params, 'batch_stats': state.batch_stats},
          x,
          train=False,
      )
  )


@pytest.mark.parametrize(
    'config, make_net, layout, size',
    [
        (
            imagenet_resnet18.get_config(),
            lambda: torchvision_resnet(18),
            'torchvision',
            32,
        ),
        (
            imagenet_resnet50.get_config(),
            lambda: torchvision_resnet(50),
            'torchvision',
            32,
        ),
        (resnet20.get_config(), None, 'baseline', 32),
    ],
)
def test_same_logits_and_back_bit_for_bit(
    config, make_net, layout, size, tmp_path
):
  if make_net is None:
    from resnet_jax import torch_baseline  # pylint: disable=g-import-not-at-top

    make_net = lambda: torch_baseline.CifarResNet(20)
  net = randomized(make_net())
  original = net.state_dict()
  torch.save(original, tmp_path / 'net.pth')
  convert.to_jax(
      config, tmp_path / 'net.pth', tmp_path / 'run', [0.5] * 3, [0.25] * 3
  )
  x = (
      np.random.default_rng(0)
      .normal(size=(2, size, size, 3))
      .astype(np.float32)
  )
  with torch.no_grad():
    expected = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  # Other convolution algorithms (as test_benchmark's PyTorch test): a
  # transposed kernel or a stride in the wrong conv is far off this.
  assert_close(jax_logits(tmp_path / 'run', x), expected, rtol=1e-4)

  convert.to_torch(tmp_path / 'run', tmp_path / 'back.pth', layout)
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert back.keys() == original.keys()
  for name, tensor in original.items():
    assert torch.equal(back[name], tensor), name
  make_net().load_state_dict(back)  # Strict: every tensor, no other.


def test_common_cifar_layout_with_data_parallel_prefix(tmp_path):
  from resnet_jax import torch_baseline  # pylint: disable=g-import-not-at-top

  net = randomized(torch_baseline.CifarResNet(20))
  # The layout of most public CIFAR repositories: conv1, bn1, layerS.J, linear.
  renamed = {}
  for name, tensor in net.state_dict().items():
    parts = name.split('.')
    if parts[0] == 'blocks':
      k = int(parts[1])
      parts[:2] = [f'layer{k // 3 + 1}', str(k % 3)]
    else:
      parts[0] = {'conv': 'conv1', 'bn': 'bn1', 'head': 'linear'}[parts[0]]
    renamed['module.' + '.'.join(parts)] = tensor
  torch.save({'epoch': 182, 'state_dict': renamed}, tmp_path / 'net.th')
  convert.to_jax(
      resnet20.get_config(),
      tmp_path / 'net.th',
      tmp_path / 'run',
      [0.5] * 3,
      [0.25] * 3,
  )
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert_close(jax_logits(tmp_path / 'run', x), expected, rtol=1e-4)
  convert.to_torch(tmp_path / 'run', tmp_path / 'back.pth', 'cifar')
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert set(back) == {k.removeprefix('module.') for k in renamed}


def test_a_checkpoint_that_does_not_fit_is_one_error_line(tmp_path):
  # A ConvertError: the command line prints it as its one error line (as
  # test_malformed's PyTorch files show).
  from resnet_jax import torch_baseline  # pylint: disable=g-import-not-at-top

  torch.save(torch_baseline.CifarResNet(20).state_dict(), tmp_path / 'r20.pth')
  # ResNet-20's fourth block starts stage 2 (32 filters); ResNet-32's is
  # still in stage 1 (16).
  message = refused(
      convert.to_jax,
      resnet32.get_config(),
      tmp_path / 'r20.pth',
      tmp_path / 'run',
      [0.5] * 3,
      [0.25] * 3,
  )
  assert len(message.splitlines()) == 1
  assert_names(message, 'blocks.3.bn1.weight', '(32,)', 'ResNet-32', '(16,)')
  assert not (tmp_path / 'run').exists()  # Nothing written.


def test_fine_tuning_starts_from_the_converted_weights(tmp_path, capsys):
  from resnet_jax import torch_baseline  # pylint: disable=g-import-not-at-top
  # A ResNet-8 of torch_baseline's, fine-tuned for 100 classes.
  torch.save(
      randomized(torch_baseline.CifarResNet(8)).state_dict(),
      tmp_path / 'r8.pth',
  )
  config = resnet20.get_config()
  config.depth = 8
  convert.to_jax(
      config, tmp_path / 'r8.pth', tmp_path / 'converted', [0.5] * 3, [0.25] * 3
  )
  config = resnet20.get_config()
  config.depth = 8
  config.dataset = 'cifar100'  # Another classifier: 100 classes.
  config.data_source = 'synthetic'
  config.synthetic_train_size = 256
  config.validation_size = 0
  config.batch_size = config.eval_batch_size = 32
  config.train_length = config.checkpoint_every_steps = 1
  config.learning_rate = 1e-30  # Updates far below a float32 ulp.
  config.init_from = str(tmp_path / 'converted')
  train.train_and_evaluate(config, str(tmp_path / 'tuned'))
  assert 'head) keeps its initialisation' in capsys.readouterr().out
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  states = [
      workdir_lib.load(
          tmp_path / run,
          workdir_lib.abstract(
              train.state_shapes(workdir_lib.saved_config(tmp_path / run)),
              device,
          ),
      )
      for run in ('converted', 'tuned')
  ]
  params = [
      models.unroll_blocks({'params': s.params})['params'] for s in states
  ]
  assert params[1]['head']['kernel'].shape == (64, 100)
  for name in params[0]:
    if name != 'head':
      for a, b in zip(
          jax.tree.leaves(params[0][name]), jax.tree.leaves(params[1][name])
      ):
        np.testing.assert_array_equal(a, b)


def test_an_existing_file_or_run_is_not_overwritten(tmp_path):
  from resnet_jax import torch_baseline  # pylint: disable=g-import-not-at-top

  torch.save(torch_baseline.CifarResNet(8).state_dict(), tmp_path / 'r8.pth')
  original = (tmp_path / 'r8.pth').read_bytes()
  config = resnet20.get_config()
  config.depth = 8
  convert.to_jax(
      config, tmp_path / 'r8.pth', tmp_path / 'run', [0.5] * 3, [0.25] * 3
  )
  # Back to the file the weights came from (the user's download), as
  # --to=torch (with its default --layout) calls it.
  assert_names(
      refused(convert.to_torch, tmp_path / 'run', tmp_path / 'r8.pth', None),
      tmp_path / 'r8.pth',
      '--overwrite',
  )
  assert (tmp_path / 'r8.pth').read_bytes() == original
  convert.to_torch(tmp_path / 'run', tmp_path / 'r8.pth', None, overwrite=True)
  assert 'num_batches_tracked' in ''.join(
      torch.load(tmp_path / 'r8.pth', weights_only=True)
  )
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
  # A workdir with a run's checkpoints but no config.json (lost): a step-0
  # checkpoint would not be kept beside them, and eval would test theirs.
  (tmp_path / 'trained' / 'checkpoints' / '125').mkdir(parents=True)
  message = refused(
      convert.to_jax,
      config,
      tmp_path / 'r8.pth',
      tmp_path / 'trained',
      [0.5] * 3,
      [0.25] * 3,
  )
  assert_names(message, tmp_path / 'trained', 'checkpoints')
  assert [p.name for p in (tmp_path / 'trained').iterdir()] == ['checkpoints']
