"""A workdir's checkpoint, restored on this machine's devices and tested.

``--mode=eval`` and the report's selection by validation error use it: the
run's own network and data settings (config.json), any device count.
"""

import pathlib

from resnet_jax import metrics
from resnet_jax import train
from resnet_jax import workdir as workdir_lib


def restore_checkpoint(config, workdir: str, step: int = -1):
  """A workdir's checkpoint (the latest if step < 0), on this machine's devices.

  Returns (inputs, steps, state) as ``train.setup`` does, the state restored.
  """
  workdir = pathlib.Path(workdir)
  if not workdir_lib.check_model(config, workdir):
    raise workdir_lib.WorkdirError(f'{workdir} holds no run (no config.json)')
  inputs, steps, state, _ = train.setup(config)
  state = workdir_lib.load(
      workdir, workdir_lib.abstract(state, steps.replicated), step)
  return inputs, steps, state


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """Test metrics of a workdir's checkpoint (config.eval_checkpoint_step)."""
  inputs, steps, state = restore_checkpoint(config, workdir,
                                            config.eval_checkpoint_step)
  return {'step': int(state.step), **train.evaluate(
      steps, state, inputs.eval(metrics.TEST))}
