"""Training: the schedule, the optimiser, and equality across device counts."""

import functools
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from commands import assert_names
from commands import refused
from commands import saved
from numerics import assert_trees_close

from configs import default as default_config
from configs import smoke
from resnet_jax import evaluate
from resnet_jax import metrics
from resnet_jax import models
from resnet_jax import train
from resnet_jax import workdir


def test_paper_schedule_in_iterations():
  config = default_config.get_config()
  total, boundaries = train.schedule_in_steps(config, 45_000)
  assert (total, boundaries) == (64_000, [32_000, 48_000])
  lr = train.learning_rate_schedule(config, boundaries)
  for step, expected in [
      (0, 0.1),
      (31_999, 0.1),
      (32_000, 0.01),
      (47_999, 0.01),
      (48_000, 0.001),
      (63_999, 0.001),
  ]:
    assert float(lr(step)) == pytest.approx(expected), step


def test_resnet110_warm_up_keeps_the_boundaries():
  config = default_config.get_config()
  config.warmup_steps = 400
  lr = train.learning_rate_schedule(config, [32_000, 48_000])
  for step, expected in [(0, 0.01), (399, 0.01), (400, 0.1), (32_000, 0.01)]:
    assert float(lr(step)) == pytest.approx(expected), step


def test_schedule_in_epochs_rounds_up_to_whole_steps():
  config = default_config.get_config()
  config.schedule_unit = 'epochs'
  config.train_length = 164
  config.lr_boundaries = (81, 122)
  # 50,000 / 128 = 390.625 steps per epoch.
  assert train.schedule_in_steps(config, 50_000) == (64_063, [31_641, 47_657])


def test_weight_decay_is_coupled_into_momentum_like_the_paper():
  # PyTorch / Caffe SGD: v = m * v + (g + wd * w); w -= lr * v.
  config = default_config.get_config()
  tx = train.create_optimizer(config, lambda step: 0.1)
  params = {
      'conv': {'kernel': jnp.array([1.0, -2.0])},
      'bn': {'scale': jnp.array([3.0])},
  }
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  state = tx.init(params)
  w = jax.tree.map(np.asarray, params)
  v = jax.tree.map(np.zeros_like, w)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    v = jax.tree.map(lambda v, w: 0.9 * v + 0.5 + 1e-4 * w, v, w)
    w = jax.tree.map(lambda w, v: w - 0.1 * v, w, v)
  # Values of order 1, a few float32 operations in another order apart.
  assert_trees_close(params, w, rtol=1e-6)


def test_weight_decay_mask_kernels_spares_batchnorm():
  config = default_config.get_config()
  config.weight_decay_mask = 'kernels'
  tx = train.create_optimizer(config, lambda step: 0.1)
  params = {
      'conv': {'kernel': jnp.ones(2)},
      'bn': {'scale': jnp.ones(1), 'bias': jnp.ones(1)},
  }
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1 * 1e-4)
  np.testing.assert_array_equal(updates['bn']['scale'], 0)
  np.testing.assert_array_equal(updates['bn']['bias'], 0)


@pytest.mark.parametrize(
    'field, value',
    [('schedule_unit', 'fortnights'), ('weight_decay_mask', 'biases')],
)
def test_bad_training_fields_are_rejected(field, value):
  config = smoke.get_config()
  config[field] = value
  with pytest.raises(train.TrainingError):
    train.setup(config)


