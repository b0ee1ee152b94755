"""Training and evaluation on every device of every host (§3.4, §4.2).

One loop for every scale: ``jax.jit`` over a 1-D ``data`` mesh of all devices
(``jax.make_mesh``), the training state replicated and each global batch split
across the devices, so BatchNorm statistics are those of the global batch.
The optimiser is the paper's momentum SGD with weight decay, as decoupled L2
in optax, on a piecewise-constant schedule in iterations (or epochs).

clu (its writers import TensorFlow) and orbax are imported where they are
used, so the training step imports with jax, flax and optax alone.
"""

from collections.abc import Callable, Iterable, Iterator
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import shutil
import socket
import time
from typing import Any

from absl import logging
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import input_pipeline
from resnet_jax import models

# The config fields that define the network: a workdir holds one of them.
MODEL_FIELDS = ('model', 'depth', 'residual', 'shortcut', 'stem',
                'bottleneck_stride', 'dataset')
# Fields a resumed run may change freely: how long it trains, what it logs,
# where the data lie, how memory is used. Any other change is a different
# run, and needs allow_config_changes.
RESUMABLE_FIELDS = ('train_length', 'log_every_steps', 'eval_every_steps',
                    'checkpoint_every_steps', 'keep_checkpoints',
                    'eval_batch_size', 'eval_checkpoint_step', 'data_dir',
                    'remat', 'scan_blocks')


class TrainingError(RuntimeError):
  """A run that cannot go on: bad settings, a diverged loss, a bad workdir."""


class TrainState(train_state.TrainState):
  """Everything a run needs to continue, all of it checkpointed."""
  batch_stats: Any
  rng: jax.Array  # Raw key data: batches and augmentation derive from it.
  mean: jax.Array  # Input normalisation, from the training split.
  std: jax.Array


# Fields that only make sense above zero.
POSITIVE_FIELDS = ('batch_size', 'eval_batch_size', 'train_length',
                   'learning_rate', 'lr_factor', 'log_every_steps',
                   'eval_every_steps', 'checkpoint_every_steps',
                   'keep_checkpoints')


def check_config(config):
  """Raises TrainingError for training fields no run can train with."""
  for name in POSITIVE_FIELDS:
    if not config[name] > 0:
      raise TrainingError(f'{name} must be positive, got {config[name]!r}')
  if not 0 <= config.momentum < 1:
    raise TrainingError(f'momentum must be in [0, 1), got {config.momentum!r}')
  if config.weight_decay < 0:
    raise TrainingError(f'weight_decay must not be negative, got '
                        f'{config.weight_decay!r}')
  if config.warmup_steps < 0 or (config.warmup_steps and
                                 not config.warmup_learning_rate > 0):
    raise TrainingError(
        f'a warm-up needs warmup_steps >= 0 and a positive '
        f'warmup_learning_rate, got {config.warmup_steps!r} steps at '
        f'{config.warmup_learning_rate!r}')
  boundaries = list(config.lr_boundaries)
  if boundaries != sorted(set(boundaries)) or any(b <= 0 for b in boundaries):
    raise TrainingError(f'lr_boundaries must be positive and increasing, got '
                        f'{tuple(boundaries)}')


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
    raise TrainingError(f'schedule_unit must be steps or epochs, got '
                        f'{config.schedule_unit!r}')
  to_steps = lambda x: math.ceil(x * per_unit - 1e-9)
  return to_steps(config.train_length), [to_steps(b) for b in
                                         config.lr_boundaries]


def learning_rate_schedule(config, boundaries: list[int]) -> optax.Schedule:
  """Piecewise constant (x lr_factor at each boundary), after the warm-up.

  The warm-up (§4.2, ResNet-110) runs at warmup_learning_rate for the first
  warmup_steps steps; the boundaries stay where they are.
  """
  main = optax.piecewise_constant_schedule(
      config.learning_rate, {b: config.lr_factor for b in boundaries})
  if not config.warmup_steps:
    return main
  return lambda step: jnp.where(step < config.warmup_steps,
                                config.warmup_learning_rate, main(step))


