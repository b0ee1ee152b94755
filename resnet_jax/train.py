"""Training and evaluation on every device of every host (§3.4, §4.2).

One loop for every scale: ``jax.jit`` over a 1-D ``data`` mesh of all devices
(``devices.py``), the training state replicated and each global batch split
across the devices, so BatchNorm statistics are those of the global batch.
The optimiser is the paper's momentum SGD with weight decay, as decoupled L2
in optax, on a piecewise-constant schedule in iterations (or epochs), or
divided "when the error plateaus" (§3.4).
The data come through ``dataset_inputs``; the workdir (config.json, metrics,
checkpoints) is ``workdir.py``'s. The loop's writers (clu, TensorBoard: they
import TensorFlow) are imported where it runs, so the steps import with jax,
flax, optax and orbax alone.
"""

import collections
from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import functools
import math
import pathlib
import signal
import threading
import time
import warnings
from typing import Any, NamedTuple

from absl import logging
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import atomic
from resnet_jax import cifar
from resnet_jax import cli
from resnet_jax import data
from resnet_jax import devices as devices_lib
from resnet_jax import metrics
from resnet_jax import models
from resnet_jax import workdir as workdir_lib


class TrainingError(cli.UserError):
  """A run that cannot go on: bad settings, a diverged loss."""


# What preemptible VMs, SLURM and Colab send before they end a job (SIGTERM),
# Ctrl-C (SIGINT) and a closed terminal or dropped ssh session (SIGHUP): a
# run stops after the step in flight, with a checkpoint. The command then
# exits with 128 + the signal's number (143, 130, 129), the status a shell
# gives a process the signal ended. SIGQUIT stays the interpreter's.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(Exception):
  """A run stopped by a signal, its state saved at ``step``; ``then`` is
  what the same command does next."""

  def __init__(self, signum: int, step: int, then: str = 'resumes the run'):
    super().__init__(
        f'{signal.Signals(signum).name} at step {step}, its '
        f'checkpoint saved; the same command {then}'
    )
    self.signum, self.step = signum, step


# What a run stopped after its last step (during the final checkpoint's save
# or the final test) has left to do.
FINAL_TEST = 'runs the final test'


@contextlib.contextmanager
def stop_requests():
  """Records STOP_SIGNALS in the list it yields instead of dying of them.

  The training loop looks after each dispatch (``stop_signal``): it stops at
  the step the dispatch in flight ends on. A second signal
  while the run saves only adds to the list: the save is not cut short.
  A signal the process was started ignoring (``nohup``, ``cmd &``) stays
  ignored.
  """
  received = []
  previous = {}
  if threading.current_thread() is not threading.main_thread():
    # Only the main thread may set handlers: a run started from another
    # thread (a notebook's, a user's pool) keeps the process's handlers.
    yield received
    return
  for signum in STOP_SIGNALS:
    if signal.getsignal(signum) is not signal.SIG_IGN:
      previous[signum] = signal.signal(
          signum, lambda signum, frame: received.append(signum)
      )
  try:
    yield received
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def stop_signal(received: list[int]) -> int:
  """The signal to stop at this step for (0: none), the same on every host.

  Each host's signal handler sees only its own signals (a scheduler may
  signal one host, or each at another moment): the hosts agree after every
  dispatch (the highest number any of them received), so all save the same
  step. That costs a scalar all-gather per dispatch, on several hosts only.
  """
  signum = received[0] if received else 0
  if jax.process_count() > 1:
    signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
  return signum


class TrainState(train_state.TrainState):
  """Everything a run needs to continue, all of it checkpointed."""

  batch_stats: Any
  rng: jax.Array  # Raw key data: batches and augmentation derive from it.
  mean: jax.Array  # Input normalisation, from the training split.
  std: jax.Array


# Fields that only make sense above zero.
POSITIVE_FIELDS = (
    'batch_size',
    'eval_batch_size',
    'train_length',
    'learning_rate',
    'lr_patience',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'steps_per_dispatch',
)
LR_SCHEDULES = ('piecewise', 'plateau')
# Shorter sides that multi-scale testing (§3.4) may resize test images to:
# from the network's total stride (a smaller image leaves its last stage no
# whole pixel) to 4096 (there one image's stem output alone,
# 2048 x 2731 x 64 float32, is 1.4 GB: larger sides outgrow a device).
TEST_SCALES = (32, 4096)


