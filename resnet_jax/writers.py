"""Where a run's scalars go besides metrics.jsonl: the log and TensorBoard.

One clu writer; scalars are named ``split/metric`` (TensorBoard groups them
by split). metrics.jsonl is ``metrics.append``'s. Imports clu, and with it
TensorFlow.
"""

import pathlib

from resnet_jax import data

data.import_tensorflow()  # Off the accelerators before clu imports it.
# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers


def create(
    workdir: pathlib.Path, main_process: bool
) -> metric_writers.MetricWriter:
  """The log on every process; TensorBoard too on process 0.

  TensorBoard's events are written at once, in the training loop's thread,
  so that a full disk is raised where the run can stop and say so (clu's
  background thread would raise it one call late, wrapped in another error).
  A few scalars every log_every_steps steps: nothing to hide behind a thread.
  """
  if not main_process:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.create_default_writer(workdir, asynchronous=False)
