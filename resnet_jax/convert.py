r"""PyTorch weights into resnet_jax workdirs, and back.

  python -m resnet_jax.convert --config=configs/imagenet_resnet50.py \
      --torch=resnet50.pth --workdir=workdirs/torchvision_resnet50
  python -m resnet_jax.convert --config=configs/resnet20.py \
      --torch=resnet20.th --workdir=workdirs/resnet20_from_torch
  python -m resnet_jax.convert --to=torch --workdir=workdirs/resnet20 \
      --torch=resnet20.pth --layout=cifar

From PyTorch, a state_dict (raw, or under ``'state_dict'``; DataParallel's
``module.`` prefix is dropped) in one of these layouts:

* ``torchvision``: its ImageNet ResNet-18/34/50/101/152 (``conv1``, ``bn1``,
  ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``). Its bottlenecks
  stride the 3x3 conv ("v1.5"): the workdir's config gets
  ``bottleneck_stride='3x3'``.
* ``cifar``: the CIFAR ResNets of most public PyTorch repositories
  (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer3.N.bn2``, ``linear``;
  option A has no shortcut tensors, option B's are ``shortcut.0/1``).
* ``baseline``: ``resnet_jax.torch_baseline``'s (``conv``, ``bn``,
  ``blocks.K.conv1``, ..., ``head``).

Tensors are matched by name and shape, never by position; a state_dict that
does not fit the config (a missing or extra tensor, a wrong shape) is one
error line naming the first mismatch, and nothing is written. The workdir
gets config.json and a checkpoint at step 0 holding these parameters and BN
statistics, a fresh optimiser state and the input normalisation the weights
expect (``--mean``, ``--std``: torchvision's ImageNet statistics unless
given). ``--mode=eval`` tests it; ``--config.init_from=WORKDIR`` starts a
training run from its parameters and BN statistics.

``--to=torch`` writes a workdir's latest checkpoint as a state_dict in a
layout (``--layout``; the config's family's by default) that the PyTorch
definitions of that layout load with ``load_state_dict``.
"""

import functools
import io
import operator
import pathlib

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from resnet_jax import atomic
from resnet_jax import cli
from resnet_jax import models
from resnet_jax import train
from resnet_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined when run, so that importing this
  module beside another command's defines no flag twice)."""
  config_flags.DEFINE_config_file(
      'config',
      None,
      'The config the PyTorch weights are of (--to=jax).',
      lock_config=True,
  )
  flags.DEFINE_string(
      'workdir',
      None,
      'The resnet_jax workdir: written '
      '(--to=jax, it must hold no run) or read (--to=torch).',
  )
  flags.DEFINE_string(
      'torch',
      None,
      'The PyTorch state_dict file: read '
      '(--to=jax) or written (--to=torch).',
  )
  flags.DEFINE_enum('to', 'jax', ['jax', 'torch'], 'The direction.')
  flags.DEFINE_bool(
      'overwrite', False, '--to=torch: replace an existing ' '--torch file.'
  )
  flags.DEFINE_enum(
      'layout',
      None,
      ['torchvision', 'cifar', 'baseline'],
      '--to=torch: the names of the state_dict (default: '
      'torchvision for ImageNet nets, cifar for CIFAR nets).',
  )
  flags.DEFINE_list(
      'mean',
      ['0.485', '0.456', '0.406'],
      '--to=jax: the per-channel mean the weights expect '
      'subtracted from images in [0, 1].',
  )
  flags.DEFINE_list(
      'std',
      ['0.229', '0.224', '0.225'],
      '--to=jax: the per-channel std the weights expect.',
  )
  flags.mark_flags_as_required(['workdir', 'torch'])


# What distinguishes each layout's state_dict.
LAYOUT_KEYS = {
    'fc.weight': 'torchvision',
    'linear.weight': 'cifar',
    'head.weight': 'baseline',
}
BN_FIELDS = (
    ('params', 'scale', 'weight'),
    ('params', 'bias', 'bias'),
    ('batch_stats', 'mean', 'running_mean'),
    ('batch_stats', 'var', 'running_var'),
)


class ConvertError(cli.UserError):
  """A PyTorch checkpoint that does not fit the config, or a bad target."""


