"""The networks of *Deep Residual Learning for Image Recognition* (He et al., 2015).

Two families share one implementation:

* ``model='cifar'`` -- the CIFAR-10 nets of §4.2 / Table 6: a 3x3 conv with 16
  filters, three stages of ``n`` basic blocks on 32/16/8-pixel maps with
  16/32/64 filters, global average pooling and a dense classifier. Depth is
  ``6n + 2`` (ResNet-20, 32, 44, 56, 110, 1202).
* ``model='imagenet'`` -- the ImageNet nets of Table 1 / §3.3: a 7x7/2 conv
  with 64 filters and a 3x3/2 max pool, then four stages of basic blocks
  (18, 34 layers) or bottleneck blocks (50, 101, 152 layers). With
  ``stem='3x3'`` the same stages run on 32-pixel images behind a 3x3/1 stem
  and no pool: the CIFAR ResNet-18 of the common PyTorch reproductions.

``residual=False`` gives the *plain* twin of each net: the same stack without
the shortcut additions and with the same number of parameters (option A adds
none). Shortcut options follow §3.3 and Table 3:

* ``'A'`` identity; where dimensions grow, the input is subsampled with stride 2
  and the new channels are zero (padded evenly on both sides), no parameters;
* ``'B'`` identity, and a projection (1x1 conv + BN) where dimensions grow;
* ``'C'`` a projection on every block.

Numerical conventions match the reference implementations: symmetric explicit
padding (1 for 3x3 convs, also with stride 2; 3 for the 7x7 stem; 1 for the
max pool), He normal initialisation (fan-in, gain 2), BatchNorm with epsilon
1e-5 and momentum 0.9 (PyTorch's 0.1), no bias on convolutions.
"""

from collections.abc import Callable, Sequence
import functools
import inspect
import re
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import canonical_conv

SHORTCUTS = ('A', 'B', 'C')
BOTTLENECK_STRIDES = ('1x1', '3x3')

# Table 1: blocks per stage, and whether the stages are built from bottlenecks.
IMAGENET_STAGES = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),  # Identity Mappings (2016), Table 5.
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)
BOTTLENECK_EXPANSION = 4

# He et al. initialise with zero-mean Gaussians of std sqrt(2 / fan_in) (the
# untruncated normal of PyTorch's kaiming_normal_, not jax's he_normal).
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def scanned_name(stage: int) -> str:
  """The module holding blocks 2..n of a stage when they are scanned."""
  return f'stage{stage}_blocks'


SCANNED_NAME = re.compile(r'stage(\d+)_blocks')
BLOCK_NAME = re.compile(r'stage(\d+)_block(\d+)')


class ModelError(ValueError):
  """A model configuration that does not describe a network of the paper
  (the command line reports it as one ``error:`` line, as a UserError)."""


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding for a k x k window (Flax 'SAME' is asymmetric at stride 2)."""
  return ((k // 2, k // 2), (k // 2, k // 2))


def conv_layer(
    features: int, kernel: int, strides: int, *, name: str, dtype
) -> nn.Conv:
  """A k x k bias-free conv with symmetric padding and He initialisation."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=_pad(kernel),
      use_bias=False,
      kernel_init=he_normal,
      dtype=dtype,
      name=name,
      conv_general_dilated=canonical_conv.conv_general_dilated,
  )


