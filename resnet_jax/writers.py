"""Where a run's scalars go: the log, TensorBoard and metrics.jsonl.

One clu ``MultiWriter``. Scalars are named ``split/metric`` (TensorBoard
groups them by split; ``JsonlWriter`` makes one metrics.jsonl record of each
split's scalars). Imports clu, and with it TensorFlow.
"""

import pathlib

from resnet_jax import data

data.import_tensorflow()  # Off the accelerators before clu imports it.
# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers

from resnet_jax import atomic
from resnet_jax import metrics


class JsonlWriter(metric_writers.MetricWriter):
  """Appends each step's ``split/metric`` scalars to metrics.jsonl."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / metrics.FILENAME

  def write_scalars(self, step, scalars):
    splits = {}
    for name, value in scalars.items():
      split, _, metric = name.partition('/')
      if metric:  # Progress scalars (steps_per_sec, uptime) are the log's.
        splits.setdefault(split, {})[metric] = value
    with atomic.naming(self.path), self.path.open('a') as f:
      for split, values in splits.items():
        f.write(metrics.line(step, split, values))

  # Only scalars go to metrics.jsonl.
  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass  # config.json holds them.

  def flush(self):
    pass  # Each record is written when it comes.

  def close(self):
    pass


def create(workdir: pathlib.Path, main_process: bool
           ) -> metric_writers.MetricWriter:
  """The log on every process; TensorBoard and metrics.jsonl on process 0."""
  if not main_process:
    return metric_writers.create_default_writer(just_logging=True)
  # Both at once, in the training loop's thread: metrics.jsonl because a
  # resume trims it to its checkpoint, TensorBoard's events so that a full
  # disk is raised where the run can stop and say so (from clu's background
  # thread it came one call late, wrapped in another error). A few scalars
  # every log_every_steps steps: nothing to hide behind a thread.
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(workdir)])
