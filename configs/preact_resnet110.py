"""Pre-activation ResNet-110 on CIFAR-10 (Identity Mappings, 2016, Table 2).

Basic pre-activation units (depth 6n+2), projection shortcuts where the
dimensions grow (as in the authors' code), and the paper's CIFAR recipe:
batch 128, learning rate 0.1 divided by 10 at 32k and 48k iterations, stop
at 64k, weight decay 1e-4, with the 400-step warm-up at 0.01 of the original
ResNet-110.
"""

from configs import resnet110


def get_config():
  config = resnet110.get_config()
  config.preactivation = True
  config.shortcut = 'B'
  return config
