"""Plain-110 on CIFAR-10 (§4.2): ResNet-110 without shortcuts, same warm-up."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.depth = 110
  config.residual = False
  config.warmup_steps = 400
  return config
