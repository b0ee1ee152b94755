"""Plain-20 on CIFAR-10 (§4.2, Fig. 6 left): ResNet-20 without shortcuts."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.depth = 20
  config.residual = False
  return config