def create_optimizer(config, schedule) -> optax.GradientTransformation:
  """Weight decay as decoupled L2 before momentum SGD: the paper's update.

  ``add_decayed_weights`` adds ``weight_decay * w`` to the gradient, which
  momentum SGD then treats as part of it, exactly as Caffe and PyTorch apply
  weight decay.
  """
  if config.weight_decay_mask == 'all':
    mask = None
  elif config.weight_decay_mask == 'kernels':
    mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == 'kernel', params)
  else:
    raise TrainingError(f'weight_decay_mask must be all or kernels, got '
                        f'{config.weight_decay_mask!r}')
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask),
      optax.sgd(schedule, momentum=config.momentum,
                nesterov=config.nesterov))


def create_train_state(model, tx, seed: int, image_size: int) -> TrainState:
  """A fresh state; its normalisation is the identity until the run sets it."""
  params_key, data_key = jax.random.split(jax.random.key(seed))
  variables = model.init(params_key, jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables['batch_stats'],
      rng=jax.random.key_data(data_key),
      mean=jnp.zeros((image_size, image_size, 3)), std=jnp.ones(3))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, images, labels, schedule):
  """One step of momentum SGD on a batch of uint8 images (already augmented)."""
  x = input_pipeline.normalize(images, state.mean, state.std)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'])
    return cross_entropy(logits, labels).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = {
      'loss': loss,
      'error': jnp.mean(jnp.argmax(logits, -1) != labels),
      'learning_rate': schedule(state.step),
  }
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates['batch_stats'])
  return state, metrics


def eval_step(state: TrainState, images, labels, mask):
  """Sums of top-1/top-5 errors and loss over the unmasked examples.

  Images of shape (batch, crops, h, w, 3) are classified by their softmax
  averaged over the crops (10-crop testing, Table 3).
  """
  crops = images.shape[1] if images.ndim == 5 else 1
  x = input_pipeline.normalize(images.reshape((-1,) + images.shape[-3:]),
                               state.mean, state.std)
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats}, x,
      train=False)
  if crops > 1:
    probs = jax.nn.softmax(logits).reshape(len(labels), crops, -1).mean(1)
    logits = jnp.log(probs)
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
  train: Any  # (state, *inputs) -> (state, metrics).
  eval: Any  # (state, images, labels, mask) -> sums.

  @property
  def replicated(self):
    return NamedSharding(self.mesh, P())

  @property
  def batch(self):
    return NamedSharding(self.mesh, P('data'))


def make_steps(mesh, schedule, batch_size: int, augment: bool,
               on_device: bool) -> Steps:
  """Jits the training and evaluation steps over the mesh.

  With ``on_device`` the training step takes the whole uint8 training split,
  replicated, and draws, augments and normalises its batch inside the same
  program (CIFAR); otherwise it takes a global batch sharded over the mesh
  (ImageNet).
  """
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P('data'))

  def on_device_step(state, images, labels):
    rng = jax.random.wrap_key_data(state.rng)
    x, y = input_pipeline.train_batch(images, labels, rng, state.step,
                                      batch_size, augment)
    x = jax.lax.with_sharding_constraint(x, batch)
    y = jax.lax.with_sharding_constraint(y, batch)
    return train_step(state, x, y, schedule)

  if on_device:
    train = jax.jit(on_device_step, in_shardings=replicated,
                    out_shardings=replicated, donate_argnums=0)
  else:
    train = jax.jit(functools.partial(train_step, schedule=schedule),
                    in_shardings=(replicated, batch, batch),
                    out_shardings=replicated, donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(replicated, batch, batch, batch),
                     out_shardings=replicated)
  return Steps(mesh, train, evaluate)


def global_array(local: np.ndarray, sharding) -> jax.Array:
  """This process's rows of a batch, as a slice of the global array."""
  return jax.make_array_from_process_local_data(sharding, local)


