r"""The paper's tables and figures, from workdirs of resnet_jax runs.

  python -m resnet_jax.report table --root=sweeps/table6 --out=report
  python -m resnet_jax.report fig6 --workdirs=W1,W2,... --out=report
  python -m resnet_jax.report fig7 --workdirs=W1,W2,... --out=report
  python -m resnet_jax.report filters --workdirs=W --image=4 --out=report
  python -m resnet_jax.report deconv --workdirs=W --image=4 --out=report
  python -m resnet_jax.report curve --workdirs=W --out=report
  python -m resnet_jax.report ensemble --workdirs=W1,W2,... --out=report

* ``table``: Table 6 (§4.2): for each config under ROOT (``ROOT/<name>/seed*``,
  as ``resnet_jax.sweep`` lays them out), depth, parameters and test error as
  best (mean ± std) over the seeds (std with ddof=1), beside the paper's.
  ``--selection=final`` takes each run's final test error;
  ``--selection=validation`` the test error of the checkpoint with the lowest
  validation error (45k/5k split). Never the best test error.
* ``fig6``: Fig. 6: training error (dashed) and test error (bold) against
  iterations, plain nets left, ResNets right.
* ``fig7``: Fig. 7: the std of each 3x3 layer's response (BN output, before
  the ReLU or addition) on the test set, in layer order and sorted.
* ``filters``: the first conv layer's filters, and the feature maps at the end
  of the first and the last stage for one test image.
* ``deconv``: for one test image, the ``--channels`` strongest channels (by
  their maximum) of conv1 (after its BN and ReLU) and of the last stage's
  output, each projected back to the input by the deconvnet of Zeiler &
  Fergus (2014; ``layers.deconv``), beside the image. ``--keep=map`` projects
  the channel's whole map, ``--keep=max`` only its strongest activation.
* ``curve``: loss and error against steps for one run, learning-rate drops
  marked.
* ``ensemble``: Table 5: the top-1 and top-5 test error of each run and of
  their ensemble (softmax averaged over the runs), each run tested as
  ``--mode=eval`` tests it; ``--test_scales=224,256,384,480,640`` tests them
  all on whole images at those scales (§3.4) instead, ``--eval_batch_size``
  sets their batch.

Each writes PNG and PDF figures (or Markdown for the tables) and a CSV of the
numbers next to them into ``--out``.
"""

import csv
import io
import pathlib

from absl import flags
import jax
from matplotlib import figure
import ml_collections
import numpy as np

from resnet_jax import atomic
from resnet_jax import cli
from resnet_jax import data
from resnet_jax import devices
from resnet_jax import evaluate
from resnet_jax import layers
from resnet_jax import metrics
from resnet_jax import models
from resnet_jax import train
from resnet_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined when run, so that importing this
  module beside another command's defines no flag twice)."""
  flags.DEFINE_string('root', None, 'table: the sweep root.')
  flags.DEFINE_list(
      'workdirs', [], 'Run workdirs (fig6, fig7, filters, curve, ' 'ensemble).'
  )
  flags.DEFINE_string('out', 'report', 'Directory for figures, tables, CSV.')
  flags.DEFINE_enum(
      'selection',
      'final',
      ['final', 'validation'],
      'table: final test error, or that of the best checkpoint '
      'by validation error.',
  )
  flags.DEFINE_integer('image', 0, 'filters, deconv: index of the test image.')
  flags.DEFINE_integer('channels', 9, 'deconv: strongest channels per layer.')
  flags.DEFINE_enum(
      'keep',
      'map',
      layers.DECONV_KEEP,
      "deconv: project each channel's whole map, or only its "
      'strongest activation (Zeiler & Fergus).',
  )
  flags.DEFINE_list(
      'test_scales',
      [],
      'ensemble: shorter sides to test '
      'whole images at (§3.4), for every run; default: each '
      "run's own test_scales.",
  )
  flags.DEFINE_integer(
      'eval_batch_size',
      0,
      'ensemble: test batch size of ' "every run; 0: each run's own.",
  )


COMMANDS = ('table', 'fig6', 'fig7', 'filters', 'deconv', 'curve', 'ensemble')

# Table 6: CIFAR-10 test error (%) of the ResNets (option A), best of 5 runs;
# ResNet-110 is also reported as mean ± std, 6.61 ± 0.16.
PAPER_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}