class GroupBatchNorm(nn.Module):
  """Training-mode BatchNorm over groups of ``group_size`` consecutive images.

  §4.2 trains with "a mini-batch size of 128 on two GPUs": BatchNorm of its
  time normalised each GPU's 64 images with their own statistics. Each group
  here is normalised with its own mean and variance, on any number of devices.
  The variables are ``nn.BatchNorm``'s (which evaluates the net); the running
  statistics move towards the mean of the groups' statistics.
  """

  group_size: int
  momentum: float
  epsilon: float
  dtype: jnp.dtype
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param('scale', self.scale_init, features)
    bias = self.param('bias', nn.initializers.zeros, features)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features)
    groups = x.astype(jnp.float32).reshape((-1, self.group_size) + x.shape[1:])
    axes = tuple(range(1, x.ndim))  # All but the group and the channel axes.
    mean = groups.mean(axes, keepdims=True)
    # E[x^2] - E[x]^2, clipped at 0, as nn.BatchNorm computes it.
    var = jnp.maximum((groups**2).mean(axes, keepdims=True) - mean**2, 0)
    if not self.is_initializing():
      for stat, value in ((ra_mean, mean), (ra_var, var)):
        stat.value = self.momentum * stat.value + (
            1 - self.momentum
        ) * value.mean(0).reshape(features)
    y = (groups - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


def shortcut(x, out_features: int, strides: int, option: str, conv, norm=None):
  """The shortcut of §3.3 from ``x`` to a block's output shape: option A
  subsamples and zero-pads the new channels (no parameters), B projects
  (1x1 conv, then ``norm`` unless None) where the dimensions grow, C
  projects everywhere; elsewhere the identity."""
  grows = strides != 1 or x.shape[-1] != out_features
  if option == 'C' or (option == 'B' and grows):
    x = conv(out_features, 1, strides, name='proj_conv')(x)
    return norm(name='proj_bn')(x) if norm else x
  if grows:
    x = x[:, ::strides, ::strides, :]
    extra = out_features - x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """The building block of Fig. 2 (left): two 3x3 convs, a BN after each,
  relu(F(x) + shortcut(x)); with ``residual=False`` the plain net's block,
  relu(F(x)).

  Every block of a ``ResNet`` takes the same attributes from it: ``width``
  (its stage's filters), ``strides``, ``conv`` and ``norm`` (the net's conv
  and BatchNorm, with its dtype and training mode) and ``act`` (every ReLU;
  ``ResNet.act``); the rest are the block's own, fixed by the preset
  (``create_model``) with ``functools.partial``. It is called with its
  input and its ``index`` in the net (0 for the first block; a traced
  integer in a scanned loop). In training the net has a ``'dropout'``
  random stream, for blocks that draw (``self.has_rng('dropout')`` is then
  true): stochastic depth, for one, is a subclass.

  Every BN output that follows a 3x3 conv is sown into the ``intermediates``
  collection as ``response``: the layer responses of Fig. 7 (§4.2).
  """

  width: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  act: Callable[[jax.Array], jax.Array] = nn.relu
  shortcut: str = 'A'
  residual: bool = True
  zero_init_residual: bool = False

  expansion: ClassVar[int] = 1  # Output filters per unit of ``width``.

  @property
  def out_features(self) -> int:
    return self.width * self.expansion

  @nn.compact
  def __call__(self, x, index=0):
    del index  # The paper's blocks are the same at every depth.
    y = self.residual_function(x)
    if not self.residual:
      return self.act(y)
    return self.act(
        y
        + shortcut(
            x,
            self.out_features,
            self.strides,
            self.shortcut,
            self.conv,
            self.norm,
        )
    )

  def last_scale_init(self):
    """The last BN scale of F: zero with ``zero_init_residual`` (Goyal et
    al., 2017), so that the block starts as its shortcut."""
    if self.zero_init_residual:
      return nn.initializers.zeros
    return nn.initializers.ones

  def residual_function(self, x, last_norm: bool = True):
    """F(x): the convs, a BN after each (after the last only with
    ``last_norm``), a ReLU between them."""
    y = self.conv(self.width, 3, self.strides, name='conv1')(x)
    y = self.norm(name='bn1')(y)
    self.sow('intermediates', 'response', y)
    y = self.act(y)
    y = self.conv(self.out_features, 3, 1, name='conv2')(y)
    if last_norm:
      y = self.norm(scale_init=self.last_scale_init(), name='bn2')(y)
    self.sow('intermediates', 'response', y)
    return y


class BottleneckBlock(BasicBlock):
  """The bottleneck block of Fig. 5 (right): 1x1, 3x3 and 1x1 convs, the
  last with 4x ``width`` filters; ResNet-50/101/152 (Table 1).

  ``bottleneck_stride`` '1x1' strides the first 1x1 conv (the paper, "v1");
  '3x3' strides the 3x3 conv ("v1.5", torchvision and flax).
  """

  bottleneck_stride: str = '1x1'

  expansion: ClassVar[int] = BOTTLENECK_EXPANSION

  def residual_function(self, x, last_norm: bool = True):
    s1, s3 = (
        (self.strides, 1)
        if self.bottleneck_stride == '1x1'
        else (1, self.strides)
    )
    y = self.conv(self.width, 1, s1, name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(self.width, 3, s3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    self.sow('intermediates', 'response', y)
    y = self.act(y)
    y = self.conv(self.out_features, 1, 1, name='conv3')(y)
    if last_norm:
      return self.norm(scale_init=self.last_scale_init(), name='bn3')(y)
    return y


class PreActBlock(BasicBlock):
  """The full pre-activation unit of *Identity Mappings in Deep Residual
  Networks* (He et al., 2016, Fig. 4e): BN and ReLU come before each conv,
  and nothing follows the addition: F(x) + shortcut(x). A net of these
  units has ``ResNet.preactivation``.

  As in the authors' code, the first unit of the net (index 0) takes the
  input already activated after conv1, and a unit where dimensions grow
  pre-activates once for both paths (its shortcut starts from the activated
  input); the other units' shortcuts are the raw input. A 3x3 conv with no
  BN after it in the unit sows its own output as the response. Projection
  shortcuts have no BN.
  """

  @nn.compact
  def __call__(self, x, index=0):
    # The first unit's input was activated after conv1, before the split.
    # Its index is a Python integer: a scanned loop holds no stage's first
    # unit.
    first = isinstance(index, int) and index == 0
    pre = x if first else self.act(self.norm(name='bn0')(x))
    if self.strides != 1 or x.shape[-1] != self.out_features:
      x = pre  # Where dimensions grow: one pre-activation for both paths.
    y = self.residual_function(pre, last_norm=False)
    if not self.residual:
      return y
    return y + shortcut(
        x, self.out_features, self.strides, self.shortcut, self.conv
    )


class PreActBottleneckBlock(PreActBlock, BottleneckBlock):
  """The pre-activation bottleneck unit (Identity Mappings, Fig. 4e with
  Fig. 5's convs): ResNet-164, 1001 and 200."""


class CifarStem(nn.Module):
  """conv1 of the CIFAR nets (§4.2): a 3x3/1 conv with ``width`` filters,
  BN and ReLU. Its variables are the net's ``conv_init`` and ``bn_init``
  (``nn.share_scope``). ``mask`` zeroes the positions outside the images
  (``ResNet.__call__``'s ``sizes``)."""

  width: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  act: Callable[[jax.Array], jax.Array]
  mask: Callable[[jax.Array], jax.Array]

  stride: ClassVar[int] = 1  # Input pixels per position of its output.

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.width, 3, 1, name='conv_init')(x)
    x = self.norm(name='bn_init')(x)
    self.sow('intermediates', 'response', x)
    x = self.act(x)
    self.sow('intermediates', 'conv1', x)
    return x


class ImageNetStem(CifarStem):
  """conv1 and the pool of Table 1: a 7x7/2 conv with ``width`` filters,
  BN, ReLU and a 3x3/2 max pool."""

  stride: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x):
    x = self.conv(self.width, 7, 2, name='conv_init')(x)
    x = self.act(self.norm(name='bn_init')(x))
    self.sow('intermediates', 'conv1', x)
    # Windows at the border of the valid pixels reach them.
    return self.mask(nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3)))


