"""ResNet-18 on ImageNet (Table 1, §3.4); the ImageNet recipe of the paper.

Batch 256, learning rate 0.1 divided by 10 "when the error plateaus" up to
60e4 iterations (here: after 3 validations, 30k iterations, without a new best
validation error; the paper gives no patience), weight decay 1e-4,
momentum 0.9, scale augmentation (shorter side in [256, 480], 224 crop, flip),
per-pixel mean subtraction, and the colour augmentation of [21]. 10,000
training images are held out as the validation set, where the error is
watched (and the plateaus seen); ImageNet's own validation images are the
test set.
Option B shortcuts (Table 3's ResNet-18/34 B; torchvision's 11,689,512
parameters); use --config.shortcut=A for Table 2's.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.model = 'imagenet'
  config.depth = 18
  config.shortcut = 'B'
  config.dataset = 'imagenet2012'
  config.validation_size = 10_000  # Held out of the training images, to see
  # when the error plateaus (§3.4) without the test set (ImageNet's 50k
  # validation images, §4.1).
  config.pca_lighting = 0.1  # §3.4: "the standard color augmentation in
  # [21]" (Krizhevsky et al., 2012, std 0.1).
  config.batch_size = 256
  config.train_length = 600_000
  config.lr_schedule = 'plateau'  # §3.4: "divided by 10 when the error
  # plateaus", decided on the validation error.
  config.lr_patience = 3  # Evaluations, eval_every_steps apart.
  config.lr_boundaries = ()  # None: the plateaus decide.
  config.eval_every_steps = 10_000
  config.eval_batch_size = 256  # Splits over 1 to 256 chips; the last
  # batch of the 50k test images is padded and masked.
  config.checkpoint_every_steps = 10_000
  return config