@pytest.mark.parametrize(
    'field, value, others',
    [
        ('batch_size', 0, ()),
        ('batch_size', -1, ()),
        ('eval_batch_size', 0, ()),
        ('log_every_steps', 0, ()),
        ('eval_every_steps', 0, ()),
        ('checkpoint_every_steps', 0, ()),
        ('train_length', 0, ()),
        ('train_length', -5, ()),
        ('learning_rate', -0.1, ()),
        ('momentum', -1.0, ()),
        ('momentum', 1.0, ()),
        ('weight_decay', -0.5, ()),
        ('lr_boundaries', (15, 10), ()),
        ('lr_schedule', 'cosine', ()),
        ('lr_patience', 0, ()),
        ('bn_group_size', 12, ('batch_size', 32)),
        ('bn_group_size', -16, ()),
        ('steps_per_dispatch', 0, ()),
        ('steps_per_dispatch', 3, ('train_length', 20)),
        ('batch_size', 512, (192,)),  # The training set's size.
    ],
)
def test_settings_no_run_can_train_with_are_refused(field, value, others):
  config = smoke.get_config()
  config[field] = value
  assert_names(refused(train.setup, config), field, value, *others)


def test_the_plateau_schedule_needs_a_validation_split():
  config = smoke.get_config()
  config.lr_schedule = 'plateau'
  config.validation_size = 0
  assert_names(refused(train.setup, config), 'lr_schedule', 'validation_size')


def test_plateau_divides_the_rate_after_patience_evaluations_without_gain():
  config = smoke.get_config()
  config.lr_schedule = 'plateau'
  config.lr_patience = 2
  _, _, state, _ = train.setup(config)
  structure = jax.tree.structure(state)  # What the jitted step takes.
  scales = []
  # Patience 2: the rate drops at the second evaluation in a row that does
  # not beat the best error, and the count starts again. Errors one image
  # apart on 10,000 images (0.01%) count as a change.
  for error in [50.0, 40.0, 45.0, 40.0, 30.0, 30.0, 30.0, 30.0, 20.0, 19.99]:
    state = train.after_validation(state, error, config)
    scales.append(float(state.opt_state['plateau'].scale))
  np.testing.assert_allclose(
      scales, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01], rtol=1e-6
  )
  assert float(state.opt_state['plateau'].best_value) == np.float32(19.99)
  assert state.opt_state['plateau'].scale.sharding == state.step.sharding
  assert jax.tree.structure(state) == structure
  # The scale multiplies the whole update: the learning rate, as the state
  # reports it.
  tx = train.create_optimizer(config, lambda step: 0.1)
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.25])}
  fresh = tx.init(params)
  lowered = fresh.copy()
  lowered['plateau'] = fresh['plateau']._replace(scale=jnp.float32(0.1))
  (update, after), (fresh_update, _) = (
      tx.update(grads, s, params) for s in (lowered, fresh)
  )
  np.testing.assert_array_equal(
      update['w'], np.float32(0.1) * fresh_update['w']
  )
  assert train.learning_rate(after) == np.float32(0.1) * np.float32(0.1)


def test_batch_must_divide_over_the_devices():
  config = smoke.get_config()
  config.batch_size = 36
  assert_names(refused(train.setup, config), 'batch_size', 36, 8)


def run_steps(devices, n=3):
  inputs, steps, state, _ = train.setup(smoke.get_config(), devices)
  start = jax.device_get(state)
  data = next(inputs.train(0))
  losses = []
  for _ in range(n):
    state, metrics = steps.train(state, *data)
    (loss,) = metrics['loss']  # One step per dispatch.
    losses.append(float(loss))
  return steps, start, state, losses, data