STEMS = {'3x3': CifarStem, '7x7': ImageNetStem}


class ResNet(nn.Module):
  """A ResNet (or plain net) of the paper: a stem, stages of blocks, global
  average pooling and a dense classifier; see the module docstring.

  Each stage's output is sown into the ``intermediates`` collection as
  ``stage1``, ``stage2``, ..., and conv1's (Table 1; after its BN and ReLU,
  before any pooling) as ``conv1``: the feature maps of the report's figures.

  Attributes:
    stage_sizes: blocks per stage.
    widths: filters of each stage (``block_cls.expansion`` times as many
      outputs).
    block_cls: the block every stage is built of (``BasicBlock``,
      ``BottleneckBlock``, ``PreActBlock``, ``PreActBottleneckBlock``, or any
      module with their attributes and call).
    stem_cls: conv1 and what follows it before the stages (``CifarStem``,
      ``ImageNetStem``), with a class attribute ``stride``.
    preactivation: the blocks end with an addition (pre-activation units):
      a BN and ReLU after the last one, before the pooling.
    num_classes: outputs of the final dense layer.
    dtype: computation dtype; parameters stay float32.
    remat: recompute each block's activations in the backward pass
      (``jax.checkpoint``) instead of storing them: same results, less memory
      (ResNet-1202), about one more forward pass of compute.
    scan_blocks: run blocks 2..n of each stage as one loop (``nn.scan``)
      over their stacked parameters, so that tracing and compiling do not
      grow with depth. The same network: ``unroll_blocks`` and
      ``stack_blocks`` convert between the two forms of its variables.
    unroll_scan: with ``scan_blocks``, write the loop out in full in the
      program (``nn.scan``'s ``unroll``): the scanned form's variables, the
      unrolled form's program. The accelerators' form (``from_config``): a
      TPU keeps a loop's activations for the backward pass in stacked
      buffers laid out for the loop, 3.4x the unrolled program's memory
      (BENCHMARKS.md), while the CPU runs the loop fastest.
    bn_group_size: in training, BatchNorm statistics per group of this many
      images (``GroupBatchNorm``, §4.2's two GPUs); 0: of the whole batch.
    act: the ReLU, wherever the network applies one. The report's deconvnet
      (``layers.deconv_relu``) swaps in a ReLU with another backward pass.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block_cls: Callable[..., nn.Module] = BasicBlock
  stem_cls: type[CifarStem] = CifarStem
  preactivation: bool = False
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  scan_blocks: bool = False
  unroll_scan: bool = False
  bn_group_size: int = 0
  act: Callable[[jax.Array], jax.Array] = nn.relu

  @property
  def total_stride(self) -> int:
    """Input pixels per position of the last stage's maps."""
    return self.stem_cls.stride * 2 ** (len(self.stage_sizes) - 1)

  @nn.compact
  def __call__(self, x, train: bool = True, sizes=None):
    """Logits of images ``x`` (batch, h, w, 3).

    ``sizes`` (batch, 2), in evaluation: each image's height and width
    before zeros padded it at the bottom and right to ``x``'s shape (a
    multiple of ``total_stride``), so that images of many sizes share one
    program (§3.4's multi-scale testing; ``evaluate.probabilities``). Every
    valid output is then the unpadded image's: the padding is zero
    wherever a convolution or the max pool reads it, as the symmetric
    padding of the unpadded maps is (the input, every activation and the
    max pool's output are masked: ``valid_positions``; the pool reads
    activations, never below zero), and the global average is over the
    valid positions.
    """
    conv = functools.partial(conv_layer, dtype=self.dtype)
    act, mask = self.act, lambda y: y
    if sizes is not None:
      valid = functools.partial(valid_positions, sizes, x.shape[1:3])

      def mask(y):
        return y * valid(y)

      def act(y):
        return mask(self.act(y))

    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
    )
    if train and self.bn_group_size:
      norm = functools.partial(
          GroupBatchNorm,
          group_size=self.bn_group_size,
          momentum=0.9,
          epsilon=1e-5,
          dtype=self.dtype,
      )
    x = jnp.asarray(x, self.dtype)
    x = mask(x)  # Normalised padding is not zero.
    stem = self.stem_cls(
        width=self.widths[0], conv=conv, norm=norm, act=act, mask=mask
    )
    nn.share_scope(self, stem)  # conv_init and bn_init are the net's.
    x = stem(x)
    block_cls = self.block_cls
    if self.remat:
      # A block's index is static outside a scanned loop (``PreActBlock``).
      block_cls = nn.remat(self.block_cls, static_argnums=(2,))
      scanned_cls = nn.remat(self.block_cls)
    else:
      scanned_cls = block_cls
    index = 0
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      shared = dict(width=width, conv=conv, norm=norm, act=act)
      x = block_cls(
          strides=2 if i > 0 else 1, name=f'stage{i + 1}_block1', **shared
      )(x, index)
      if self.scan_blocks and size > 1:
        # Blocks 2..n of a stage have the same shapes: one loop body, its
        # parameters and BN statistics stacked along a leading axis, its
        # index and random streams one per iteration.
        repeat = nn.scan(
            lambda module, x, index: (module(x, index), None),
            variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0},
            split_rngs={'params': True, 'dropout': True},
            length=size - 1,
            unroll=self.unroll_scan,
        )
        x, _ = repeat(
            scanned_cls(strides=1, name=scanned_name(i + 1), **shared),
            x,
            jnp.arange(index + 1, index + size),
        )
      else:
        for j in range(1, size):
          x = block_cls(strides=1, name=f'stage{i + 1}_block{j + 1}', **shared)(
              x, index + j
          )
      index += size
      self.sow('intermediates', f'stage{i + 1}', x)
    if self.preactivation:
      x = act(norm(name='bn_final')(x))
    if sizes is None:
      x = jnp.mean(x, axis=(1, 2))
    else:  # The last activation zeroed the padding.
      x = x.sum((1, 2)) / valid(x).sum((1, 2))
    x = nn.Dense(
        self.num_classes, dtype=self.dtype, kernel_init=he_normal, name='head'
    )(x)
    return jnp.asarray(x, jnp.float32)


