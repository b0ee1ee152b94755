"""ResNet-1202 on CIFAR-10 (§4.2, "Exploring over 1000 layers"), with warm-up.

Each block is rematerialised in the backward pass (config.remat): at batch 128
the activations kept for the backward pass shrink from 23.35 GiB, more than a
16 GB accelerator holds, to 2.84 GiB (jax's count of the saved residuals; see
BENCHMARKS.md).
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.depth = 1202
  config.warmup_steps = 400
  config.remat = True
  return config