def test_eight_devices_step_like_one():
  assert jax.device_count() == 8
  _, start, one, losses_one, _ = run_steps(jax.devices()[:1])
  steps, _, eight, losses_eight, data = run_steps(jax.devices())
  # The same sums over the global batch, added up in another order (per
  # device, then across devices): float32 rounding (eps 1.2e-7) reaches the
  # last bits of each gradient and BN statistic, and differs between CPUs
  # (AVX2, AVX-512). Measured against what the three steps changed, it was
  # 4e-6 at most on an AVX-512 CPU; 1e-3 leaves room for any CPU, while a
  # step that skipped the cross-device reduction would take its gradients and
  # BN statistics from 4 of the 32 images: another update altogether.
  rtol = 1e-3
  # The losses (~2.3) agree to hundreds of ulps.
  np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
  for name in ('params', 'batch_stats'):
    expected = jax.device_get(getattr(one, name))
    change = jax.tree.map(np.subtract, expected, getattr(start, name))
    for a, b, c in zip(
        jax.tree.leaves(jax.device_get(getattr(eight, name))),
        jax.tree.leaves(expected),
        jax.tree.leaves(change),
    ):
      assert np.abs(c).max() > 0, 'the steps changed nothing'
      assert np.abs(a - b).max() <= rtol * np.abs(c).max(), name
  # The batch really is split: each device computes on its share and the
  # gradients and BatchNorm statistics are all-reduced.
  hlo = steps.train.lower(eight, *data).compile().as_text()
  assert 'all-reduce' in hlo
  assert eight.params['head']['kernel'].sharding.num_devices == 8


def test_checkpoints_kept_are_the_latest_and_the_best(tmp_path):
  manager = workdir.checkpoint_manager(tmp_path, keep=2)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  for step, error in enumerate([5.0, 1.0, 4.0, 3.0, 2.5], start=1):
    manager.save(
        step,
        args=ocp.args.StandardSave({'w': np.zeros(2)}),
        metrics={'validation_error': error},
    )
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 5]  # Best (2) and the latest two.