def valid_positions(sizes, full, y):
  """1 where ``y``'s positions see only an image's valid pixels, else 0.

  ``sizes`` (batch, 2) are the images' heights and widths before padding
  them to ``full``, a multiple of the network's total stride: ``y``'s
  stride is then ``full / y.shape[1:3]``, and a stride-s map of h valid
  rows has ceil(h / s) of them (3x3/2 and 7x7/2 convs with symmetric
  padding, the 3x3/2 max pool and option A's subsampling alike). Returns
  (batch, h, w, 1) in ``y``'s dtype.
  """
  if full[0] % y.shape[1] or full[1] % y.shape[2]:
    raise ModelError(
        f'padded images of {full[0]}x{full[1]} pixels are not a multiple '
        f"of the network's total stride"
    )
  stride = jnp.array([full[0] // y.shape[1], full[1] // y.shape[2]])
  limit = -(-sizes // stride)  # (batch, 2)
  rows = jnp.arange(y.shape[1]) < limit[:, :1]
  cols = jnp.arange(y.shape[2]) < limit[:, 1:]
  return (rows[:, :, None] & cols[:, None, :])[..., None].astype(y.dtype)


def cifar_blocks_per_stage(depth: int, bottleneck: bool = False) -> int:
  """n of a CIFAR net of depth 6n+2 (§4.2), or 9n+2 with bottleneck blocks
  (Identity Mappings); raises ModelError for any other depth."""
  layers = 9 if bottleneck else 6
  if depth < layers + 2 or (depth - 2) % layers:
    raise ModelError(
        f'CIFAR nets have depth 6n+2 with n >= 1 (20, 32, 44, 56, 110, '
        f'1202), or 9n+2 with bottleneck blocks (164, 1001), got {depth}'
        f'{" with bottleneck blocks" if bottleneck else ""}'
    )
  return (depth - 2) // layers


def create_model(
    *,
    model: str,
    depth: int,
    num_classes: int,
    residual: bool = True,
    shortcut: str = 'A',
    stem: str = '',
    bottleneck_stride: str = '1x1',
    zero_init_residual: bool = False,
    dtype: str = 'float32',
    remat: bool = False,
    scan_blocks: bool = False,
    preactivation: bool = False,
    block: str = '',
    bn_group_size: int = 0,
) -> ResNet:
  """The preset of a paper network by family and depth: its stages, widths,
  stem and block class (with its options bound); raises ModelError
  otherwise.

  ``stem`` and ``block`` are '' for the family's own (the 3x3 stem of §4.2
  on CIFAR, Table 1's 7x7 on ImageNet; 'basic' blocks on CIFAR, Table 1's
  on ImageNet); 'bottleneck' makes the CIFAR nets of *Identity Mappings*,
  depth 9n+2 with 64/128/256 outputs (ResNet-164, ResNet-1001). Every
  argument but ``num_classes`` is the config field of the same name
  (``from_config``).
  """
  if shortcut not in SHORTCUTS:
    raise ModelError(
        f'shortcut must be one of {", ".join(SHORTCUTS)} (§3.3), '
        f'got {shortcut!r}'
    )
  if bottleneck_stride not in BOTTLENECK_STRIDES:
    raise ModelError(
        f'bottleneck_stride must be "1x1" (paper) or "3x3" '
        f'(v1.5), got {bottleneck_stride!r}'
    )
  if dtype not in ('float32', 'bfloat16'):
    raise ModelError(f'dtype must be float32 or bfloat16, got {dtype!r}')
  if block not in ('', 'basic', 'bottleneck'):
    raise ModelError(f'block must be "basic" or "bottleneck", got {block!r}')
  if model == 'cifar':
    if stem not in ('', '3x3'):
      raise ModelError(f'the CIFAR nets of §4.2 have a 3x3 stem, got {stem!r}')
    bottleneck = block == 'bottleneck'
    n = cifar_blocks_per_stage(depth, bottleneck)
    stage_sizes, widths, stem = (n,) * 3, CIFAR_WIDTHS, '3x3'
  elif model == 'imagenet':
    if depth not in IMAGENET_STAGES:
      raise ModelError(
          f'ImageNet nets (Table 1) have depth '
          f'{", ".join(map(str, IMAGENET_STAGES))}, got {depth}'
      )
    if stem not in ('', *STEMS):
      raise ModelError(f'stem must be "7x7" or "3x3", got {stem!r}')
    stage_sizes, bottleneck = IMAGENET_STAGES[depth]
    if block and (block == 'bottleneck') != bottleneck:
      raise ModelError(
          f'ImageNet-{depth} has '
          f'{"bottleneck" if bottleneck else "basic"} blocks '
          f'(Table 1), got block={block!r}'
      )
    widths, stem = IMAGENET_WIDTHS, stem or '7x7'
  else:
    raise ModelError(
        f'unknown model {model!r}: use "cifar" (§4.2) or '
        f'"imagenet" (Table 1)'
    )
  block_cls = {
      (False, False): BasicBlock,
      (True, False): BottleneckBlock,
      (False, True): PreActBlock,
      (True, True): PreActBottleneckBlock,
  }[bottleneck, preactivation]
  block_options = dict(
      shortcut=shortcut,
      residual=residual,
      zero_init_residual=zero_init_residual,
  )
  if bottleneck:
    block_options['bottleneck_stride'] = bottleneck_stride
  return ResNet(
      stage_sizes=stage_sizes,
      widths=widths,
      block_cls=functools.partial(block_cls, **block_options),
      stem_cls=STEMS[stem],
      preactivation=preactivation,
      num_classes=num_classes,
      dtype=jnp.dtype(dtype),
      remat=remat,
      scan_blocks=scan_blocks,
      bn_group_size=bn_group_size,
  )


def param_count(params) -> int:
  """Number of trainable parameters (BN running statistics are not)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def blocks_in_order(params) -> list[tuple[str, int, int]]:
  """(name, stage, number) of each block of the unrolled form
  (``stageS_blockB``), in the network's order."""
  return sorted(
      (
          (name, int(m[1]), int(m[2]))
          for name in params
          if (m := BLOCK_NAME.fullmatch(name))
      ),
      key=lambda b: b[1:],
  )


def _holds_blocks(node) -> bool:
  """Whether ``node`` is a dict of a network's blocks (in either form)."""
  return isinstance(node, dict) and any(
      BLOCK_NAME.fullmatch(k) or SCANNED_NAME.fullmatch(k) for k in node
  )


def stack_blocks(tree):
  """``tree`` with its blocks in the scanned form (``scan_blocks``): the one
  way the unrolled form becomes the scanned one.

  ``tree`` is any pytree that holds the network's variables (variables, a
  training state, an optimiser's state): in every dict of blocks, blocks
  2..n of each stage are stacked, in order, under ``scanned_name(stage)``.
  A tree in the scanned form is returned as it is.
  """

  def stack(node):
    if not _holds_blocks(node):
      return node
    out, stacks = {}, {}
    for name, value in node.items():
      match = BLOCK_NAME.fullmatch(name)
      if match and int(match[2]) > 1:
        stacks.setdefault(int(match[1]), {})[int(match[2])] = value
      else:
        out[name] = value
    for stage, blocks in stacks.items():
      out[scanned_name(stage)] = jax.tree.map(
          lambda *a: jnp.stack(a), *(blocks[j] for j in sorted(blocks))
      )
    return out

  return jax.tree.map(stack, tree, is_leaf=_holds_blocks)


def unroll_blocks(tree):
  """``tree`` with its blocks in the unrolled form: ``stack_blocks``'s
  inverse. A tree in the unrolled form is returned as it is."""

  def unroll(node):
    if not _holds_blocks(node):
      return node
    out = {}
    for name, value in node.items():
      match = SCANNED_NAME.fullmatch(name)
      if not match:
        out[name] = value
        continue
      for j in range(len(jax.tree.leaves(value)[0])):
        out[f'stage{match[1]}_block{j + 2}'] = jax.tree.map(
            lambda a, j=j: a[j], value
        )
    return out

  return jax.tree.map(unroll, tree, is_leaf=_holds_blocks)


def scanned(params) -> bool:
  """Whether ``params`` (or any dict of blocks) are in the scanned form; a
  network with one block per stage is in both."""
  return not any(
      (m := BLOCK_NAME.fullmatch(name)) and int(m[2]) > 1 for name in params
  )


def in_form(tree, scan_blocks: bool):
  """``tree`` (as ``stack_blocks`` takes) in the scanned or unrolled form."""
  return stack_blocks(tree) if scan_blocks else unroll_blocks(tree)


def from_config(config, num_classes: int, platform: str = '') -> ResNet:
  """The network a config names (fields as in configs/default.py), in the
  form that runs best on ``platform`` ('cpu', 'tpu', 'gpu'; default: JAX's
  backend): scanned blocks loop on the CPU and are unrolled in the program
  elsewhere (``unroll_scan``). Both forms have the same variables."""
  model = create_model(
      num_classes=num_classes,
      **{field: config[field] for field in CONFIG_FIELDS},
  )
  return model.clone(unroll_scan=(platform or jax.default_backend()) != 'cpu')


# The config fields that make the network: create_model's arguments. Those
# of ARCHITECTURE make its parameters (the rest: their initialisation,
# arithmetic, memory and form, and BatchNorm's batches in training).
CONFIG_FIELDS = tuple(
    name
    for name in inspect.signature(create_model).parameters
    if name != 'num_classes'
)
ARCHITECTURE = (
    'model',
    'depth',
    'residual',
    'shortcut',
    'stem',
    'bottleneck_stride',
    'preactivation',
    'block',
)


def display_name(config) -> str:
  """The paper's name for a config's network, e.g. 'ResNet-56', 'plain-34' or
  'pre-act ResNet-164'."""
  name = f'{"ResNet" if config.residual else "plain"}-{config.depth}'
  return f'pre-act {name}' if config.preactivation else name
