"""Pre-activation ResNet-164 on CIFAR-10 (Identity Mappings, 2016, Table 3).

Bottleneck pre-activation units (depth 9n+2, n = 18; 64/128/256 outputs),
the recipe of configs/preact_resnet110.py. The paper reports 1.7M parameters
and 5.46% CIFAR-10 error.
"""

from configs import preact_resnet110


def get_config():
  config = preact_resnet110.get_config()
  config.depth = 164
  config.block = 'bottleneck'
  return config
