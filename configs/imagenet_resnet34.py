"""ResNet-34 on ImageNet (Table 1), option B; recipe of imagenet_resnet18."""

from configs import imagenet_resnet18


def get_config():
  config = imagenet_resnet18.get_config()
  config.depth = 34
  return config
