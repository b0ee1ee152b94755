"""Plain-34 on ImageNet (Table 1, Table 2, Fig. 4 left)."""

from configs import imagenet_resnet18


def get_config():
  config = imagenet_resnet18.get_config()
  config.depth = 34
  config.residual = False
  return config