def module_names(layout: str, variables) -> dict[str, str]:
  """resnet_jax module name (unrolled) -> the layout's module name."""
  stem = {'baseline': ('conv', 'bn')}.get(layout, ('conv1', 'bn1'))
  names = {
      'conv_init': stem[0],
      'bn_init': stem[1],
      'head': {'torchvision': 'fc', 'cifar': 'linear'}.get(layout, 'head'),
  }
  projection = {'torchvision': 'downsample', 'cifar': 'shortcut'}.get(layout)
  for index, (block, stage, number) in enumerate(
      models.blocks_in_order(variables['params'])
  ):
    prefix = (
        f'blocks.{index}'
        if layout == 'baseline'
        else f'layer{stage}.{number - 1}'
    )
    for layer in variables['params'][block]:
      if layer.startswith('proj_'):
        if projection is None:
          raise ConvertError(
              f'the {layout} layout has no projection '
              'shortcuts: use a config with shortcut A'
          )
        torch_layer = f'{projection}.{0 if layer == "proj_conv" else 1}'
      else:
        torch_layer = layer
      names[f'{block}/{layer}'] = f'{prefix}.{torch_layer}'
  return names


def tensors(layout: str, variables) -> dict[str, tuple]:
  """The layout's tensor name -> (collection, path, kind) of resnet_jax."""
  out = {}
  for ours, theirs in module_names(layout, variables).items():
    path = tuple(ours.split('/'))
    layer = path[-1]
    if layer == 'head':
      out[f'{theirs}.weight'] = ('params', path + ('kernel',), 'dense')
      out[f'{theirs}.bias'] = ('params', path + ('bias',), 'vector')
    elif 'conv' in layer:
      out[f'{theirs}.weight'] = ('params', path + ('kernel',), 'conv')
    else:
      for collection, field, name in BN_FIELDS:
        out[f'{theirs}.{name}'] = (collection, path + (field,), 'vector')
  return out


def to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':  # HWIO -> OIHW.
    return array.transpose(3, 2, 0, 1)
  return array.T if kind == 'dense' else array


def from_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':  # OIHW -> HWIO.
    return array.transpose(2, 3, 1, 0)
  return array.T if kind == 'dense' else array


def read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top

  if not path.stat().st_size:
    raise ConvertError(f'{path} is empty (0 bytes): not a PyTorch checkpoint')
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    if 'weights_only' in str(e):  # Not torch's advice to load unsafely.
      raise ConvertError(
          f'{path} holds more than tensors, or is no PyTorch file: only a '
          'state_dict is read (torch.save(model.state_dict(), FILE))'
      ) from e
    raise ConvertError(
        f'cannot read {path} as a PyTorch checkpoint: ' f'{cli.first_line(e)}'
    ) from e
  if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
    loaded = loaded['state_dict']
  if not isinstance(loaded, dict) or not all(
      isinstance(v, torch.Tensor) for v in loaded.values()
  ):
    raise ConvertError(f'{path} holds no state_dict (a dict of tensors)')
  return {
      k.removeprefix('module.'): v.detach().cpu().numpy()
      for k, v in loaded.items()
  }


def unrolled_shapes(config):
  """The config's variables (params, batch_stats), unrolled, as shapes."""
  state = train.state_shapes(config)
  return jax.eval_shape(
      models.unroll_blocks,
      {'params': state.params, 'batch_stats': state.batch_stats},
  )