def check_config(config):
  """Raises TrainingError for training fields no run can train with."""
  for name in POSITIVE_FIELDS:
    if not config[name] > 0:
      raise TrainingError(f'{name} must be positive, got {config[name]!r}')
  if not 0 < config.lr_factor < 1:
    raise TrainingError(
        f'lr_factor must be in (0, 1) (it lowers the rate), got '
        f'{config.lr_factor!r}'
    )
  check_test_scales(config)
  if not 0 <= config.momentum < 1:
    raise TrainingError(f'momentum must be in [0, 1), got {config.momentum!r}')
  if config.weight_decay < 0:
    raise TrainingError(
        f'weight_decay must not be negative, got ' f'{config.weight_decay!r}'
    )
  if config.warmup_steps < 0 or (
      config.warmup_steps and not config.warmup_learning_rate > 0
  ):
    raise TrainingError(
        f'a warm-up needs warmup_steps >= 0 and a positive '
        f'warmup_learning_rate, got {config.warmup_steps!r} steps at '
        f'{config.warmup_learning_rate!r}'
    )
  boundaries = config.lr_boundaries
  if not (
      isinstance(boundaries, (tuple, list))
      and all(
          isinstance(b, (int, float)) and not isinstance(b, bool)
          for b in boundaries
      )
      and list(boundaries) == sorted(set(boundaries))
      and all(b > 0 for b in boundaries)
  ):
    raise TrainingError(
        f'lr_boundaries must be positive and increasing, got '
        f'{boundaries!r} (numbers of steps or epochs, e.g. '
        '(32000, 48000))'
    )
  if config.lr_schedule not in LR_SCHEDULES:
    raise TrainingError(
        f'lr_schedule must be piecewise or plateau, got '
        f'{config.lr_schedule!r}'
    )
  if config.bn_group_size < 0 or (
      config.bn_group_size and config.batch_size % config.bn_group_size
  ):
    raise TrainingError(
        f'bn_group_size must be 0 (the whole batch) or divide '
        f'batch_size {config.batch_size}, got '
        f'{config.bn_group_size!r}'
    )


def check_test_scales(config):
  """Raises TrainingError unless ``config.test_scales`` can test the run:
  ImageNet's shorter sides, within TEST_SCALES, padded to buckets
  (``test_bucket``) that are whole multiples of the network's total
  stride."""
  # (Any platform's form: the stride is the architecture's.)
  stride = models.from_config(config, 1, 'cpu').total_stride
  bucket = config.test_bucket
  if not (
      isinstance(bucket, int)
      and not isinstance(bucket, bool)
      and bucket > 0
      and bucket % stride == 0
  ):
    raise TrainingError(
        f"test_bucket must be a positive multiple of the network's total "
        f'stride {stride} (pixels), got {bucket!r}'
    )
  scales = config.test_scales
  if not scales:
    return
  if config.dataset != 'imagenet2012':
    raise TrainingError(
        "test_scales is ImageNet's multi-scale testing (§3.4); "
        f'{config.dataset} is tested on its images as they are: '
        "--config.test_scales='()'"
    )
  low, high = TEST_SCALES
  if not (
      isinstance(scales, (tuple, list))
      and all(
          isinstance(s, int) and not isinstance(s, bool) and low <= s <= high
          for s in scales
      )
  ):
    raise TrainingError(
        f'test_scales must be shorter sides in pixels, integers from {low} '
        f"to {high}, got {scales!r} (e.g. '(224, 256, 384, 480, 640)')"
    )


def schedule_in_steps(config, train_size: int) -> tuple[int, list[int]]:
  """Training length and learning-rate boundaries in steps.

  An epoch is ``train_size / batch_size`` steps (not rounded: epochs follow
  each other without a gap); epoch counts round up to whole steps.
  """
  if config.schedule_unit == 'steps':
    per_unit = 1
  elif config.schedule_unit == 'epochs':
    per_unit = train_size / config.batch_size
  else:
    raise TrainingError(
        f'schedule_unit must be steps or epochs, got '
        f'{config.schedule_unit!r}'
    )
  to_steps = lambda x: math.ceil(x * per_unit - 1e-9)
  return to_steps(config.train_length), [
      to_steps(b) for b in config.lr_boundaries
  ]


