"""ResNet-18 on CIFAR-10 as in the common PyTorch reproductions.

Table 1's ResNet-18 stages (basic blocks, 64/128/256/512 filters, option B
projections) behind a 3x3/1 stem without max pool, for 32-pixel images
(11,173,962 parameters). Trained the reproductions' way: all 50k images,
per-channel normalisation, 164 epochs with the learning rate divided by 10
after epochs 81 and 122, weight decay 5e-4.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.model = 'imagenet'
  config.depth = 18
  config.stem = '3x3'
  config.shortcut = 'B'
  config.validation_size = 0
  config.normalization = 'per_channel'
  config.weight_decay = 5e-4
  config.schedule_unit = 'epochs'
  config.train_length = 164
  config.lr_boundaries = (81, 122)
  return config