class ReportError(cli.UserError):
  """Workdirs or flags a table or figure cannot be made from."""


def load_run(workdir) -> tuple[ml_collections.ConfigDict, list[dict]]:
  """A workdir's config and its metrics records."""
  workdir = pathlib.Path(workdir)
  try:
    config = workdir_lib.saved_config(workdir)
  except workdir_lib.WorkdirError as e:
    raise ReportError(f'{workdir} is not a resnet_jax run: {e}') from e
  records = metrics.read(workdir)
  if not records:
    raise ReportError(f'{workdir} has no metrics ({metrics.FILENAME})')
  return config, records


# Every file a report writes appears whole or not at all (``atomic.write``):
# a kill or a full disk leaves the earlier file, or none, never a part; a full
# disk names the file in --out, and so its device.


def write_file(path: pathlib.Path, contents: str | bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write(path, contents)


def write_csv(path: pathlib.Path, header: list[str], rows):
  text = io.StringIO(newline='')
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows(rows)
  write_file(path, text.getvalue())


def save(fig: figure.Figure, out: pathlib.Path, name: str) -> figure.Figure:
  for suffix in ('png', 'pdf'):
    image = io.BytesIO()
    fig.savefig(image, format=suffix, dpi=120, bbox_inches='tight')
    write_file(out / f'{name}.{suffix}', image.getvalue())
  return fig


# Table 6.


def test_error(workdir, selection: str) -> tuple[float, int]:
  """A run's test error (%) and the step it comes from."""
  config, records = load_run(workdir)
  if selection == 'final':
    final = metrics.final_test(records)
    if final is None:
      raise ReportError(f'{workdir} has not finished (no final test error)')
    return final['error'], final['step']
  validation = [r for r in records if r['split'] == metrics.VALIDATION]
  if not validation:
    raise ReportError(f'{workdir} was trained without a validation split')
  # The checkpoint policy keeps the best by validation error, the latest of
  # ties (and only evaluated steps that were checkpointed compete).
  kept = workdir_lib.checkpoint_steps(pathlib.Path(workdir))
  validation = [r for r in validation if r['step'] in kept]
  if not validation:
    raise ReportError(f'{workdir} has no checkpoint of a validated step')
  best = min(validation, key=lambda r: (r['error'], -r['step']))
  config.eval_checkpoint_step = best['step']
  result = evaluate.evaluate_checkpoint(config, workdir)
  return result['error'], best['step']


def table(root, selection: str, out: pathlib.Path) -> str:
  """Table 6 as Markdown (also written with its CSV); see the module doc."""
  root = pathlib.Path(root)
  names = (
      sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
      if root.is_dir()
      else []
  )
  rows, csv_rows = [], []
  for directory in names:
    seeds = sorted(directory.glob('seed*'))
    if not seeds:
      continue
    config, _ = load_run(seeds[0])
    info = data.dataset_info(config.dataset)
    model = models.from_config(config, info.num_classes)
    params = models.param_count(
        layers.layer_table(model, info.image_size)[1]['params']
    )
    results = [test_error(s, selection) for s in seeds]
    errors = np.array([e for e, _ in results])
    std = errors.std(ddof=1) if len(errors) > 1 else 0.0
    paper = (
        PAPER_TABLE6.get(config.depth)
        if config.residual
        and config.model == 'cifar'
        and config.dataset == 'cifar10'
        and config.shortcut == 'A'
        else None
    )
    steps = sorted({s for _, s in results})
    name = models.display_name(config)
    rows.append(
        f'| {name} | {config.depth} | {params / 1e6:.2f}M | '
        f'{errors.min():.2f} ({errors.mean():.2f} ± {std:.2f}) | '
        f'{len(errors)} | {", ".join(map(str, steps))} | '
        f'{paper if paper is not None else "-"} |'
    )
    csv_rows.append(
        [
            directory.name,
            name,
            config.depth,
            params,
            len(errors),
            f'{errors.min():.4f}',
            f'{errors.mean():.4f}',
            f'{std:.4f}',
            selection,
            ';'.join(map(str, steps)),
            '' if paper is None else paper,
            ';'.join(f'{e:.4f}' for e in errors),
        ]
    )
  if not rows:
    raise ReportError(f'{root} holds no runs (expected ROOT/<name>/seed<N>)')
  checkpoint = (
      'final step'
      if selection == 'final'
      else 'checkpoint with the lowest validation error'
  )
  lines = [
      f'Test error (%) at the {checkpoint}: best (mean ± std) over seeds.',
      '',
      '| model | depth | params | error (%) | seeds | step | paper (%) |',
      '| --- | ---: | ---: | --- | ---: | --- | ---: |',
      *rows,
  ]
  markdown = '\n'.join(lines) + '\n'
  write_file(out / 'table.md', markdown)
  write_csv(
      out / 'table.csv',
      [
          'config',
          'model',
          'depth',
          'params',
          'seeds',
          'best_error',
          'mean_error',
          'std_error',
          'selection',
          'steps',
          'paper_error',
          'errors',
      ],
      csv_rows,
  )
  return markdown


# Fig. 6 and the learning curve.


def run_labels(workdirs) -> list[str]:
  """The network's name per run, with its workdir where names repeat."""
  names = [models.display_name(load_run(w)[0]) for w in workdirs]
  return [
      n
      if names.count(n) == 1
      else f'{n} ({"/".join(pathlib.Path(w).parts[-2:])})'
      for n, w in zip(names, workdirs)
  ]


def eval_split(records) -> str:
  return (
      metrics.TEST
      if any(r['split'] == metrics.TEST for r in records)
      else metrics.VALIDATION
  )


def fig6(workdirs, out: pathlib.Path) -> figure.Figure:
  """Training (dashed) and test (bold) error against iterations (Fig. 6)."""
  fig = figure.Figure(figsize=(11, 4))
  panels = dict(zip(('plain', 'ResNet'), fig.subplots(1, 2, sharey=True)))
  csv_rows = []
  for i, (workdir, name) in enumerate(zip(workdirs, run_labels(workdirs))):
    config, records = load_run(workdir)
    ax = panels['ResNet' if config.residual else 'plain']
    color = f'C{i}'
    split = eval_split(records)
    for kind, style, width in ((metrics.TRAIN, '--', 1), (split, '.-', 2)):
      points = [(r['step'], r['error']) for r in records if r['split'] == kind]
      csv_rows += [[workdir, name, kind, s, e] for s, e in points]
      if points:
        ax.plot(
            *zip(*points),
            style,
            color=color,
            linewidth=width,
            label=f'{name} {kind}',
        )
  for title, ax in zip(('plain nets', 'ResNets'), panels.values()):
    ax.set_title(title)
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  panels['plain'].set_ylabel('error (%)')
  write_csv(
      out / 'fig6.csv', ['workdir', 'model', 'split', 'step', 'error'], csv_rows
  )
  return save(fig, out, 'fig6')


def curve(workdir, out: pathlib.Path) -> figure.Figure:
  """Loss and error against steps for one run; learning-rate drops marked."""
  config, records = load_run(workdir)
  fig = figure.Figure(figsize=(11, 4))
  loss_ax, error_ax = fig.subplots(1, 2)
  train_records = [r for r in records if r['split'] == metrics.TRAIN]
  if config.schedule_unit == 'steps' and config.lr_schedule == 'piecewise':
    drops = list(config.lr_boundaries)
  else:  # Epochs or plateaus: the last logged step before each drop.
    drops = [
        a['step']
        for a, b in zip(train_records, train_records[1:])
        if b['learning_rate'] < a['learning_rate']
    ]
  csv_rows = []
  for kind in (metrics.TRAIN, eval_split(records)):
    points = [r for r in records if r['split'] == kind]
    csv_rows += [
        [kind, r['step'], r['loss'], r['error'], r.get('learning_rate', '')]
        for r in points
    ]
    for ax, key in ((loss_ax, 'loss'), (error_ax, 'error')):
      ax.plot(
          [r['step'] for r in points],
          [r[key] for r in points],
          '--' if kind == metrics.TRAIN else '-',
          label=kind,
      )
  for ax, label in ((loss_ax, 'loss'), (error_ax, 'error (%)')):
    for step in drops:
      ax.axvline(step, color='gray', linestyle=':', linewidth=1)
    ax.set_xlabel('iterations')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(
      f'{models.display_name(config)}: {workdir} (dotted: '
      'learning-rate drops)',
      fontsize=9,
  )
  write_csv(
      out / 'curve.csv',
      ['split', 'step', 'loss', 'error', 'learning_rate'],
      csv_rows,
  )
  return save(fig, out, 'curve')


# Fig. 7 and the filters, from checkpoints.


def load_checkpoint(workdir):
  """(config, model, variables, test batches) of a run's latest checkpoint,
  on this machine's first device; the batches are (images as stored, the
  network's normalised input) pairs."""
  config, _ = load_run(workdir)
  state = train.latest_checkpoint(workdir)
  info = data.dataset_info(config.dataset)
  model = models.from_config(config, info.num_classes)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  test = train.dataset_inputs(config, mesh=None).eval(metrics.TEST)

  def batches():
    for images, _, mask in test:
      images = images[mask > 0]
      yield images, data.normalize(images, state.mean, state.std)

  return config, model, variables, batches


def response_stds(model, variables, batches) -> np.ndarray:
  """Per 3x3 layer: the std of its responses over test images and positions,
  per channel, averaged over the channels."""
  responses = jax.jit(
      lambda v, x: [
          (
              r.sum((0, 1, 2)),
              (r**2).sum((0, 1, 2)),
              r.shape[0] * r.shape[1] * r.shape[2],
          )
          for r in layers.layer_responses(model, v, x)
      ]
  )
  totals = None
  for _, x in batches():
    sums = jax.device_get(responses(variables, x))
    totals = (
        sums
        if totals is None
        else [
            (a + c, b + d, n + m) for (a, b, n), (c, d, m) in zip(totals, sums)
        ]
    )
  return np.array(
      [
          np.sqrt(np.maximum(s2 / n - (s / n) ** 2, 0)).mean()
          for s, s2, n in totals
      ]
  )


def fig7(workdirs, out: pathlib.Path) -> figure.Figure:
  """Std of the layer responses, in layer order and sorted (Fig. 7)."""
  fig = figure.Figure(figsize=(11, 4))
  order_ax, sorted_ax = fig.subplots(1, 2, sharey=True)
  csv_rows = []
  for workdir, name in zip(workdirs, run_labels(workdirs)):
    config, model, variables, batches = load_checkpoint(workdir)
    stds = response_stds(model, variables, batches)
    style = '-' if config.residual else '--'
    order_ax.plot(range(1, len(stds) + 1), stds, style, marker='.', label=name)
    sorted_ax.plot(
        range(1, len(stds) + 1),
        np.sort(stds)[::-1],
        style,
        marker='.',
        label=name,
    )
    csv_rows += [
        [workdir, name, i, f'{s:.6f}', rank]
        for i, (s, rank) in enumerate(
            zip(stds, np.argsort(np.argsort(-stds)) + 1), 1
        )
    ]
  order_ax.set_xlabel('layer index (original)')
  sorted_ax.set_xlabel('layer index (sorted by magnitude)')
  order_ax.set_ylabel('std')
  for ax in (order_ax, sorted_ax):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  write_csv(
      out / 'fig7.csv',
      ['workdir', 'model', 'layer', 'std', 'sorted_rank'],
      csv_rows,
  )
  return save(fig, out, 'fig7')


def grid(ax, tiles: np.ndarray, title: str):
  """Tiles (n, h, w[, 3]) as one image, each scaled to [0, 1] on its own."""
  n = len(tiles)
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  low = tiles.reshape(n, -1).min(1).reshape((n,) + (1,) * (tiles.ndim - 1))
  high = tiles.reshape(n, -1).max(1).reshape(low.shape)
  tiles = (tiles - low) / np.maximum(high - low, 1e-12)
  h, w = tiles.shape[1:3]
  canvas = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1) + tiles.shape[3:])
  for i, tile in enumerate(tiles):
    r, c = divmod(i, cols)
    canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tile
  ax.imshow(canvas, cmap='gray', interpolation='nearest')
  ax.set_title(title, fontsize=9)
  ax.axis('off')