def learning_rate_schedule(config, boundaries: list[int]) -> optax.Schedule:
  """Piecewise constant (x lr_factor at each boundary), after the warm-up.

  The warm-up (§4.2, ResNet-110) runs at warmup_learning_rate for the first
  warmup_steps steps; the boundaries stay where they are. The plateau
  schedule has no boundaries: ``scale_by_plateau`` lowers its rate.
  """
  if config.lr_schedule == 'plateau':
    boundaries = []
  main = optax.piecewise_constant_schedule(
      config.learning_rate, {b: config.lr_factor for b in boundaries}
  )
  if not config.warmup_steps:
    return main
  return lambda step: jnp.where(
      step < config.warmup_steps, config.warmup_learning_rate, main(step)
  )


# An improvement of the validation error (%) is at least one image's share
# of it, 1e-4 or more for up to a million images: with this tolerance
# (optax's must be positive) ``reduce_on_plateau`` counts exactly the
# evaluations where the error went below its best.
PLATEAU_TOLERANCE = 1e-6


def plateau_schedule(config) -> optax.GradientTransformationExtraArgs:
  """§3.4's rate "divided by 10 when the error plateaus": optax's
  ``reduce_on_plateau`` on the validation error, which multiplies its
  ``scale`` by ``lr_factor`` once the error has not gone below its best for
  ``lr_patience`` evaluations in a row; the count then starts again."""
  return optax.contrib.reduce_on_plateau(
      factor=config.lr_factor,
      patience=config.lr_patience,
      rtol=0.0,
      atol=PLATEAU_TOLERANCE,
  )


def scale_by_plateau(config) -> optax.GradientTransformation:
  """Multiplies each step's update by the plateau schedule's scale; its
  state is ``reduce_on_plateau``'s, which ``after_validation`` moves.

  Momentum SGD's update is the learning rate times the momentum buffer, so
  scaling the update is scaling the learning rate, as in Caffe and PyTorch
  (the buffer keeps its history).
  """

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.scale, updates), state

  return optax.GradientTransformation(plateau_schedule(config).init, update)


def after_validation(state: TrainState, error: float, config) -> TrainState:
  """The plateau schedule's decision after an evaluation:
  ``reduce_on_plateau``'s update of its state on the validation error.
  Decided on the host, from the same evaluation on every process; the
  state goes back replicated as it came."""
  old = state.opt_state['plateau']
  _, new = plateau_schedule(config).update(
      (), jax.device_get(old), value=np.float32(error)
  )
  new = jax.tree.map(
      lambda x, like: devices_lib.replicate(np.asarray(x), like.sharding),
      new,
      old,
  )
  opt_state = state.opt_state.copy()  # named_chain's OrderedDict.
  opt_state['plateau'] = new
  return state.replace(opt_state=opt_state)


def learning_rate(opt_state) -> jax.Array:
  """The learning rate of the last step, as the optimiser's state holds it:
  the schedule's (``inject_hyperparams``) times the plateau's scale."""
  rate = opt_state['sgd'].hyperparams['learning_rate']
  if 'plateau' in opt_state:
    rate = rate * opt_state['plateau'].scale
  return rate


def create_optimizer(config, schedule) -> optax.GradientTransformation:
  """Weight decay as decoupled L2 before momentum SGD: the paper's update.

  ``add_decayed_weights`` adds ``weight_decay * w`` to the gradient, which
  momentum SGD then treats as part of it, exactly as Caffe and PyTorch apply
  weight decay. The plateau schedule scales the result last. The state is
  optax's, by name: ``weight_decay``, ``sgd`` (its learning rate injected:
  ``learning_rate``) and ``plateau``.
  """
  if config.weight_decay_mask == 'all':
    mask = None
  elif config.weight_decay_mask == 'kernels':
    mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == 'kernel', params
    )
  else:
    raise TrainingError(
        f'weight_decay_mask must be all or kernels, got '
        f'{config.weight_decay_mask!r}'
    )
  sgd = optax.inject_hyperparams(
      optax.sgd, static_args=('momentum', 'nesterov')
  )
  transforms = [
      ('weight_decay', optax.add_decayed_weights(config.weight_decay, mask)),
      (
          'sgd',
          sgd(
              learning_rate=schedule,
              momentum=config.momentum,
              nesterov=config.nesterov,
          ),
      ),
  ]
  if config.lr_schedule == 'plateau':
    transforms.append(('plateau', scale_by_plateau(config)))
  return optax.named_chain(*transforms)


