"""A run's workdir: config.json, metrics.jsonl, checkpoints/, run.lock.

Everything a run keeps, and the rules that keep it whole: one model per
workdir, one run at a time (``lock``), a resume with other training settings
only when asked for and recorded, checkpoints (orbax) saved with a checksum
and restored only when intact, a broken one moved aside for the previous.
Restoring needs no dataset and no compiled step (``load_state``).
"""

from collections.abc import Callable
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import socket
import time
import warnings

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax import atomic
from resnet_jax import cli
from resnet_jax import metrics
from resnet_jax import models

# The config fields that define the network and what it classifies: a
# workdir holds one of them.
MODEL_FIELDS = (*models.ARCHITECTURE, 'dataset')
# What a run recorded before a field existed was built with.
NEW_FIELD_DEFAULTS = {
    'scan_blocks': False,
    'preactivation': False,
    'block': '',
    'lr_schedule': 'piecewise',
    'lr_patience': 3,
    'bn_group_size': 0,
    'pca_lighting': 0.0,
    'test_scales': (),
    'steps_per_dispatch': 1,
    'test_bucket': 64,
}
# Fields a resumed run may change freely: how long it trains, what it logs,
# where the data lie, how memory and dispatches are used, how a finished run
# is tested (test_scales, test_bucket: training never reads them). Any
# other change is a
# different run, and needs allow_config_changes.
RESUMABLE_FIELDS = (
    'train_length',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'eval_batch_size',
    'eval_checkpoint_step',
    'data_dir',
    'remat',
    'scan_blocks',
    'init_from',
    'test_scales',
    'test_bucket',
    'steps_per_dispatch',
)


class WorkdirError(cli.UserError):
  """A workdir a run cannot use: another model's, in use, unwritable, lost."""


def _saved(workdir: pathlib.Path) -> dict:
  """config.json, with the values runs before a new field were made with."""
  path = workdir / 'config.json'
  try:
    saved = json.loads(path.read_text())
  except OSError as e:
    raise WorkdirError(f'{workdir} holds no run (no config.json)') from e
  except ValueError as e:
    raise WorkdirError(f'{path} is unreadable: {e}') from e
  if not isinstance(saved, dict):
    raise WorkdirError(
        f'{path} holds no config (JSON {type(saved).__name__}, '
        "not an object of fields); put the run's config.json "
        'back'
    )
  return NEW_FIELD_DEFAULTS | saved


