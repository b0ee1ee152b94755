"""ResNet-110 on CIFAR-10 (§4.2, Table 6), with the paper's warm-up.

The paper trains at 0.01 until the training error is below 80% (about 400
iterations), then goes back to 0.1; here the warm-up is those 400 steps."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.depth = 110
  config.warmup_steps = 400
  return config