def replicate(array: np.ndarray, sharding) -> jax.Array:
  """An array every process holds in full, replicated over all devices."""
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


def evaluate(steps: Steps, state, batches) -> dict[str, float]:
  """Top-1/top-5 error (%) and mean loss over per-process local batches."""
  totals = None
  for local in batches:
    sums = steps.eval(state, *(global_array(a, steps.batch) for a in local))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'error': 100 * totals['error'] / count,
          'top5_error': 100 * totals['top5_error'] / count,
          'loss': totals['loss'] / count, 'images': int(count)}


def use_cpu_cores(batch_sizes: Iterable[int]):
  """On the CPU, makes one JAX device per core, unless the user chose a count.

  XLA:CPU runs the per-device parts of a sharded step side by side, which is
  faster than one device whose operations each use every core (BENCHMARKS.md).
  The count is the largest that divides every batch size. Accelerators are
  unaffected. Call it before JAX first touches a device.
  """
  if ('xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
      or jax.config.jax_num_cpu_devices >= 0):
    return
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count())
  count = max(d for d in range(1, cores + 1)
              if all(b % d == 0 for b in batch_sizes))
  jax.config.update('jax_num_cpu_devices', count)


def make_mesh(batch_sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A 1-D data mesh (of every device by default); batches must split on it."""
  devices = jax.devices() if devices is None else devices
  for name, size in batch_sizes.items():
    if size % len(devices):
      raise TrainingError(f'{name} {size} does not divide over '
                          f'{len(devices)} devices; use a multiple of '
                          f'{len(devices)}')
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


# Workdir: config.json, metrics.jsonl, checkpoints/ (orbax).


def check_workdir_config(config, workdir: pathlib.Path) -> bool:
  """Whether the workdir holds a run; raises if it is of another model.

  Sets ``config.scan_blocks`` to the form the run's checkpoints hold.
  """
  path = workdir / 'config.json'
  if not path.exists():
    return False
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise TrainingError(f'{path} is unreadable: {e}') from e
  different = [f'{k}: {saved.get(k)!r} there, {config[k]!r} here'
               for k in MODEL_FIELDS if saved.get(k) != config[k]]
  if different:
    raise TrainingError(f'{workdir} holds a run of another model ('
                        f'{"; ".join(different)})')
  # How the blocks are stored is the run's own (runs from before the field
  # existed are unrolled): resume and evaluate in that form.
  scan_blocks = saved.get('scan_blocks', False)
  if config.get('scan_blocks', False) != scan_blocks:
    print(f'note: {workdir} holds {"scanned" if scan_blocks else "unrolled"} '
          f'blocks; using scan_blocks={scan_blocks}', flush=True)
    config.scan_blocks = scan_blocks
  return True


def check_workdir_writable(workdir: pathlib.Path):
  """Raises unless a run can write in ``workdir``, made yet or not."""
  path = workdir.absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise TrainingError(f'--workdir {workdir}: {existing} is a file, not a '
                        'directory')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise TrainingError(f'--workdir {workdir}: {existing} is not writable')


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """One training run per workdir: holds ``run.lock`` while it trains.

  The lock (``flock``) belongs to the process: the kernel frees it when the
  process ends, also by ``kill -9``, so a killed run never blocks its resume.
  Only process 0 takes it; the other hosts of a run follow process 0.
  """
  if jax.process_index() != 0:
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / 'run.lock', 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise TrainingError(
          f'{workdir} is in use by another run ({holder}); wait for it to '
          'end or use another --workdir') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    yield


def check_config_changes(config, workdir: pathlib.Path, allow: bool):
  """Refuses a resume whose training fields differ from config.json's.

  With ``allow``, config.json takes the new values and the change is
  appended to ``config_changes.jsonl`` (time, field: [old, new]).
  """
  path = workdir / 'config.json'
  saved = json.loads(path.read_text())
  current = json.loads(config.to_json())
  changes = {k: [saved.get(k), v] for k, v in current.items()
             if k not in RESUMABLE_FIELDS and saved.get(k) != v}
  if not changes:
    return
  listed = '; '.join(f'{k}: {old!r} there, {new!r} here'
                     for k, (old, new) in changes.items())
  if not allow:
    raise TrainingError(f'{workdir} was trained with other settings '
                        f'({listed}); --allow_config_changes resumes with '
                        'the new ones and records the change')
  print(f'note: resuming with changed settings ({listed}); recorded in '
        f'{workdir / "config_changes.jsonl"}', flush=True)
  if jax.process_index() == 0:
    with (workdir / 'config_changes.jsonl').open('a') as f:
      f.write(json.dumps({'time': time.time(), 'changes': changes}) + '\n')
  record_config(config, workdir)


def record_config(config, workdir: pathlib.Path):
  """Writes config.json: for a new run, or after allowed config changes."""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(
        config.to_json(indent=2, sort_keys=True) + '\n')


class MetricsFile:
  """metrics.jsonl: one JSON object per logged step, for plots and tables.

  One record per (step, split), in order: a resumed run first drops what its
  killed predecessor logged after the checkpoint it resumes from, and any
  ``final_test``, which it writes again at the end.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / 'metrics.jsonl'
    self.active = jax.process_index() == 0

  def lines(self) -> list[tuple[dict, str]]:
    """(record, line) pairs; a line a kill cut short is not a record."""
    if not self.path.exists():
      return []
    pairs = []
    for line in self.path.read_text().splitlines():
      try:
        pairs.append((json.loads(line), line))
      except ValueError:
        pass
    return pairs

  def keep_until(self, step: int):
    """Drops the records after ``step``, and the final test."""
    if self.active and self.path.exists():
      self.path.write_text(''.join(
          line + '\n' for record, line in self.lines()
          if record['step'] <= step and record['split'] != 'final_test'))

  def move_aside(self):
    if self.active and self.path.exists():
      aside = self.path.with_name(f'metrics.replaced-{int(time.time())}.jsonl')
      self.path.rename(aside)
      print(f'note: the old metrics are in {aside}', flush=True)

  def write(self, step: int, split: str, values: dict[str, float]):
    if self.active:
      record = {'step': step, 'split': split,
                **{k: float(v) for k, v in values.items()}}
      with self.path.open('a') as f:
        f.write(json.dumps(record) + '\n')


def checkpoint_manager(workdir: pathlib.Path, keep: int, read_only=False):
  """Keeps the latest ``keep`` checkpoints plus the best by validation error."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  policy = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy.AnyPreservationPolicy([
          policy.LatestN(n=keep),
          policy.BestN(get_metric_fn=lambda m: m['validation_error'],
                       reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
      ]),
      # Async saves overlap training on accelerators. On CPU they are
      # synchronous: XLA's in-process CPU collectives deadlock when orbax's
      # background transfers run beside a multi-device step.
      enable_async_checkpointing=(not read_only and
                                  jax.default_backend() != 'cpu'),
      read_only=read_only,
      save_interval_steps=0 if read_only else 1,
      create=not read_only)
  return ocp.CheckpointManager((workdir / 'checkpoints').absolute(),
                               options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def checksum(state) -> str:
  """sha256 of every array of a replicated state, saved with each checkpoint.

  Bytes changed on disk after the save (bit rot, a bad copy) may still parse
  as arrays; restoring compares them with this.
  """
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    digest.update(np.ascontiguousarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()


def save(manager, state, metrics):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(int(state.step), args=ocp.args.StandardSave(state),
               metrics=metrics,
               custom_metadata={'state_sha256': checksum(state)})


def restore(manager, abstract_state, step: int):
  """A checkpoint, checked against the checksum saved with it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  saved = manager.metadata(step).custom_metadata or {}
  if 'state_sha256' in saved and checksum(state) != saved['state_sha256']:
    raise TrainingError('its arrays do not match the checksum saved with them')
  return state


def abstract(state, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state)


def restore_latest_good(manager, abstract_state, workdir: pathlib.Path):
  """The newest checkpoint that restores intact; broken newer ones are moved
  aside (by process 0, while the others wait)."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, abstract_state, step)
    except Exception as e:  # pylint: disable=broad-except
      aside = workdir / 'corrupt_checkpoints' / str(step)
      logging.warning('Checkpoint %d is unreadable (%s: %s); moved to %s, '
                      'falling back to the previous one.', step,
                      type(e).__name__, str(e).splitlines()[0], aside)
      print(f'warning: checkpoint {step} is unreadable '
            f'({str(e).splitlines()[0]}); falling back to the previous one '
            f'(moved to {aside})', flush=True)
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(workdir / 'checkpoints' / str(step)), str(aside))
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'moved aside checkpoint {step}')
      manager.reload()
  return None


def checkpoint_steps(workdir: pathlib.Path) -> set[int]:
  """The steps of a workdir's checkpoints, read without orbax."""
  directory = workdir / 'checkpoints'
  return {int(p.name) for p in directory.iterdir()
          if p.name.isdigit()} if directory.is_dir() else set()


def kept(manager) -> str:
  """What a stopped run leaves to resume from."""
  if not manager.all_steps():
    return 'No checkpoint was written.'
  return f'The last good checkpoint (step {manager.latest_step()}) is kept.'


@jax.jit
def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class Inputs:
  """Where a run's data come from."""
  train_size: int  # Images per epoch.
  normalization: Callable[[], tuple[np.ndarray, np.ndarray]]  # Mean, std.
  train: Callable[[int], Iterator[tuple]]  # First step -> each step's inputs.
  eval: Callable[[str], Iterable[tuple]]  # Split -> local eval batches.
  eval_split: str  # Evaluated during training: 'validation' or 'test'.


def cifar_inputs(config, mesh) -> Inputs:
  """CIFAR held on the devices; each step draws its own batch there."""
  data = input_pipeline.load_cifar(config)
  replicated = NamedSharding(mesh, P())

  def train_inputs(first_step):
    del first_step  # Batches derive from the state's rng and step.
    return itertools.repeat((replicate(data.train.images, replicated),
                             replicate(data.train.labels, replicated)))

  return Inputs(
      train_size=len(data.train),
      normalization=lambda: (data.mean, data.std),
      train=train_inputs,
      eval=lambda split: input_pipeline.eval_batches(
          getattr(data, split), config.eval_batch_size),
      eval_split='validation' if data.validation is not None else 'test')


def imagenet_inputs(config, mesh) -> Inputs:
  """ImageNet streamed by tf.data; its validation set is the test set."""
  batch = NamedSharding(mesh, P('data'))

  def train_inputs(first_step):
    seed = int(np.random.SeedSequence([config.seed, first_step])
               .generate_state(1)[0])
    return ((global_array(x, batch), global_array(y, batch))
            for x, y in input_pipeline.imagenet_train_batches(
                config, seed, config.batch_size))

  return Inputs(
      train_size=input_pipeline.DATASETS['imagenet2012'].train_size,
      normalization=lambda: input_pipeline.imagenet_normalization(config),
      train=train_inputs,
      eval=lambda split: input_pipeline.imagenet_eval_batches(
          config, split, config.eval_batch_size, config.ten_crop),
      eval_split='test')


def setup(config, devices=None):
  """The pieces every mode shares: inputs, jitted steps, initial state.

  Returns (inputs, steps, state, total steps) on ``devices`` (all of them by
  default). The state's normalisation is a placeholder until a fresh run
  sets it from ``inputs.normalization()`` (a restored one brings its own).
  """
  check_config(config)
  info = input_pipeline.dataset_info(config.dataset)
  model = models.from_config(config, info.num_classes)
  mesh = make_mesh({'batch_size': config.batch_size,
                    'eval_batch_size': config.eval_batch_size}, devices)
  imagenet = config.dataset == 'imagenet2012'
  inputs = (imagenet_inputs if imagenet else cifar_inputs)(config, mesh)
  if config.batch_size > inputs.train_size:
    raise TrainingError(f'batch_size {config.batch_size} is larger than the '
                        f'training set ({inputs.train_size} images)')
  total_steps, boundaries = schedule_in_steps(config, inputs.train_size)
  schedule = learning_rate_schedule(config, boundaries)
  tx = create_optimizer(config, schedule)
  steps = make_steps(mesh, schedule, config.batch_size, config.augment,
                     on_device=not imagenet)
  state = jax.jit(
      functools.partial(create_train_state, model, tx, config.seed,
                        info.image_size),
      out_shardings=steps.replicated)()
  return inputs, steps, state, total_steps


def train_and_evaluate(config, workdir: str, start_over: bool = False,
                       allow_config_changes: bool = False
                       ) -> dict[str, float]:
  """Trains (resuming from the workdir's checkpoints), returns test metrics.

  A finished run is not trained or tested again: its final test is
  returned. A workdir whose metrics go past the first checkpoint but that
  has none left to restore is refused, unless ``start_over``: then training
  starts from step 0 and the old metrics are moved aside. A resume with
  other training settings than config.json's is refused unless
  ``allow_config_changes`` (``check_config_changes``).
  """
  input_pipeline.import_tensorflow()  # Before clu's TensorBoard writer.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  check_workdir_writable(workdir)
  has_run = check_workdir_config(config, workdir)
  inputs, steps, state, total_steps = setup(config)
  late = [b for b in config.lr_boundaries if b >= config.train_length]
  if late:
    print(f'warning: lr_boundaries {", ".join(map(str, late))} are not '
          f'before the end of training ({config.train_length} '
          f'{config.schedule_unit}): no learning-rate drop there', flush=True)
  with workdir_lock(workdir):
    if not has_run:  # Only once the config has proved loadable.
      record_config(config, workdir)
    else:
      check_config_changes(config, workdir, allow_config_changes)
    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    restored = restore_latest_good(manager, abstract(state, steps.replicated),
                                   workdir)
    resume_step = None
    if restored is not None:
      state = restored
      resume_step = int(state.step)
      logging.info('Resuming from step %d.', resume_step)
      print(f'Resuming from checkpoint at step {resume_step}.', flush=True)
    elif manager.all_steps():
      raise TrainingError(f'no checkpoint in {workdir} is readable')
    else:
      mean, std = inputs.normalization()
      state = state.replace(mean=replicate(np.asarray(mean), steps.replicated),
                            std=replicate(np.asarray(std), steps.replicated))
    metrics_file = MetricsFile(workdir)
    records = [record for record, _ in metrics_file.lines()]
    if resume_step is not None:
      finals = [r for r in records if r['split'] == 'final_test' and
                r['step'] == resume_step == total_steps]
      if finals:
        print(f'{workdir} holds a finished run (step {resume_step}); '
              'nothing to do.', flush=True)
        result = {k: v for k, v in finals[-1].items()
                  if k not in ('step', 'split')}
        return result | {'images': int(result['images'])}
      metrics_file.keep_until(resume_step)
    else:
      logged = max((r['step'] for r in records), default=0)
      if logged > min(config.checkpoint_every_steps, total_steps):
        if not start_over:
          raise TrainingError(
              f'{workdir} has metrics up to step {logged} but no checkpoint '
              'to resume from (deleted or unreadable); --start_over trains '
              'it again from step 0 and moves the old metrics aside')
        metrics_file.move_aside()
      else:  # Killed before its first checkpoint: those steps run again.
        metrics_file.keep_until(0)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in config.items()
                          if isinstance(v, (int, float, str, bool))})

    train_inputs = inputs.train(int(state.step))
    report = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                             writer=writer)
    train_metrics = []
    tested = None  # The last step's evaluation, when it is of the test set.
    step = int(state.step)
    last_time, last_step = time.time(), step
    logging.info('Training %s for %d steps from step %d.',
                 models.display_name(config), total_steps, step)
    while step < total_steps:
      state, metrics = steps.train(state, *next(train_inputs))
      if train_metrics:  # At most two steps in flight: the device stays busy,
        # the host never runs far ahead (XLA's CPU collectives can deadlock
        # with more).
        jax.block_until_ready(train_metrics[-1])
      train_metrics.append(metrics)
      step += 1
      report(step)
      is_last = step == total_steps
      if step % config.log_every_steps == 0 or is_last:
        summary = {k: float(np.mean(v)) for k, v in
                   jax.device_get(jax.tree.map(lambda *x: jnp.stack(x),
                                               *train_metrics)).items()}
        summary['learning_rate'] = float(train_metrics[-1]['learning_rate'])
        train_metrics = []
        if not math.isfinite(summary['loss']):
          raise TrainingError(f'the training loss is {summary["loss"]} at step '
                              f'{step}; stopped. {kept(manager)}')
        summary['error'] *= 100
        now = time.time()
        summary['steps_per_second'] = (step - last_step) / (now - last_time)
        last_time, last_step = now, step
        writer.write_scalars(step, {f'train_{k}': v
                                    for k, v in summary.items()})
        metrics_file.write(step, 'train', summary)
      checkpoint_metrics = None
      if step % config.eval_every_steps == 0 or is_last:
        result = evaluate(steps, state, inputs.eval(inputs.eval_split))
        writer.write_scalars(step, {f'{inputs.eval_split}_{k}': v
                                    for k, v in result.items()})
        metrics_file.write(step, inputs.eval_split, result)
        if inputs.eval_split == 'validation':  # Never select by test error.
          checkpoint_metrics = {'validation_error': result['error']}
        elif is_last:
          tested = result
      if step % config.checkpoint_every_steps == 0 or is_last:
        if not bool(all_finite(state.params)):
          raise TrainingError(f'parameters are not finite at step {step}; '
                              f'stopped. {kept(manager)}')
        save(manager, state, checkpoint_metrics)
    manager.wait_until_finished()

    result = tested or evaluate(steps, state, inputs.eval('test'))
    writer.write_scalars(step, {f'final_test_{k}': v
                                for k, v in result.items()})
    metrics_file.write(step, 'final_test', result)
    writer.flush()
    return result