def saved_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config of the run in ``workdir``."""
  return ml_collections.ConfigDict(_saved(workdir))


def check_model(config, workdir: pathlib.Path) -> bool:
  """Whether the workdir holds a run; raises if it is of another model."""
  if not (workdir / 'config.json').exists():
    return False
  saved = _saved(workdir)
  different = [
      f'{k}: {saved.get(k)!r} there, {config[k]!r} here'
      for k in MODEL_FIELDS
      if saved.get(k) != config[k]
  ]
  if different:
    raise WorkdirError(
        f'{workdir} holds a run of another model (' f'{"; ".join(different)})'
    )
  return True


def check_writable(workdir: pathlib.Path):
  """Raises unless a run can write in ``workdir``, made yet or not."""
  path = workdir.absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise WorkdirError(
        f'--workdir {workdir}: {existing} is a file, not a ' 'directory'
    )
  checkpoints = path / 'checkpoints'
  if checkpoints.exists() and not checkpoints.is_dir():
    raise WorkdirError(
        f'{checkpoints} is a file, not the directory of the '
        "run's checkpoints; move it out of the workdir"
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f'--workdir {workdir}: {existing} is not writable')


@contextlib.contextmanager
def lock(workdir: pathlib.Path):
  """One training run per workdir: holds ``run.lock`` while it trains.

  The lock (``flock``) belongs to the process: the kernel frees it when the
  process ends, also by ``kill -9``, so a killed run never blocks its resume.
  Only process 0 takes it; the other hosts of a run follow process 0.
  """
  if jax.process_index() != 0:
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  # Unbuffered: nothing is left to write when it closes (on a full disk,
  # that write would fail again, without the file's name).
  with open(workdir / 'run.lock', 'a+b', buffering=0) as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().decode().strip() or 'another process'
      raise WorkdirError(
          f'{workdir} is in use by another run ({holder}); wait for it to '
          'end or use another --workdir'
      ) from None
    with atomic.naming(workdir / 'run.lock'):
      f.seek(0)
      f.truncate()
      f.write(f'pid {os.getpid()} on {socket.gethostname()}\n'.encode())
    yield


def check_changes(config, workdir: pathlib.Path, allow: bool):
  """Refuses a resume whose training fields differ from config.json's.

  With ``allow``, config.json takes the new values and the change is
  appended to ``config_changes.jsonl`` (time, field: [old, new]). The
  append is a rewrite of the whole (small) file, atomically: a kill leaves
  no torn line for the next change to be glued to.
  """
  saved = _saved(workdir)
  current = json.loads(config.to_json())
  changes = {
      k: [saved.get(k), v]
      for k, v in current.items()
      if k not in RESUMABLE_FIELDS and saved.get(k) != v
  }
  if not changes:
    return
  listed = '; '.join(
      f'{k}: {old!r} there, {new!r} here' for k, (old, new) in changes.items()
  )
  if 'lr_schedule' in changes:  # Its state is part of the checkpoints.
    raise WorkdirError(
        f'{workdir} was trained with another learning-rate '
        f'schedule ({listed}); its checkpoints cannot resume '
        'under another one: use a new --workdir'
    )
  if not allow:
    raise WorkdirError(
        f'{workdir} was trained with other settings '
        f'({listed}); --allow_config_changes resumes with '
        'the new ones and records the change'
    )
  print(
      f'note: resuming with changed settings ({listed}); recorded in '
      f'{workdir / "config_changes.jsonl"}',
      flush=True,
  )
  if jax.process_index() == 0:
    path = workdir / 'config_changes.jsonl'
    earlier = path.read_text() if path.exists() else ''
    atomic.write(
        path,
        earlier + json.dumps({'time': time.time(), 'changes': changes}) + '\n',
    )
  record_config(config, workdir)


def record_config(config, workdir: pathlib.Path):
  """Writes config.json: for a new run, or after allowed config changes."""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic.write(
        workdir / 'config.json', config.to_json(indent=2, sort_keys=True) + '\n'
    )


def checkpoint_manager(workdir: pathlib.Path, keep: int, read_only=False):
  """Keeps the latest ``keep`` checkpoints plus the best by validation error."""
  policy = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy.AnyPreservationPolicy(
          [
              policy.LatestN(n=keep),
              policy.BestN(
                  get_metric_fn=lambda m: m['validation_error'],
                  reverse=True,
                  n=1,
                  keep_checkpoints_without_metrics=False,
              ),
          ]
      ),
      # Async saves overlap training on accelerators. On CPU they are
      # synchronous: XLA's in-process CPU collectives deadlock when orbax's
      # background transfers run beside a multi-device step.
      enable_async_checkpointing=(
          not read_only and jax.default_backend() != 'cpu'
      ),
      read_only=read_only,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
  )
  return ocp.CheckpointManager(
      (workdir / 'checkpoints').absolute(),
      options=options,
      item_handlers=ocp.StandardCheckpointHandler(),
  )


# What evaluation reads of a checkpoint: the network's weights, its input's
# normalisation and the step; not the optimiser or the data's RNG, so a
# checkpoint of a run with another optimiser is evaluated as it is.
WEIGHTS = ('step', 'params', 'batch_stats', 'mean', 'std')


class OtherCodeError(WorkdirError):
  """A checkpoint that is intact but holds other arrays than this code's
  state (the code changed since it was written): never moved aside."""


def fields(state) -> dict:
  """A training state's fields that hold arrays, by name."""
  return {
      f.name: getattr(state, f.name)
      for f in dataclasses.fields(state)
      if f.metadata.get('pytree_node', True)
  }