def test_image(batches, image: int):
  """Test image number ``image`` as stored and as the network's input (with a
  batch axis of 1)."""
  seen = 0
  for images, x in batches():
    if 0 <= image - seen < len(x):
      return images[image - seen], x[image - seen : image - seen + 1]
    seen += len(x)
  raise ReportError(f'--image must be in [0, {seen}), got {image}')


def filters(workdir, image: int, out: pathlib.Path) -> figure.Figure:
  """First-layer filters and first/last-stage feature maps of a test image."""
  config, model, variables, batches = load_checkpoint(workdir)
  _, x = test_image(batches, image)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  kernel = np.asarray(variables['params']['conv_init']['kernel'])  # (3,3,3,c)
  # Each stage's output, named after its last block.
  last = {
      f'stage{i}': f'stage{i}_block{model.stage_sizes[i - 1]}'
      for i in (1, len(model.stage_sizes))
  }
  maps = {
      stage: np.asarray(state['intermediates'][stage][0][0]) for stage in last
  }
  fig = figure.Figure(figsize=(12, 4))
  axes = fig.subplots(1, 3)
  grid(
      axes[0],
      np.moveaxis(kernel, -1, 0),
      f'{kernel.shape[-1]} first-layer '
      f'filters ({kernel.shape[0]}x{kernel.shape[1]})',
  )
  for ax, (stage, fmap) in zip(axes[1:], maps.items()):
    grid(
        ax,
        np.moveaxis(fmap, -1, 0),
        f'{last[stage]} output, test image '
        f'{image} ({fmap.shape[0]}x{fmap.shape[1]}x{fmap.shape[2]})',
    )
  fig.suptitle(f'{models.display_name(config)}: {workdir}', fontsize=9)
  rows = [
      ['filter', 'conv_init', c, y, x, ch, f'{kernel[y, x, ch, c]:.6f}']
      for c in range(kernel.shape[3])
      for y in range(kernel.shape[0])
      for x in range(kernel.shape[1])
      for ch in range(kernel.shape[2])
  ]
  rows += [
      ['feature_map', last[stage], c, y, x, '', f'{fmap[y, x, c]:.6f}']
      for stage, fmap in maps.items()
      for c in range(fmap.shape[2])
      for y in range(fmap.shape[0])
      for x in range(fmap.shape[1])
  ]
  write_csv(
      out / 'filters.csv',
      ['kind', 'layer', 'channel', 'y', 'x', 'input_channel', 'value'],
      rows,
  )
  return save(fig, out, 'filters')