class ChainPlateau(NamedTuple):
  """The plateau schedule's state in checkpoints of a chain (below)."""

  scale: jax.Array
  best: jax.Array
  since: jax.Array


def from_chain_state(abstract_state):
  """Reads the optimiser's state of checkpoints written before it was
  optax's by name (b7e9ebf and earlier): a chain of weight decay's state,
  (the momentum's trace, the schedule's count) and, with the plateau
  schedule, its (scale, best, since).

  Returns that state's shapes (``abstract_state`` with the chain) and the
  function that makes such a state, restored, this code's: the same
  momenta, step count and plateau decisions; None for an optimiser other
  than ``create_optimizer``'s. The injected learning rate is recomputed
  from the schedule at the next step (``learning_rate``).
  """
  opt = abstract_state.opt_state
  if not isinstance(opt, dict) or 'sgd' not in opt:
    return None
  sgd = opt['sgd']
  chain = (
      opt['weight_decay'],
      (sgd.inner_state[0], optax.ScaleByScheduleState(count=sgd.count)),
  )
  if 'plateau' in opt:
    plateau = opt['plateau']
    chain += (
        ChainPlateau(
            scale=plateau.scale,
            best=plateau.best_value,
            since=plateau.plateau_count,
        ),
    )

  def zeros(tree):
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)

  def upgrade(state):
    old = state.opt_state
    count = np.asarray(old[1][1].count)
    new = type(opt)(opt)
    new['weight_decay'] = old[0]
    # Each count its own array: the step donates every buffer of the state.
    new['sgd'] = sgd._replace(
        count=count,
        hyperparams=zeros(sgd.hyperparams),
        hyperparams_states=jax.tree.map(
            lambda _: count.copy(), sgd.hyperparams_states
        ),
        inner_state=(old[1][0], *sgd.inner_state[1:]),
    )
    if 'plateau' in opt:
      new['plateau'] = zeros(opt['plateau'])._replace(
          scale=old[2].scale, best_value=old[2].best, plateau_count=old[2].since
      )
    return state.replace(opt_state=new)

  return abstract_state.replace(opt_state=chain), upgrade


def create_train_state(model, tx, seed: int, image_size: int) -> TrainState:
  """A fresh state; its normalisation is the identity until the run sets it."""
  params_key, data_key = jax.random.split(jax.random.key(seed))
  variables = model.init(
      params_key, jnp.zeros((1, image_size, image_size, 3)), train=False
  )
  return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=variables['batch_stats'],
      rng=jax.random.key_data(data_key),
      mean=jnp.zeros((image_size, image_size, 3)),
      std=jnp.ones(3),
  )


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, images, labels):
  """One step of momentum SGD on a batch of uint8 images (already augmented).

  The blocks draw from a ``'dropout'`` stream of their own each step (the
  data's draws fold in 0 and 1: ``cifar.draw``).
  """
  x = data.normalize(images, state.mean, state.std)
  dropout = jax.random.fold_in(
      jax.random.fold_in(jax.random.wrap_key_data(state.rng), 2), state.step
  )

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': dropout},
    )
    return cross_entropy(logits, labels).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  state = state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
  metrics = {
      'loss': loss,
      'error': jnp.mean(jnp.argmax(logits, -1) != labels),
      'learning_rate': learning_rate(state.opt_state),
  }
  return state, metrics