def checksum(tree) -> str:
  """sha256 of every array of a replicated tree, saved with each checkpoint.

  Bytes changed on disk after the save (bit rot, a bad copy) may still parse
  as arrays; restoring compares them with this.
  """
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    digest.update(np.ascontiguousarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()


@contextlib.contextmanager
def saving(manager, what: str):
  """A full disk while saving checkpoints is one WorkdirError naming
  ``what``; the half-written checkpoint is removed (its space is the user's
  to free, and orbax would only remove it at the next save of that step),
  the earlier ones are kept."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not atomic.is_full(e):
      raise
    directory = pathlib.Path(manager.directory)
    for partial in directory.glob('*.orbax-checkpoint-tmp*'):
      shutil.rmtree(partial, ignore_errors=True)
    raise WorkdirError(f'{what}: {atomic.full_disk(directory)}') from e


def save(
    manager,
    state,
    ranking: dict[str, float] | None,
    window: dict[str, list[float]] | None = None,
):
  """Saves a checkpoint with a checksum of each field; ``ranking`` is what
  the policy ranks it by ({'validation_error': ...}, or None), ``window``
  the training metrics of the steps since the last logged one (a resume's
  first record averages them with its own). On an accelerator the save runs
  in the background: its error (a full disk) comes from the next save or
  from ``finish``."""
  step = int(state.step)
  state = models.stack_blocks(state)  # The one layout on disk.
  with saving(manager, f'checkpoint {step}'):
    manager.save(
        step,
        args=ocp.args.StandardSave(state),
        metrics=ranking,
        custom_metadata={
            'sha256': {k: checksum(v) for k, v in fields(state).items()},
            'train_window': window or {},
        },
    )


def train_window(manager, step: int) -> dict[str, list[float]]:
  """The training metrics checkpoint ``step`` carries (``save``'s
  ``window``; none in checkpoints from before it was saved)."""
  return (manager.metadata(step).custom_metadata or {}).get('train_window', {})


def finish(manager):
  """Waits for a background save to end, its error raised as ``save``'s."""
  with saving(manager, 'saving a checkpoint'):
    manager.wait_until_finished()


def saved_tree(manager, step: int):
  """Checkpoint ``step``'s tree of arrays as orbax's metadata describes it
  (read without the arrays)."""
  metadata = manager.item_metadata(step)
  if not metadata or not metadata.tree:
    raise WorkdirError('its metadata is missing')
  return metadata.tree


def differences(tree, abstract_state) -> dict[str, str]:
  """Where a checkpoint's arrays (``saved_tree``) differ from
  ``abstract_state``'s: path -> how."""
  saved = {
      '/'.join(path): leaf
      for path, leaf in ocp.tree.to_flat_dict(tree).items()
      if leaf is not None
  }
  here = {
      jax.tree_util.keystr(path, simple=True, separator='/'): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  }
  nodes = {
      side: {
          '/'.join(p.split('/')[:n])
          for p in paths
          for n in range(1, p.count('/') + 2)
      }
      for side, paths in (('saved', saved), ('here', here))
  }
  found = {}
  for path in sorted(saved.keys() | here.keys()):
    if path in saved and path in here:
      ours, theirs = here[path], saved[path]
      if (tuple(theirs.shape), theirs.dtype) != (ours.shape, ours.dtype):
        found[path] = (
            f'{theirs.dtype}{list(theirs.shape)} in the checkpoint, '
            f'{ours.dtype}{list(ours.shape)} in this code'
        )
      continue
    # Named by the outermost node that only one side has.
    other = nodes['here' if path in saved else 'saved']
    parts = path.split('/')
    node = next(
        '/'.join(parts[:n])
        for n in range(1, len(parts) + 1)
        if '/'.join(parts[:n]) not in other
    )
    found[node] = (
        'in the checkpoint, not in this code'
        if path in saved
        else 'in this code, not in the checkpoint'
    )
  return found


def check_code(manager, step: int, found: dict[str, str], weights_only: bool):
  """Raises OtherCodeError if checkpoint ``step`` holds other arrays than
  this code builds (``found``: its ``differences``; only its WEIGHTS count
  for ``weights_only``); returns whether anything outside its weights
  differs."""
  weights = {p: w for p, w in found.items() if p.split('/')[0] in WEIGHTS}
  refused = weights if weights_only else found
  if refused:
    workdir = pathlib.Path(manager.directory).parent
    listed = '; '.join(f'{p}: {w}' for p, w in list(refused.items())[:3])
    more = len(refused) - 3
    advice = (
        'use the code that wrote it'
        if weights
        else 'resume it with the code that wrote it, or start a new run '
        f'from its weights with --config.init_from={workdir}'
    )
    raise OtherCodeError(
        f'checkpoint {step} in {workdir} was written by other code '
        f'({listed}{f"; {more} more" if more > 0 else ""}); nothing was '
        f'changed: {advice}'
    )
  return bool(found)


def stored_form(tree, abstract_state):
  """``abstract_state`` in the form a checkpoint (``saved_tree``) holds its
  blocks in: the scanned form (``save``), or the unrolled form of
  checkpoints that runs with ``scan_blocks=False`` wrote before every run
  saved one form."""
  scan_blocks = models.scanned(tree.get('params') or {})
  if models.scanned(abstract_state.params) == scan_blocks:
    return abstract_state
  sharding = jax.tree.leaves(abstract_state)[0].sharding
  return abstract(
      jax.eval_shape(
          functools.partial(models.in_form, scan_blocks=scan_blocks),
          abstract_state,
      ),
      sharding,
  )


def restore(
    manager,
    abstract_state,
    step: int,
    weights_only: bool = False,
    older: Callable | None = None,
):
  """A checkpoint (only its WEIGHTS if ``weights_only``: the other fields
  are None), checked against the checksums saved with it, in the form of
  ``abstract_state`` whatever form it was saved in (``stored_form``).

  ``older`` reads a state that earlier code laid out otherwise: a function
  of this code's state's shapes that returns the earlier layout's and the
  function that makes a restored one this code's, or None
  (``train.from_chain_state``).
  """
  tree = saved_tree(manager, step)
  wanted = abstract_state
  stored = abstract_state = stored_form(tree, wanted)
  found, upgrade = differences(tree, stored), None
  if found and older and not weights_only:
    earlier = older(stored)
    if earlier and not differences(tree, earlier[0]):
      (abstract_state, upgrade), found = earlier, {}
  other_optimiser = check_code(manager, step, found, weights_only)
  saved = manager.metadata(step).custom_metadata or {}
  target = fields(abstract_state)
  # A checkpoint from before the checksum of each field has one of the whole
  # state: it is read whole where this code's state fits it, to be checked.
  if weights_only and ('sha256' in saved or other_optimiser):
    target = {k: target[k] for k in WEIGHTS}
    path = pathlib.Path(manager.directory) / str(step) / 'default'
    restored = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    state = abstract_state.replace(
        **{k: restored.get(k) for k in fields(abstract_state)}
    )
  else:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    restored = fields(state)
  if 'sha256' in saved:
    bad = [
        k for k in restored if checksum(restored[k]) != saved['sha256'].get(k)
    ]
    if bad:
      raise WorkdirError(
          f'its {", ".join(bad)} do not match the checksum saved with them'
      )
  elif 'state_sha256' not in saved:  # Lost, or made without one.
    warnings.warn(
        f'checkpoint {step} has no checksum (its '
        '_CHECKPOINT_METADATA is missing or empty); restored '
        'unchecked'
    )
  elif len(restored) < len(fields(abstract_state)):
    warnings.warn(
        f"checkpoint {step}'s checksum is of its whole state, whose "
        'optimiser this code does not read: its weights are restored '
        'unchecked'
    )
  elif checksum(state) != saved['state_sha256']:
    raise WorkdirError('its arrays do not match the checksum saved with them')
  if upgrade:
    state = upgrade(state)
  elif stored is wanted:
    return state
  read = {k: v for k, v in fields(state).items() if v is not None}
  read = models.in_form(read, models.scanned(wanted.params))
  shardings = jax.tree.map(lambda leaf: leaf.sharding, fields(wanted))
  return state.replace(
      **{k: jax.device_put(v, shardings[k]) for k, v in read.items()}
  )


def abstract(state, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
  )


def move_aside(workdir: pathlib.Path, step: int) -> pathlib.Path:
  """Moves checkpoint ``step`` to corrupt_checkpoints/<step> (or <step>.<n>,
  the first name free: one moved aside before is kept as it was)."""
  parent = workdir / 'corrupt_checkpoints'
  aside = parent / str(step)
  n = 0
  while aside.exists():
    n += 1
    aside = parent / f'{step}.{n}'
  if jax.process_index() == 0:
    parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(workdir / 'checkpoints' / str(step)), str(aside))
  return aside