def restore_checkpoint(config, workdir: str, step: int = -1):
  """A workdir's checkpoint (the latest if step < 0), on this machine's devices.

  Returns (inputs, steps, state) as ``setup`` does, the state restored.
  """
  workdir = pathlib.Path(workdir)
  if not check_workdir_config(config, workdir):
    raise TrainingError(f'{workdir} holds no run (no config.json)')
  inputs, steps, state, _ = setup(config)
  manager = checkpoint_manager(workdir, config.keep_checkpoints,
                               read_only=True)
  available = manager.all_steps()
  if not available:
    raise TrainingError(f'{workdir} holds no checkpoint')
  step = manager.latest_step() if step < 0 else step
  if step not in available:
    raise TrainingError(f'{workdir} has no checkpoint at step {step} '
                        f'(it has {", ".join(map(str, sorted(available)))})')
  try:
    state = restore(manager, abstract(state, steps.replicated), step)
  except TrainingError as e:
    raise TrainingError(f'checkpoint {step} in {workdir} is corrupt: {e}'
                        ) from e
  except Exception as e:  # pylint: disable=broad-except
    raise TrainingError(f'checkpoint {step} in {workdir} is unreadable: '
                        f'{type(e).__name__}: {str(e).splitlines()[0]}') from e
  return inputs, steps, state


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """Test metrics of a workdir's checkpoint (config.eval_checkpoint_step)."""
  inputs, steps, state = restore_checkpoint(config, workdir,
                                            config.eval_checkpoint_step)
  return {'step': int(state.step), **evaluate(steps, state,
                                               inputs.eval('test'))}
