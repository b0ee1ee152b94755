"""Every field of a resnet_jax run, set to the paper's CIFAR-10 recipe (§4.2).

The defaults train ResNet-20 exactly as the paper does: batch 128 on the 45k/5k
train/validation split, momentum SGD with learning rate 0.1 divided by 10 at
32k and 48k iterations, stopping at 64k; weight decay 1e-4; per-pixel mean
subtraction; 4-pixel padding, random 32x32 crops and horizontal flips. Every
other config file is a small diff of this one.
"""

import ml_collections


def get_config():
  """The paper's ResNet-20 on CIFAR-10 (§4.2, Table 6)."""
  config = ml_collections.ConfigDict()

  # Model (resnet_jax/models.py).
  config.model = 'cifar'  # 'cifar' (§4.2, depth 6n+2) | 'imagenet' (Table 1).
  config.depth = 20  # cifar: 6n+2 (20, 32, 44, 56, 110, 1202); imagenet:
  # 18, 34, 50, 101, 152.
  config.residual = True  # False builds the plain net (no shortcuts).
  config.shortcut = 'A'  # §3.3: 'A' zero-padding, 'B' projections where
  # dimensions grow, 'C' projections everywhere.
  config.stem = ''  # '' = the family's own; imagenet nets take '3x3' (a 3x3/1
  # conv, no max pool, for 32-px images) or '7x7' (Table 1).
  config.bottleneck_stride = (
      '1x1'  # '1x1' paper (v1); '3x3' torchvision (v1.5).
  )
  config.zero_init_residual = False  # Zero the last BN scale of each branch.
  config.preactivation = False  # True: the full pre-activation units of
  # Identity Mappings in Deep Residual Networks (He et al., 2016).
  config.block = ''  # '' = the family's own (cifar: basic; imagenet: Table 1);
  # 'bottleneck' on cifar: depth 9n+2 (ResNet-164, ResNet-1001 of the 2016 paper).
  config.dtype = 'float32'  # Computation dtype: 'float32' | 'bfloat16'.
  config.init_from = ''  # A workdir (e.g. of converted PyTorch weights,
  # resnet_jax/convert.py) whose latest parameters and BN statistics start a
  # new run (fine-tuning; not its optimiser or step).
  config.remat = False  # Recompute each block in the backward pass
  # (jax.checkpoint): less memory for the deepest nets, same results.
  config.scan_blocks = True  # Run blocks 2..n of each stage as one loop
  # (nn.scan over stacked parameters): compile time independent of depth,
  # the fastest form on CPU (BENCHMARKS.md); False unrolls every block.
  config.steps_per_dispatch = 1  # Training steps per jitted call (a loop in
  # the program): small nets on accelerators pay the host round trip once per
  # call. The log, eval and checkpoint intervals must be multiples of it.

  # Data.
  config.dataset = 'cifar10'  # 'cifar10' | 'cifar100' | 'imagenet2012'.
  config.data_source = 'tfds'  # 'tfds' | 'archive' (a local copy of the
  # official CIFAR archive) | 'synthetic' (random data of the same shapes).
  config.data_dir = ''  # TFDS data_dir, or the archive file or folder.
  config.validation_size = 5000  # Held out of the 50k training images (the
  # paper's 45k/5k split); 0 trains on all 50k and evaluates on test.
  config.normalization = 'per_pixel_mean'  # Paper: 'per_pixel_mean';
  # seed reproductions: 'per_channel' (mean/std), both from the training split.
  config.augment = True  # Paper: 4-pixel zero padding, random crop, flip.
  config.pca_lighting = 0.0  # ImageNet: the std of §3.4's "standard color
  # augmentation in [21]" (AlexNet's noise along the principal components of
  # the RGB pixels; 0.1 there); 0 = none.
  config.synthetic_train_size = 512  # Images per split when synthetic.

  # Optimisation: momentum SGD with decoupled L2 (optax).
  config.batch_size = 128  # Global, across all devices and hosts.
  config.bn_group_size = 0  # Images per BatchNorm group in training: 0 = the
  # whole global batch on any device count; 64 = §4.2's "mini-batch size of
  # 128 on two GPUs", each GPU normalising its own 64 images.
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.weight_decay_mask = 'all'  # 'all' parameters (paper) | 'kernels'.
  config.schedule_unit = 'steps'  # Unit of train_length and lr_boundaries:
  # 'steps' (paper: iterations) | 'epochs' (seed reproductions).
  config.train_length = 64000
  config.lr_boundaries = (32000, 48000)
  config.lr_factor = 0.1  # Learning rate multiplier at each boundary.
  config.lr_schedule = 'piecewise'  # 'piecewise': x lr_factor at each of
  # lr_boundaries (§4.2); 'plateau': x lr_factor when the validation error
  # has not improved for lr_patience evaluations (§3.4: "divided by 10 when
  # the error plateaus"); needs validation_size > 0.
  config.lr_patience = 3  # Evaluations (eval_every_steps apart), plateau only.
  config.warmup_steps = 0  # ResNet-110/1202: 400 steps at 0.01 (§4.2).
  config.warmup_learning_rate = 0.01

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.eval_batch_size = 1000
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3  # Latest K, plus the best by validation error.
  config.eval_checkpoint_step = -1  # --mode=eval: -1 = latest.
  config.ten_crop = False  # ImageNet: 10-crop testing (Table 3), else the
  # centre 224 crop of the image resized to shorter side 256.
  config.test_scales = ()  # ImageNet, --mode=eval and `report ensemble`:
  # §3.4's fully-convolutional multi-scale testing (Tables 4 and 5), e.g.
  # (224, 256, 384, 480, 640): the whole image at each shorter side and its
  # flip, softmax averaged; () tests the centre crop (or ten_crop's). Not
  # with ten_crop. Training's evaluations never use it (several
  # compilations: too slow to repeat).
  config.test_bucket = 64  # test_scales: each view is padded at the bottom
  # and right to multiples of this many pixels (a multiple of the network's
  # total stride, 32 on ImageNet), masked: one compiled program per bucket,
  # the same scores as each shape's own (models.ResNet's ``sizes``).
  return config
