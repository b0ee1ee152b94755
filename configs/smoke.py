"""A tiny ResNet-8 on synthetic CIFAR-shaped data: trains in seconds on a CPU.

Used by the tests and as the offline demo; nothing is downloaded.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.depth = 8
  config.data_source = 'synthetic'
  config.synthetic_train_size = 256
  config.validation_size = 64
  config.batch_size = 32
  config.train_length = 20
  config.lr_boundaries = (10, 15)
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.eval_batch_size = 64
  config.checkpoint_every_steps = 10
  return config