def deconv(
    workdir, image: int, channels: int, keep: str, out: pathlib.Path
) -> figure.Figure:
  """A test image and the deconvnet projections of the strongest channels of
  conv1 and of the last stage (Zeiler & Fergus, 2014)."""
  config, model, variables, batches = load_checkpoint(workdir)
  if not 1 <= channels <= model.widths[0]:  # conv1 has the fewest.
    raise ReportError(
        f'--channels must be in [1, {model.widths[0]}] (conv1 '
        f'has {model.widths[0]} channels), got {channels}'
    )
  raw, inputs = test_image(batches, image)
  fig = figure.Figure(figsize=(12, 4))
  axes = fig.subplots(1, 3)
  axes[0].imshow(raw, interpolation='nearest')
  axes[0].set_title(f'test image {image}', fontsize=9)
  axes[0].axis('off')
  rows = [
      ['input', '', '', '', '', y, x, c, int(raw[y, x, c])]
      for y in range(raw.shape[0])
      for x in range(raw.shape[1])
      for c in range(raw.shape[2])
  ]
  for ax, layer in zip(axes[1:], ('conv1', f'stage{len(model.stage_sizes)}')):
    found, maxima, projections = jax.device_get(
        layers.deconv(model, variables, inputs, layer, channels, keep)
    )
    grid(
        ax,
        projections,
        f'{layer}: channels {", ".join(map(str, found))}\n'
        f'(strongest first; {keep} projected)',
    )
    rows += [
        [
            'projection',
            layer,
            rank,
            found[rank],
            f'{maxima[rank]:.6f}',
            y,
            x,
            c,
            f'{p[y, x, c]:.6g}',
        ]
        for rank, p in enumerate(projections)
        for y in range(p.shape[0])
        for x in range(p.shape[1])
        for c in range(p.shape[2])
    ]
  fig.suptitle(
      f'{models.display_name(config)}: {workdir} (deconvnet, Zeiler '
      '& Fergus 2014)',
      fontsize=9,
  )
  write_csv(
      out / 'deconv.csv',
      [
          'kind',
          'layer',
          'rank',
          'channel',
          'activation',
          'y',
          'x',
          'input_channel',
          'value',
      ],
      rows,
  )
  return save(fig, out, 'deconv')