def restore_latest_good(
    manager, abstract_state, workdir: pathlib.Path, older=None
):
  """The newest checkpoint that restores intact (``restore``, with
  ``older``); broken newer ones (bytes that fail to read or their checksum)
  are moved aside (by process 0, while the others wait). A checkpoint of
  other code is refused, and nothing moved."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, abstract_state, step, older=older)
    except OtherCodeError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = cli.first_line(e).removeprefix('WorkdirError: ')
      aside = move_aside(workdir, step)
      warnings.warn(
          f'checkpoint {step} is unreadable ({reason}); falling '
          f'back to the previous one (moved to {aside})'
      )
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'moved aside checkpoint {step}')
      manager.reload()
  return None


def resume(
    manager,
    abstract_state,
    workdir: pathlib.Path,
    total_steps: int,
    first_checkpoint: int,
    start_over: bool,
    older: Callable | None = None,
):
  """Where a run starts: (restored state or None, final test or None).

  A restored run's metrics.jsonl is trimmed to its checkpoint; a finished
  one (checkpoint and final test at the last step) returns its final test.
  A workdir whose metrics go past the first checkpoint but that has none
  left to restore is refused, unless ``start_over``: then training starts
  from step 0 and the old metrics are moved aside.
  """
  main_process = jax.process_index() == 0
  restored = restore_latest_good(manager, abstract_state, workdir, older)
  records = metrics.read(workdir)
  if restored is not None:
    step = int(restored.step)
    final = metrics.final_test(records)
    if step == total_steps and final and final['step'] == step:
      result = {k: v for k, v in final.items() if k not in ('step', 'split')}
      return restored, result | {'images': int(result['images'])}
    logging.info('Resuming from step %d.', step)
    print(f'Resuming from checkpoint at step {step}.', flush=True)
    if main_process:
      metrics.keep_until(workdir, step)
    return restored, None
  if manager.all_steps():
    raise WorkdirError(f'no checkpoint in {workdir} is readable')
  logged = max((r['step'] for r in records), default=0)
  if logged > first_checkpoint:
    if not start_over:
      raise WorkdirError(
          f'{workdir} has metrics up to step {logged} but no checkpoint to '
          'resume from (deleted or unreadable); --start_over trains it again '
          'from step 0 and moves the old metrics aside'
      )
    if main_process:
      metrics.move_aside(workdir)
  elif main_process:  # Killed before its first checkpoint: those steps again.
    metrics.keep_until(workdir, 0)
  return None, None


def load(workdir: pathlib.Path, abstract_state, step: int = -1):
  """A checkpoint (the latest if step < 0) for evaluation: read-only."""
  manager = checkpoint_manager(workdir, 1, read_only=True)
  available = manager.all_steps()
  if not available:
    raise WorkdirError(f'{workdir} holds no checkpoint')
  step = manager.latest_step() if step < 0 else step
  if step not in available:
    raise WorkdirError(
        f'{workdir} has no checkpoint at step {step} '
        f'(it has {", ".join(map(str, sorted(available)))})'
    )
  try:
    return restore(manager, abstract_state, step, weights_only=True)
  except OtherCodeError:
    raise
  except WorkdirError as e:
    raise WorkdirError(f'checkpoint {step} in {workdir} is corrupt: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    if not (workdir / 'checkpoints' / str(step)).exists():
      raise WorkdirError(
          f'checkpoint {step} in {workdir} was deleted while it was read (a '
          'training run keeps only its latest checkpoints and the best); '
          'evaluate again, or choose a kept one with '
          '--config.eval_checkpoint_step'
      ) from e
    raise WorkdirError(
        f'checkpoint {step} in {workdir} is unreadable: ' f'{cli.first_line(e)}'
    ) from e


def initial_weights(state, source: pathlib.Path, loaded, sharding):
  """``state`` with the parameters and BN statistics of ``loaded``, the
  latest checkpoint in ``source`` (``config.init_from``: fine-tuning); its
  optimiser, step and normalisation stay fresh. A classifier of another
  shape (other classes) keeps its initialisation; any other difference is
  another network.
  """
  theirs = dict(
      jax.tree_util.tree_leaves_with_path(
          models.unroll_blocks(
              {'params': loaded.params, 'batch_stats': loaded.batch_stats}
          )
      )
  )
  fresh = []

  def take(path, leaf):
    other = theirs.get(path)
    if other is not None and other.shape == leaf.shape:
      return other
    fresh.append(path)
    return leaf

  variables = jax.tree_util.tree_map_with_path(
      take,
      models.unroll_blocks(
          {'params': state.params, 'batch_stats': state.batch_stats}
      ),
  )
  other = [p for p in fresh if p[1].key != 'head']
  if other:
    raise WorkdirError(
        f'--config.init_from={source} holds another network '
        f'(no {jax.tree_util.keystr(other[0])} of that shape)'
    )
  if fresh:
    print(
        'note: the classifier (head) keeps its initialisation: its shape '
        f"differs from {source}'s",
        flush=True,
    )
  variables = models.in_form(variables, models.scanned(state.params))
  variables = jax.device_put(variables, sharding)
  print(
      f'Starting from the weights of {source} (step {int(loaded.step)}).',
      flush=True,
  )
  return state.replace(
      params=variables['params'], batch_stats=variables['batch_stats']
  )


def checkpoint_steps(workdir: pathlib.Path) -> set[int]:
  """The steps of a workdir's checkpoints, read without orbax."""
  directory = workdir / 'checkpoints'
  return (
      {int(p.name) for p in directory.iterdir() if p.name.isdigit()}
      if directory.is_dir()
      else set()
  )


def kept(manager) -> str:
  """What a stopped run leaves to resume from."""
  if not manager.all_steps():
    return 'No checkpoint was written.'
  return f'The last good checkpoint (step {manager.latest_step()}) is kept.'