def variables_from_torch(state_dict, config) -> tuple[dict, str]:
  """resnet_jax variables (unrolled) from a state_dict, and its layout."""
  layout = next((LAYOUT_KEYS[k] for k in LAYOUT_KEYS if k in state_dict), None)
  if layout is None:
    raise ConvertError(
        'the state_dict is in no known layout (it has none of '
        f'{", ".join(LAYOUT_KEYS)})'
    )
  if (layout == 'torchvision') != (config.model == 'imagenet'):
    raise ConvertError(
        f'a {layout} state_dict does not fit a ' f'{config.model} config'
    )
  shapes = unrolled_shapes(config)
  expected = tensors(layout, shapes)
  variables = {'params': {}, 'batch_stats': {}}
  for name, (collection, path, kind) in expected.items():
    if name not in state_dict:
      raise ConvertError(
          f"the state_dict has no {name} (resnet_jax's "
          f'{"/".join(path)} of {models.display_name(config)})'
      )
    value = from_torch_layout(state_dict[name], kind).astype(np.float32)
    shape = functools.reduce(operator.getitem, path, shapes[collection]).shape
    if value.shape != shape:
      raise ConvertError(
          f'{name} has shape {tuple(state_dict[name].shape)}; '
          f'{models.display_name(config)} needs '
          f'{to_torch_layout(np.zeros(shape), kind).shape}'
      )
    node = variables[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  extra = [
      k
      for k in state_dict
      if k not in expected and not k.endswith('num_batches_tracked')
  ]
  if extra:
    raise ConvertError(
        f'the state_dict has {extra[0]}, which '
        f'{models.display_name(config)} does not'
    )
  return variables, layout


def to_jax(config, torch_path: pathlib.Path, workdir: pathlib.Path, mean, std):
  """Writes ``workdir``: config.json and the converted weights at step 0."""
  train.check_config(config)  # What a run of the workdir would refuse.
  workdir_lib.check_writable(workdir)
  # Orbax keeps no step 0 beside later steps, and evaluation would test the
  # run's own checkpoint with the converted normalisation: a new workdir.
  held = [
      name
      for name in ('config.json', 'metrics.jsonl', 'checkpoints')
      if (workdir / name).exists()
  ]
  if held:
    raise ConvertError(
        f'{workdir} already holds a run ({", ".join(held)}); '
        'convert into a new workdir'
    )
  variables, layout = variables_from_torch(read_state_dict(torch_path), config)
  if layout == 'torchvision' and config.depth >= 50:
    print(
        'note: torchvision bottlenecks stride their 3x3 conv; the '
        "workdir's config has bottleneck_stride='3x3'",
        flush=True,
    )
    config.bottleneck_stride = '3x3'
  config.normalization = 'per_channel'
  if config.scan_blocks:
    variables = models.stack_blocks(variables)
  tx = train.create_optimizer(config, train.learning_rate_schedule(config, []))
  state = jax.jit(
      functools.partial(train.fresh_state(config), tx, config.seed)
  )()
  state = state.replace(
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      mean=np.broadcast_to(
          np.asarray(mean, np.float32), state.mean.shape
      ).copy(),
      std=np.asarray(std, np.float32),
  )
  state = jax.device_put(state, jax.local_devices()[0])
  workdir_lib.record_config(config, workdir)
  manager = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
  workdir_lib.save(manager, state, None)
  manager.wait_until_finished()
  print(
      f'wrote {models.display_name(config)} ({layout} layout, mean '
      f'{list(mean)}, std {list(std)}) to {workdir}'
  )


def to_torch(
    workdir: pathlib.Path,
    torch_path: pathlib.Path,
    layout: str | None,
    overwrite: bool = False,
):
  """Writes the workdir's latest checkpoint as a PyTorch state_dict; an
  existing file (perhaps the original download) only with ``overwrite``."""
  import torch  # pylint: disable=g-import-not-at-top

  if torch_path.exists() and not overwrite:
    raise ConvertError(f'{torch_path} exists; --overwrite replaces it')
  config = workdir_lib.saved_config(workdir)
  layout = layout or ('torchvision' if config.model == 'imagenet' else 'cifar')
  state = train.latest_checkpoint(workdir)
  variables = models.unroll_blocks(
      jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  )
  state_dict = {}
  for name, (collection, path, kind) in tensors(layout, variables).items():
    value = functools.reduce(operator.getitem, path, variables[collection])
    state_dict[name] = torch.from_numpy(
        np.array(to_torch_layout(np.asarray(value), kind), order='C')
    )
    if name.endswith('running_var'):
      state_dict[name.replace('running_var', 'num_batches_tracked')] = (
          torch.tensor(0)
      )
  torch_path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  torch.save(state_dict, buffer)
  atomic.write(torch_path, buffer.getvalue())
  print(
      f'wrote {models.display_name(config)} at step {int(state.step)} as '
      f'a {layout} state_dict to {torch_path}'
  )


def parse_channels(name: str, values) -> list[float]:
  try:
    channels = [float(v) for v in values]
  except ValueError:
    channels = []
  if len(channels) != 3 or (name == 'std' and min(channels) <= 0):
    cli.fail(
        f'--{name} takes three numbers (one per channel)'
        + (', above zero' if name == 'std' else '')
    )
  return channels


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  workdir, torch_path = pathlib.Path(FLAGS.workdir), pathlib.Path(FLAGS.torch)
  if torch_path.is_dir():
    cli.fail(f'--torch={torch_path} is a directory, not a state_dict file')
  if FLAGS.to == 'torch':
    to_torch(workdir, torch_path, FLAGS.layout, FLAGS.overwrite)
    return
  if not isinstance(FLAGS.config, ml_collections.ConfigDict):
    cli.fail('--to=jax needs --config, the config the weights are of')
  if not torch_path.is_file():
    cli.fail(f'{torch_path} does not exist')
  to_jax(
      FLAGS.config,
      torch_path,
      workdir,
      parse_channels('mean', FLAGS.mean),
      parse_channels('std', FLAGS.std),
  )


if __name__ == '__main__':
  define_flags()
  cli.run(main)
