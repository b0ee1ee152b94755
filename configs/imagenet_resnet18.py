"""ResNet-18 on ImageNet (Table 1, §3.4); the ImageNet recipe of the paper.

Batch 256, learning rate 0.1 divided by 10 "when the error plateaus" up to
60e4 iterations (here: fixed drops at 150k, 300k and 450k), weight decay 1e-4,
momentum 0.9, scale augmentation (shorter side in [256, 480], 224 crop, flip),
per-pixel mean subtraction. The paper's colour augmentation is not included.
Option B shortcuts (Table 3's ResNet-18/34 B; torchvision's 11,689,512
parameters); use --config.shortcut=A for Table 2's.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.model = 'imagenet'
  config.depth = 18
  config.shortcut = 'B'
  config.dataset = 'imagenet2012'
  config.validation_size = 0  # ImageNet has its own validation split.
  config.batch_size = 256
  config.train_length = 600_000
  config.lr_boundaries = (150_000, 300_000, 450_000)
  config.eval_every_steps = 10_000
  config.eval_batch_size = 250
  config.checkpoint_every_steps = 10_000
  return config
