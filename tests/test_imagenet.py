"""ImageNet (§3.4) through TFDS mock data: the pipeline and a short run."""

import numpy as np
import pytest

from configs import imagenet_resnet18
from resnet_jax import data
from resnet_jax import imagenet
from resnet_jax import train

VALIDATION = 10  # Images in the mocked validation split.


@pytest.fixture
def mock_imagenet(tmp_path):
  """Mocked imagenet2012 whose metadata names its splits and their sizes."""
  tfds = data.import_tfds()
  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path))
  builder_dir = tmp_path / 'imagenet2012' / str(builder.version)
  builder_dir.mkdir(parents=True)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(
          name=name, shard_lengths=[size], num_bytes=0,
          filename_template=tfds.core.ShardedFileTemplate(
              data_dir=str(builder_dir), dataset_name='imagenet2012',
              split=name, filetype_suffix='tfrecord'))
      for name, size in (('train', 40), ('validation', VALIDATION))]))
  builder.info.write_to_directory(str(builder_dir))
  config = imagenet_resnet18.get_config()
  config.data_dir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=VALIDATION, data_dir=str(tmp_path),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield config


def test_training_batches_are_224_crops(mock_imagenet):
  images, labels = next(imagenet.train_batches(
      mock_imagenet, seed=0, batch_size=4))
  assert images.shape == (4, 224, 224, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and np.all((labels >= 0) & (labels < 1000))


@pytest.mark.parametrize('ten_crop, shape', [(False, (224, 224, 3)),
                                             (True, (10, 224, 224, 3))])
def test_eval_batches_are_padded_and_masked(mock_imagenet, ten_crop, shape):
  batches = list(imagenet.eval_batches(mock_imagenet, 'test',
                                                      4, ten_crop))
  assert len(batches) == 3  # ceil(10 / 4).
  assert all(images.shape == (4,) + shape for images, _, _ in batches)
  masks = np.concatenate([mask for _, _, mask in batches])
  np.testing.assert_array_equal(masks, [1] * VALIDATION + [0] * 2)
  if ten_crop:  # Crops 5-9 are the flips of crops 0-4.
    images = batches[0][0]
    np.testing.assert_array_equal(images[:, 5:], images[:, :5, :, ::-1])


def test_no_held_out_split(mock_imagenet):
  # ImageNet's validation images are the paper's test set: none is held out.
  with pytest.raises(data.DataError, match="no 'validation' split"):
    next(imagenet.eval_batches(mock_imagenet, 'validation', 4,
                                              False))


def test_imagenet_resnet18_trains_and_evaluates(mock_imagenet, tmp_path,
                                                monkeypatch):
  config = mock_imagenet
  config.batch_size = config.eval_batch_size = 8
  config.train_length = 2
  config.lr_boundaries = (1,)
  config.log_every_steps = config.eval_every_steps = 1
  config.checkpoint_every_steps = 2
  evaluations = []
  evaluate = train.evaluate
  monkeypatch.setattr(train, 'evaluate', lambda *args: evaluations.append(
      evaluate(*args)) or evaluations[-1])
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  # The test set is evaluated after steps 1 and 2, and the final test is the
  # step-2 evaluation, not a third pass over the same images.
  assert len(evaluations) == 2 and result == evaluations[-1]
  assert result['images'] == VALIDATION
  assert 0 <= result['top5_error'] <= result['error'] <= 100
  assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()
