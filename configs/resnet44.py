"""ResNet-44 on CIFAR-10 (§4.2, Table 6), option A shortcuts."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.depth = 44
  return config
