"""Pre-activation ResNet-1001 on CIFAR-10 (Identity Mappings, 2016, Table 3).

Bottleneck pre-activation units (depth 9n+2, n = 111), the recipe of
configs/preact_resnet110.py, each unit rematerialised in the backward pass
as ResNet-1202 is. The paper reports 10.2M parameters and 4.92% CIFAR-10
error (batch 128).
"""

from configs import preact_resnet164


def get_config():
  config = preact_resnet164.get_config()
  config.depth = 1001
  config.remat = True
  return config