# Table 5.


def views(config) -> str:
  """How a run's test images are viewed."""
  if config.test_scales:
    return f'scales {",".join(map(str, config.test_scales))} + flips'
  if config.dataset != 'imagenet2012':
    return 'whole image'
  return '10 crops' if config.ten_crop else 'centre crop'


def ensemble(
    workdirs, out: pathlib.Path, test_scales=(), eval_batch_size: int = 0
) -> str:
  """Table 5 as Markdown (also written with its CSV): each run's test error
  and the error of their ensemble; see the module doc."""
  seen = {}
  for workdir in workdirs:
    real = pathlib.Path(workdir).resolve()
    if real in seen:
      raise ReportError(
          f'--workdirs names {real} twice ({seen[real]}, {workdir}): an '
          'ensemble is of different runs'
      )
    seen[real] = workdir
  runs = []
  for workdir in workdirs:
    config, _ = load_run(workdir)
    if test_scales:  # In place of the run's own views.
      config.test_scales, config.ten_crop = tuple(test_scales), False
    if eval_batch_size:
      config.eval_batch_size = eval_batch_size
    runs.append((config, workdir))
  devices.use_cpu_cores([config.eval_batch_size for config, _ in runs])
  result = evaluate.evaluate_ensemble(runs)
  rows = [
      [
          models.display_name(config),
          str(workdir),
          member['step'],
          views(config),
          member['error'],
          member['top5_error'],
          member['images'],
      ]
      for (config, workdir), member in zip(runs, result['members'])
  ]
  rows.append(
      [
          f'ensemble of {len(runs)}',
          '',
          '',
          '',
          result['error'],
          result['top5_error'],
          result['images'],
      ]
  )
  lines = [
      f'Test error (%) on {result["images"]} images: top-1 and top-5, of '
      'each run and of their ensemble (softmax averaged over the runs).',
      '',
      '| model | workdir | step | views | top-1 err. | top-5 err. |',
      '| --- | --- | ---: | --- | ---: | ---: |',
      *(
          f'| {m} | {w} | {s} | {v} | {e:.2f} | {t:.2f} |'
          for m, w, s, v, e, t, _ in rows
      ),
  ]
  markdown = '\n'.join(lines) + '\n'
  write_file(out / 'ensemble.md', markdown)
  write_csv(
      out / 'ensemble.csv',
      ['model', 'workdir', 'step', 'views', 'error', 'top5_error', 'images'],
      [row[:4] + [f'{row[4]:.4f}', f'{row[5]:.4f}', row[6]] for row in rows],
  )
  return markdown


