"""ResNet-1202 on CIFAR-10 (§4.2, "Exploring over 1000 layers"), with warm-up."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.depth = 1202
  config.warmup_steps = 400
  return config
