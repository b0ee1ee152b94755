"""A workdir's checkpoint, restored on this machine's devices and tested.

``--mode=eval`` and the report's selection by validation error use it: the
run's own network and data settings (config.json), any device count. It also
tests as §3.4 does for Tables 4 and 5: whole images at several scales
(``config.test_scales``), and ensembles of runs (``evaluate_ensemble``), each
image scored by its softmax averaged over its views and the members.
"""

import functools
import pathlib

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from resnet_jax import data
from resnet_jax import devices as devices_lib
from resnet_jax import metrics
from resnet_jax import train
from resnet_jax import workdir as workdir_lib


def check_run(config, workdir) -> pathlib.Path:
  """The workdir, if it holds a run of ``config``'s network (else raises)."""
  workdir = pathlib.Path(workdir)
  if not workdir_lib.check_model(config, workdir):
    raise workdir_lib.WorkdirError(f'{workdir} holds no run (no config.json)')
  return workdir


def restore_checkpoint(config, workdir: str, step: int = -1):
  """A workdir's checkpoint (the latest if step < 0), on this machine's devices.

  Returns (inputs, steps, state) as ``train.setup`` does, the state restored.
  """
  workdir = check_run(config, workdir)
  inputs, steps, state, _ = train.setup(config)
  state = workdir_lib.load(
      workdir, workdir_lib.abstract(state, steps.replicated), step
  )
  return inputs, steps, state


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """Test metrics of a workdir's checkpoint (config.eval_checkpoint_step).

  With ``config.test_scales``, of whole images at those scales (§3.4): top-1
  and top-5 error and images, without the loss.
  """
  if config.test_scales:
    return evaluate_ensemble([(config, workdir)])['members'][0]
  inputs, steps, state = restore_checkpoint(
      config, workdir, config.eval_checkpoint_step
  )
  return {
      'step': int(state.step),
      **train.evaluate(steps, state, inputs.eval(metrics.TEST)),
  }


@jax.jit
def probabilities(state, images, sizes=None):
  """Each image's softmax, averaged over its views: its crops or, for whole
  images (with their ``sizes`` before padding: any size, the network is
  fully convolutional), the image and its flip. Whole images are normalised
  by the mean image's average colour: a per-pixel mean has the training
  crops' size only."""
  if sizes is not None:
    state = state.replace(mean=state.mean.mean((0, 1)))
    images = jnp.stack([images, flip(images, sizes[:, 1])], 1)
  return jax.nn.softmax(train.classify(state, images, sizes))


def flip(images, widths):
  """Images mirrored left to right within their first ``widths`` columns;
  the padding to their right stays where it is."""
  columns = images.shape[2]
  source = (widths[:, None] - 1 - jnp.arange(columns)) % columns
  return jnp.take_along_axis(images, source[:, None, :, None], axis=2)


def test_batches(config):
  """This process's test batches: (images, labels, mask[, index, sizes])."""
  if not config.test_scales:
    return train.dataset_inputs(config, mesh=None).eval(metrics.TEST)
  # ImageNet's (train.check_test_scales).
  from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top

  return imagenet.multiscale_batches(
      config,
      metrics.TEST,
      config.eval_batch_size,
      tuple(config.test_scales),
      jax.local_device_count(),
  )


def test_probabilities(config, workdir):
  """(step, probabilities, labels) of this process's test images.

  The class probabilities of each image, in the split's order: its softmax
  averaged over its views (``probabilities``), at every scale. Each process
  tests its own images on its own devices: whole images come in shapes the
  other processes need not share.
  """
  train.check_config(config)
  workdir = check_run(config, workdir)
  mesh = devices_lib.make_mesh(
      {'eval_batch_size': config.eval_batch_size // jax.process_count()},
      jax.local_devices(),
  )
  state = workdir_lib.load(
      workdir,
      workdir_lib.abstract(
          train.state_shapes(config), devices_lib.replicated(mesh)
      ),
      config.eval_checkpoint_step,
  )
  sums, views, labels = {}, {}, {}
  position = 0
  for images, batch_labels, mask, *whole in test_batches(config):
    # Without an index, the batches come in order, padding last.
    index, sizes = whole or (position + np.arange(len(mask)), None)
    position += len(mask)
    probs = np.asarray(
        probabilities(
            state,
            jax.device_put(images, devices_lib.split(mesh)),
            None
            if sizes is None
            else jax.device_put(sizes, devices_lib.split(mesh)),
        )
    )
    for i, label, p in zip(
        index[mask > 0], batch_labels[mask > 0], probs[mask > 0]
    ):
      sums[i] = sums.get(i, 0) + p
      views[i] = views.get(i, 0) + 1
      labels[i] = label
  order = sorted(sums)
  return (
      int(state.step),
      np.stack([sums[i] / views[i] for i in order]),
      np.array([labels[i] for i in order]),
  )


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Top-1/top-5 error (%) of class probabilities, over every process's
  images."""
  top5 = np.argsort(-probs, axis=1, kind='stable')[:, :5]
  counts = np.array(
      [
          np.sum(top5[:, 0] != labels),
          np.sum(np.all(top5 != labels[:, None], axis=1)),
          len(labels),
      ]
  )
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(counts).sum(0)
  errors, top5_errors, images = counts
  return {
      'error': 100 * errors / images,
      'top5_error': 100 * top5_errors / images,
      'images': int(images),
  }


def evaluate_ensemble(runs) -> dict:
  """An ensemble's test error (Table 5): the softmax averaged over runs.

  ``runs`` are (config, workdir) pairs. Each member is tested as
  ``--mode=eval`` tests it alone: its network, normalisation (of its own copy
  of the uint8 images), checkpoint (``eval_checkpoint_step``) and views
  (``test_scales`` or ``ten_crop``). They must share the test images.
  Returns the ensemble's error, top5_error and images, and 'members': each
  one's workdir, step and own errors.
  """
  datasets = {config.dataset for config, _ in runs}
  if len(datasets) > 1:
    raise data.DataError(
        "an ensemble's members must be tested on the same images: "
        + ', '.join(f'{w} is of {c.dataset}' for c, w in runs)
    )
  total, labels, members = 0, None, []
  for config, workdir in runs:
    step, probs, own = test_probabilities(config, workdir)
    if labels is not None and not np.array_equal(own, labels):
      raise data.DataError(
          f"an ensemble's members must be tested on the same images: "
          f"{workdir}'s test set ({len(own)} images) is not "
          f"{runs[0][1]}'s ({len(labels)})"
      )
    labels, total = own, total + probs
    members.append(
        {'workdir': str(workdir), 'step': step, **scores(probs, labels)}
    )
  return {**scores(total / len(runs), labels), 'members': members}
