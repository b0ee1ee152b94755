"""Pre-activation ResNet-200 on ImageNet (Identity Mappings, 2016, Table 5).

Bottleneck pre-activation units in stages of 3, 24, 36 and 3, projection
shortcuts where the dimensions grow; the ImageNet recipe of
configs/imagenet_resnet18.py.
"""

from configs import imagenet_resnet18


def get_config():
  config = imagenet_resnet18.get_config()
  config.depth = 200
  config.preactivation = True
  return config
