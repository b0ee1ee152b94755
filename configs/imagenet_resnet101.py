"""ResNet-101 on ImageNet (Table 1, bottleneck blocks), option B."""

from configs import imagenet_resnet18


def get_config():
  config = imagenet_resnet18.get_config()
  config.depth = 101
  return config