def classify(state: TrainState, images, sizes=None):
  """The logits of a batch of uint8 images, in inference mode.

  Images of shape (batch, crops, h, w, 3) are classified by their softmax
  averaged over the crops (10-crop testing, Table 3): its log is returned.
  ``sizes`` (batch, 2): the images' own heights and widths, zeros padding
  them to ``h, w`` (``models.ResNet``).
  """
  crops = images.shape[1] if images.ndim == 5 else 1
  x = data.normalize(
      images.reshape((-1,) + images.shape[-3:]), state.mean, state.std
  )
  if sizes is not None:
    sizes = jnp.repeat(sizes, crops, axis=0)
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      x,
      train=False,
      sizes=sizes,
  )
  if crops > 1:
    probs = jax.nn.softmax(logits).reshape(len(images), crops, -1).mean(1)
    logits = jnp.log(probs)
  return logits


def eval_step(state: TrainState, images, labels, mask):
  """Sums of top-1/top-5 errors and loss over the unmasked examples."""
  logits = classify(state, images)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {
      'count': mask.sum(),
      'loss': jnp.sum(cross_entropy(logits, labels) * mask),
      'error': jnp.sum((jnp.argmax(logits, -1) != labels) * mask),
      'top5_error': jnp.sum(jnp.all(top5 != labels[:, None], -1) * mask),
  }


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted steps of a run, sharded over ``mesh``."""

  mesh: jax.sharding.Mesh
  train: Any  # (state, *inputs) -> (state, metrics): steps_per_dispatch
  # training steps, each metric stacked along a leading axis of that length.
  eval: Any  # (state, images, labels, mask) -> sums.
  steps_per_dispatch: int
  on_device: bool  # Inputs drawn in the step (CIFAR), else host batches.

  def dispatches(self, train_inputs: Iterator[tuple]) -> Iterator[tuple]:
    """Each dispatch's inputs from ``Inputs.train``'s iterator: the
    on-device training set (CIFAR), or the host batches of its steps
    (ImageNet: ``host_dispatches``)."""
    if self.on_device:
      return train_inputs
    return host_dispatches(train_inputs, self.mesh, self.steps_per_dispatch)

  @property
  def replicated(self):
    return devices_lib.replicated(self.mesh)

  @property
  def batch(self):
    return devices_lib.split(self.mesh)


def host_dispatches(batches: Iterator[tuple], mesh, steps_per_dispatch: int):
  """Host batches (this process's images and labels of each step) as the
  inputs of dispatches of ``steps_per_dispatch`` steps, on ``mesh``.

  One transfer per dispatch (the steps' batches stacked), sent one dispatch
  ahead: the next dispatch's transfer runs while the current one computes,
  as the flax examples prefetch (one more dispatch's batches on the
  devices).
  """
  stacked = devices_lib.stacked(mesh)

  def transfer():
    local = [next(batches) for _ in range(steps_per_dispatch)]
    return tuple(
        devices_lib.global_array(
            # One step's batch as it is (a view), more stacked (a copy).
            parts[0][None] if len(parts) == 1 else np.stack(parts),
            stacked,
        )
        for parts in zip(*local)
    )

  ahead = collections.deque([transfer()])
  while True:
    ahead.append(transfer())
    yield ahead.popleft()


def make_steps(mesh, draw, steps_per_dispatch: int = 1) -> Steps:
  """Jits the training and evaluation steps over the mesh.

  With ``draw`` (``data.Inputs.draw``) the training step takes the whole
  uint8 training split, replicated, and draws, augments and normalises its
  batch inside the same program (CIFAR); without, it takes global batches
  sharded over the mesh (ImageNet). One call runs ``steps_per_dispatch``
  steps (a loop inside the program, as TPUEstimator's iterations_per_loop):
  on an accelerator a small net's step is launches and host round trips,
  which the loop pays once per call.
  """
  replicated, batch = devices_lib.replicated(mesh), devices_lib.split(mesh)
  stacked = devices_lib.stacked(mesh)

  def on_device_step(state, images, labels):
    x, y = draw(images, labels, jax.random.wrap_key_data(state.rng), state.step)
    x = jax.lax.with_sharding_constraint(x, batch)
    y = jax.lax.with_sharding_constraint(y, batch)
    return train_step(state, x, y)

  def on_device_steps(state, images, labels):
    return repeat(
        lambda state, _: on_device_step(state, images, labels), state, None
    )

  def host_steps(state, images, labels):  # (steps, batch, ...): a batch a step.
    return repeat(
        lambda state, xy: train_step(state, *xy),
        state,
        (images, labels),
    )

  def repeat(step, state, xs):
    """``step`` over the dispatch's steps; metrics stacked."""
    if steps_per_dispatch == 1:  # The plain step, without a loop around it.
      state, metrics = step(state, jax.tree.map(lambda x: x[0], xs))
      return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(step, state, xs, length=steps_per_dispatch)

  train = jax.jit(
      on_device_steps if draw else host_steps,
      in_shardings=(replicated, *[replicated if draw else stacked] * 2),
      out_shardings=replicated,
      donate_argnums=0,
  )
  evaluate = jax.jit(
      eval_step,
      in_shardings=(replicated, batch, batch, batch),
      out_shardings=replicated,
  )
  return Steps(mesh, train, evaluate, steps_per_dispatch, bool(draw))


def evaluate(
    steps: Steps, state, batches, stop: Callable[[], int] | None = None
) -> dict[str, float]:
  """Top-1/top-5 error (%) and mean loss over per-process local batches.

  ``stop`` (``stop_signal``'s) is asked before each batch: a signal ends the
  evaluation there (Stopped, at the state's step; a final test on ImageNet
  outlasts a preemption's grace period).
  """
  totals = None
  for local in batches:
    signum = stop() if stop else 0
    if signum:
      raise Stopped(signum, int(state.step), FINAL_TEST)
    sums = steps.eval(
        state, *(devices_lib.global_array(a, steps.batch) for a in local)
    )
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {
      'error': 100 * totals['error'] / count,
      'top5_error': 100 * totals['top5_error'] / count,
      'loss': totals['loss'] / count,
      'images': int(count),
  }


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(
      jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
  )


def fresh_state(config, platform: str = '') -> Callable[..., TrainState]:
  """``create_train_state`` of a config's network at its input size, in its
  form for ``platform`` (``models.from_config``): a function of the
  optimiser and the seed, to jit, vmap or shape."""
  info = data.dataset_info(config.dataset)
  return functools.partial(
      create_train_state,
      models.from_config(config, info.num_classes, platform),
      image_size=info.image_size,
  )


def state_shapes(config, platform: str = '') -> TrainState:
  """The shapes of a config's training state (its network in the form for
  ``platform``), without data or compiling."""
  return jax.eval_shape(
      functools.partial(
          fresh_state(config, platform),
          create_optimizer(config, learning_rate_schedule(config, [])),
          config.seed,
      )
  )


def latest_checkpoint(workdir, sharding=None) -> TrainState:
  """A run's latest checkpoint as its config.json describes it, with
  ``sharding`` (default: on this machine's first device, to read its
  weights), without data or compiling."""
  workdir = pathlib.Path(workdir)
  sharding = sharding or jax.sharding.SingleDeviceSharding(
      jax.local_devices()[0]
  )
  return workdir_lib.load(
      workdir,
      workdir_lib.abstract(
          state_shapes(workdir_lib.saved_config(workdir)), sharding
      ),
  )


def dataset_inputs(config, mesh) -> data.Inputs:
  """The inputs of config.dataset, on ``mesh``."""
  data.dataset_info(config.dataset)
  if config.pca_lighting and config.dataset != 'imagenet2012':
    raise data.DataError(
        'pca_lighting (the colour augmentation of §3.4) is '
        f'for ImageNet; {config.dataset} has none in the '
        'paper'
    )
  if config.dataset == 'imagenet2012':
    from resnet_jax import imagenet  # pylint: disable=g-import-not-at-top

    return imagenet.inputs(config, mesh)  # (It imports TensorFlow.)
  return cifar.inputs(config, mesh)


def setup(config, devices=None):
  """The pieces every mode shares: inputs, jitted steps, initial state.

  Returns (inputs, steps, state, total steps) on ``devices`` (all of them by
  default). The state's normalisation is a placeholder until a fresh run
  sets it from ``inputs.normalization()`` (a restored one brings its own).
  """
  check_config(config)
  devices = devices or jax.devices()
  fresh = fresh_state(config, devices[0].platform)
  mesh = devices_lib.make_mesh(
      {
          'batch_size': config.batch_size,
          'eval_batch_size': config.eval_batch_size,
      },
      devices,
  )
  inputs = dataset_inputs(config, mesh)
  if config.batch_size > inputs.train_size:
    raise TrainingError(
        f'batch_size {config.batch_size} is larger than the '
        f'training set ({inputs.train_size} images)'
    )
  if config.lr_schedule == 'plateau' and inputs.eval_split != 'validation':
    raise TrainingError(
        'lr_schedule=plateau decides on the validation error '
        'and this run has no validation split: set '
        'validation_size above 0'
    )
  total_steps, boundaries = schedule_in_steps(config, inputs.train_size)
  per_dispatch = config.steps_per_dispatch
  for name, length in (
      ('train_length', total_steps),
      *(
          (k, config[k])
          for k in (
              'log_every_steps',
              'eval_every_steps',
              'checkpoint_every_steps',
          )
      ),
  ):
    if length % per_dispatch:
      raise TrainingError(
          f'{name} ({length} steps) is not a multiple of steps_per_dispatch '
          f'{per_dispatch}: a run logs, evaluates and checkpoints between '
          'dispatches'
      )
  schedule = learning_rate_schedule(config, boundaries)
  tx = create_optimizer(config, schedule)
  steps = make_steps(mesh, inputs.draw, per_dispatch)
  state = jax.jit(
      functools.partial(fresh, tx, config.seed), out_shardings=steps.replicated
  )()
  return inputs, steps, state, total_steps


def train_and_evaluate(
    config,
    workdir: str,
    start_over: bool = False,
    allow_config_changes: bool = False,
) -> dict[str, float]:
  """Trains (resuming from the workdir's checkpoints), returns test metrics.

  A finished run is not trained or tested again: its final test is
  returned. ``start_over`` and ``allow_config_changes`` are
  ``workdir.resume``'s and ``workdir.check_changes``'s. Raises Stopped
  after SIGTERM or SIGINT, with the step reached saved.
  """
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  from resnet_jax import writers  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  workdir_lib.check_writable(workdir)
  has_run = workdir_lib.check_model(config, workdir)
  inputs, steps, state, total_steps = setup(config)
  late = [b for b in config.lr_boundaries if b >= config.train_length]
  if late and config.lr_schedule == 'piecewise':
    warnings.warn(
        f'lr_boundaries {", ".join(map(str, late))} are not '
        f'before the end of training ({config.train_length} '
        f'{config.schedule_unit}): no learning-rate drop there'
    )
  # A full disk that a writer reports without the file's name (TensorFlow's,
  # for TensorBoard's events) names the workdir.
  with workdir_lib.lock(workdir), stop_requests() as received, atomic.naming(
      workdir
  ):
    if has_run:
      workdir_lib.check_changes(config, workdir, allow_config_changes)
    else:  # Only once the config has proved loadable.
      workdir_lib.record_config(config, workdir)
    manager = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
    restored, final = workdir_lib.resume(
        manager,
        workdir_lib.abstract(state, steps.replicated),
        workdir,
        total_steps,
        min(config.checkpoint_every_steps, total_steps),
        start_over,
        older=from_chain_state,
    )
    if final is not None:
      print(
          f'{workdir} holds a finished run (step {total_steps}); nothing '
          'to do.',
          flush=True,
      )
      return final
    if restored is not None:
      state = restored
    else:
      mean, std = inputs.normalization()
      state = state.replace(
          mean=devices_lib.replicate(np.asarray(mean), steps.replicated),
          std=devices_lib.replicate(np.asarray(std), steps.replicated),
      )
      if config.init_from:
        state = workdir_lib.initial_weights(
            state,
            pathlib.Path(config.init_from),
            latest_checkpoint(config.init_from, steps.replicated),
            steps.replicated,
        )
    writer = writers.create(workdir, jax.process_index() == 0)
    writer.write_hparams(
        {
            k: v
            for k, v in config.items()
            if isinstance(v, (int, float, str, bool))
        }
    )

    if int(state.step) % steps.steps_per_dispatch:
      raise TrainingError(
          f'{workdir} resumes from step {int(state.step)}, not a multiple of '
          f'steps_per_dispatch {steps.steps_per_dispatch}; resume with '
          'a steps_per_dispatch that divides it'
      )
    dispatches = steps.dispatches(inputs.train(int(state.step)))
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer
    )
    # The training metrics since the last logged step: those the checkpoint
    # carried across a stop or kill, then this process's dispatches.
    carried = (
        workdir_lib.train_window(manager, int(state.step))
        if restored is not None
        else {}
    )
    train_metrics = []
    tested = None  # The last step's evaluation, when it is of the test set.
    step = int(state.step)
    last_time, last_step = time.time(), step
    logging.info(
        'Training %s for %d steps from step %d.',
        models.display_name(config),
        total_steps,
        step,
    )
    while step < total_steps:
      state, step_metrics = steps.train(state, *next(dispatches))
      if train_metrics:  # At most two dispatches in flight: the device stays
        # busy, the host never runs far ahead (XLA's CPU collectives can
        # deadlock with more).
        jax.block_until_ready(train_metrics[-1])
      train_metrics.append(step_metrics)
      step += steps.steps_per_dispatch
      report(step)
      is_last = step == total_steps
      stop = stop_signal(received)
      if step % config.log_every_steps == 0 or is_last:
        summary = {
            k: float(np.mean(v))
            for k, v in window(carried, train_metrics).items()
        }
        summary['learning_rate'] = float(train_metrics[-1]['learning_rate'][-1])
        carried, train_metrics = {}, []
        if not math.isfinite(summary['loss']):
          raise TrainingError(
              f'the training loss is {summary["loss"]} at step '
              f'{step}; stopped. {workdir_lib.kept(manager)}'
          )
        summary['error'] *= 100
        now = time.time()
        summary['steps_per_second'] = (step - last_step) / (now - last_time)
        last_time, last_step = now, step
        write(writer, workdir, step, metrics.TRAIN, summary)
      checkpoint_metrics = None
      if step % config.eval_every_steps == 0 or is_last:
        result = evaluate(steps, state, inputs.eval(inputs.eval_split))
        write(writer, workdir, step, inputs.eval_split, result)
        if inputs.eval_split == metrics.VALIDATION:  # Never select by test.
          checkpoint_metrics = {'validation_error': result['error']}
          if 'plateau' in state.opt_state:
            state = after_validation(state, result['error'], config)
        elif is_last:
          tested = result
      if step % config.checkpoint_every_steps == 0 or is_last or stop:
        if not bool(all_finite(state.params)):
          raise TrainingError(
              f'parameters are not finite at step {step}; '
              f'stopped. {workdir_lib.kept(manager)}'
          )
        workdir_lib.save(
            manager,
            state,
            checkpoint_metrics,
            {
                k: v.tolist()
                for k, v in window(carried, train_metrics).items()
                if len(v)
            },
        )
      if stop:
        workdir_lib.finish(manager)
        writer.flush()
        if is_last:
          raise Stopped(stop, step, FINAL_TEST)
        raise Stopped(stop, step)
    workdir_lib.finish(manager)
    writer.flush()
    # A signal during the last checkpoint's save let it finish; the run then
    # stops before its final test, and during the test, at once.
    stop = stop_signal(received)
    if stop:
      raise Stopped(stop, step, FINAL_TEST)
    result = tested or evaluate(
        steps,
        state,
        inputs.eval(metrics.TEST),
        functools.partial(stop_signal, received),
    )
    write(writer, workdir, step, metrics.FINAL_TEST, result)
    writer.flush()
    return result


def window(carried: dict, train_metrics: list) -> dict[str, np.ndarray]:
  """The per-step training loss and error of a logging interval, in step
  order: ``carried`` (from a checkpoint, as lists) and then the dispatches'
  metrics. A record averages them, so a run resumed inside an interval
  logs what an uninterrupted one does."""
  fetched = jax.device_get(train_metrics)
  return {
      k: np.concatenate(
          [np.asarray(carried.get(k, []), np.float32)]
          + [np.ravel(m[k]) for m in fetched]
      )
      for k in ('loss', 'error')
  }


def write(
    writer,
    workdir: pathlib.Path,
    step: int,
    split: str,
    values: dict[str, float],
):
  """A record to the log and TensorBoard (``split/metric``), then to
  metrics.jsonl (process 0)."""
  writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
  if jax.process_index() == 0:
    metrics.append(workdir, step, split, values)