def test_a_workdir_of_earlier_code_evaluates_and_resumes_in_either_form(
    tmp_path,
):
  # tests/data/workdir_b7e9ebf: a smoke ResNet-14 (two blocks per stage)
  # trained for 8 steps by the code of b7e9ebf with scan_blocks=False and
  # the plateau schedule (patience 2, evaluated every step). That code
  # saved the form a run computed in (here its blocks one by one) and the
  # optimiser's state as a chain; at step 8 the rate had dropped once
  # (scale 0.1) and one evaluation had not beaten the best (since 1).
  run = tmp_path / 'run'
  shutil.copytree(
      pathlib.Path(__file__).parent / 'data' / 'workdir_b7e9ebf', run
  )
  recorded = metrics.read(run)
  # As a run recorded before scan_blocks existed: its default is the
  # unrolled form.
  path = run / 'config.json'
  written = json.loads(path.read_text())
  del written['scan_blocks']
  path.write_text(json.dumps(written))
  config = workdir.saved_config(run)
  assert config.scan_blocks is False and config.lr_schedule == 'plateau'
  config.scan_blocks = True
  result = evaluate.evaluate_checkpoint(config, str(run))
  final = metrics.final_test(recorded)
  assert result['images'] == final['images']
  # The same weights, run as a loop: float32 sums in another order, ~1e-6
  # of the loss; a logit that changed would move it by far more. An image
  # whose top two logits are that close could change class.
  assert result['loss'] == pytest.approx(final['loss'], rel=1e-4)
  assert abs(result['error'] - final['error']) <= 100 / 64
  # Its optimiser's state, read as this code's: the same momenta, count
  # and plateau decisions.
  chain = saved(run, 8)['opt_state']
  manager = workdir.checkpoint_manager(run, 1, read_only=True)
  abstract = workdir.abstract(
      train.state_shapes(config),
      jax.sharding.SingleDeviceSharding(jax.devices()[0]),
  )
  state = workdir.restore(manager, abstract, 8, older=train.from_chain_state)
  plateau, sgd = state.opt_state['plateau'], state.opt_state['sgd']
  assert (float(plateau.scale), int(plateau.plateau_count)) == (
      float(np.float32(0.1)),
      1,
  )
  assert float(plateau.best_value) == chain[2]['best']
  assert int(sgd.count) == 8
  for a, b in zip(
      jax.tree.leaves(models.unroll_blocks(sgd.inner_state[0].trace)),
      jax.tree.leaves(chain[1][0]['trace']),
      strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(workdir.OtherCodeError, match='opt_state'):
    workdir.restore(manager, abstract, 8)  # Without the reader.
  # The scanned form resumes it at the rate it had reached, and the
  # unrolled form resumes that.
  for scan_blocks, length in ((True, 10), (False, 12)):
    config.scan_blocks = scan_blocks
    config.train_length = length
    train.train_and_evaluate(config, str(run))
    assert metrics.final_test(metrics.read(run))['step'] == length
  rates = {
      r['step']: r['learning_rate']
      for r in metrics.read(run)
      if r['split'] == 'train'
  }
  assert list(rates) == list(range(1, 13))
  assert rates[9] == rates[8] == pytest.approx(0.01)
  # One layout on disk whatever the form a run computes in: blocks 2..n of
  # each stage stacked (here written by the unrolled form), their momenta
  # too; restored in either form, the same arrays.
  manager = workdir.checkpoint_manager(run, 1, read_only=True)
  stored = manager.item_metadata(12).tree
  assert 'stage1_blocks' in stored['params']
  assert 'stage1_block2' not in stored['params']
  assert (
      'stage1_blocks' in stored['opt_state']['sgd']['inner_state'][0]['trace']
  )
  states = {}
  for scan_blocks in (False, True):
    config.scan_blocks = scan_blocks
    abstract = workdir.abstract(
        train.state_shapes(config),
        jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    )
    states[scan_blocks] = workdir.restore(manager, abstract, 12)
  assert 'stage1_block2' in states[False].params
  for a, b in zip(
      jax.tree.leaves(models.stack_blocks(states[False])),
      jax.tree.leaves(states[True]),
      strict=True,
  ):
    np.testing.assert_array_equal(a, b)


def train_for(config, num_steps):
  """(state, metrics of every step) after ``num_steps`` steps."""
  inputs, steps, state, _ = train.setup(config)
  dispatches = steps.dispatches(inputs.train(0))
  metrics = []
  for _ in range(num_steps // config.steps_per_dispatch):
    state, dispatched = steps.train(state, *next(dispatches))
    metrics.append(dispatched)
  return jax.device_get(state), jax.device_get(
      jax.tree.map(lambda *m: jnp.concatenate(m), *metrics)
  )


def test_steps_per_dispatch_compute_what_single_steps_do():
  config = smoke.get_config()
  config.train_length = config.log_every_steps = 8
  config.eval_every_steps = config.checkpoint_every_steps = 8
  one, one_metrics = train_for(config, 8)
  config.steps_per_dispatch = 4
  four, four_metrics = train_for(config, 8)
  assert four_metrics['loss'].shape == (8,)
  assert int(four.step) == 8
  # The same step in a loop: the same operations on the same values. XLA may
  # fuse the loop body otherwise (float32 rounding in other orders), so the
  # states are compared to what the 8 steps changed, as across device
  # counts (test_eight_devices_step_like_one).
  start = jax.device_get(train.setup(smoke.get_config())[2])
  for name in ('params', 'batch_stats'):
    for a, b, c in zip(
        jax.tree.leaves(getattr(four, name)),
        jax.tree.leaves(getattr(one, name)),
        jax.tree.leaves(getattr(start, name)),
    ):
      assert np.abs(a - b).max() <= 1e-3 * np.abs(b - c).max(), name
  np.testing.assert_allclose(
      four_metrics['loss'], one_metrics['loss'], rtol=1e-5
  )
  np.testing.assert_array_equal(
      four_metrics['learning_rate'], one_metrics['learning_rate']
  )


def test_host_batches_per_dispatch_are_each_steps_batch():
  # ImageNet's path: batches from the host, one per step of the dispatch,
  # sent as one transfer, equal to the on-device path given the same
  # batches.
  config = smoke.get_config()
  inputs, steps, state, _ = train.setup(config)
  images, labels = next(inputs.train(0))
  key = jax.random.wrap_key_data(state.rng)
  batches = [
      jax.device_get(inputs.draw(images, labels, key, step))
      for step in range(4)
  ]
  host = train.make_steps(steps.mesh, None, 2)
  host_batches = iter(batches)
  dispatches = host.dispatches(host_batches)
  first = next(dispatches)
  # The next dispatch's batches were sent before this one is computed.
  assert next(host_batches, None) is None
  assert [a.shape for a in first] == [
      (2, *batches[0][0].shape),
      (2, len(batches[0][1])),
  ]
  # The steps stacked, each step's batch split over the devices.
  assert first[0].sharding.spec == jax.P(None, 'data')
  host_state, metrics = host.train(jax.tree.map(jnp.copy, state), *first)
  assert metrics['loss'].shape == (2,)
  device_state = state
  for _ in range(2):
    device_state, _ = steps.train(device_state, images, labels)
  assert_trees_close(
      jax.device_get(host_state.params),
      jax.device_get(device_state.params),
      rtol=1e-5,
  )


class StochasticDepthBlock(models.BasicBlock):
  """A block of *Deep Networks with Stochastic Depth* (Huang et al., 2016),
  outside the package: in training, F(x) survives with a probability that
  falls linearly from 1 (the first block) to 0.5 (the last, ``index``
  ``blocks - 1``); in inference F(x) is scaled by it."""

  blocks: int = 1

  @nn.compact
  def __call__(self, x, index=0):
    survival = 1 - 0.5 * index / (self.blocks - 1)
    y = self.residual_function(x)
    if self.has_rng('dropout'):
      y = y * jax.random.bernoulli(self.make_rng('dropout'), survival)
    else:
      y = y * survival
    return self.act(
        y
        + models.shortcut(
            x,
            self.out_features,
            self.strides,
            self.shortcut,
            self.conv,
            self.norm,
        )
    )


@pytest.mark.parametrize('scan_blocks', [False, True])
def test_a_block_defined_outside_the_package_trains(scan_blocks):
  model = models.ResNet(
      stage_sizes=(4, 4),
      widths=(4, 8),
      block_cls=functools.partial(StochasticDepthBlock, blocks=8),
      scan_blocks=scan_blocks,
  )
  config = default_config.get_config()
  config.weight_decay = 0.0  # A dropped block's weights do not move.
  tx = train.create_optimizer(config, lambda step: 0.1)
  state = train.create_train_state(model, tx, seed=0, image_size=8)
  images = jax.random.randint(jax.random.key(1), (16, 8, 8, 3), 0, 256)
  images, labels = images.astype(jnp.uint8), jnp.arange(16) % 10
  step = jax.jit(train.train_step)

  def dropped(step_number):
    before = state.replace(step=step_number)
    after, metrics = step(before, images, labels)
    assert np.isfinite(metrics['loss'])
    params = [
        models.unroll_blocks({'params': s.params})['params']
        for s in (before, after)
    ]
    return {
        name
        for name, *_ in models.blocks_in_order(params[0])
        if all(
            np.array_equal(a, b)
            for a, b in zip(*(jax.tree.leaves(p[name]) for p in params))
        )
    }

  draws = [dropped(n) for n in range(6)]
  # Each block draws its own: some are dropped, never the first; each step
  # draws anew, and the same step draws the same (resumes are exact).
  assert set().union(*draws) and 'stage1_block1' not in set().union(*draws)
  assert len({frozenset(d) for d in draws}) > 1
  # Blocks 2..4 of a stage (one loop when scanned) draw apart: one dropped
  # while the next is kept, which one draw shared by the loop's blocks
  # (whose survival falls with the index) never gives.
  assert any(
      f'stage{s}_block{b}' in d and f'stage{s}_block{b + 1}' not in d
      for d in draws
      for s in (1, 2)
      for b in (2, 3)
  )
  assert dropped(3) == draws[3]
  # Inference draws nothing.
  logits = train.classify(state, images)
  assert logits.shape == (16, 10) and np.all(np.isfinite(logits))