def run(command: str, out: pathlib.Path):
  """One report command; raises ReportError (or a training error) if it
  cannot be made."""
  if command == 'table':
    if not FLAGS.root:
      raise ReportError('table needs --root')
    print(table(FLAGS.root, FLAGS.selection, out), end='')
    return
  if not FLAGS.workdirs:
    raise ReportError(f'{command} needs --workdirs')
  if command in ('filters', 'deconv', 'curve') and len(FLAGS.workdirs) != 1:
    raise ReportError(f'{command} takes one workdir')
  if command == 'ensemble':
    try:
      scales = [int(s) for s in FLAGS.test_scales]
    except ValueError:
      raise ReportError(
          f'--test_scales takes integers, got ' f'{",".join(FLAGS.test_scales)}'
      ) from None
    print(ensemble(FLAGS.workdirs, out, scales, FLAGS.eval_batch_size), end='')
    return
  if command == 'fig6':
    fig6(FLAGS.workdirs, out)
  elif command == 'fig7':
    fig7(FLAGS.workdirs, out)
  elif command == 'filters':
    filters(FLAGS.workdirs[0], FLAGS.image, out)
  elif command == 'deconv':
    deconv(FLAGS.workdirs[0], FLAGS.image, FLAGS.channels, FLAGS.keep, out)
  else:
    curve(FLAGS.workdirs[0], out)
  print(f'wrote {out / command}.png, .pdf and .csv')


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    cli.fail(f'give one command: {", ".join(COMMANDS)}')
  run(argv[1], pathlib.Path(FLAGS.out))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
