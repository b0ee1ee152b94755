"""The layers of a network: its table (Table 1's columns) and Fig. 7's responses.

``layer_table`` lists every conv and dense layer with its output shape,
parameters and multiply-adds (``--mode=summary``, the README's table);
``layer_responses`` reads the BN outputs the blocks sow (the report's Fig. 7).
Both work on either block form (``scan_blocks``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models


def layer_table(model: models.ResNet, image_size: int):
  """Lists every conv and dense layer with its output shape and cost.

  Runs abstractly (no arrays are computed) on the unrolled form of the
  network (``scan_blocks`` does not change its layers). Returns
  ``(rows, variables)``,
  each row a dict with ``name``, ``kernel`` (e.g. '3x3/2'), ``output`` shape
  (without batch), ``params`` and ``macs`` (multiply-adds per image, the
  paper's measure of complexity in Table 1).
  """
  model = model.clone(scan_blocks=False)  # One row per layer, either form.
  rows = []

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(
        module, (nn.Conv, nn.Dense)):
      x = args[0]
      if isinstance(module, nn.Conv):
        k = module.kernel_size
        kernel = f'{k[0]}x{k[1]}/{module.strides[0]}'
        macs = int(np.prod(y.shape[1:])) * int(np.prod(k)) * x.shape[-1]
        params = int(np.prod(k)) * x.shape[-1] * module.features
      else:
        kernel = 'dense'
        macs = x.shape[-1] * module.features
        params = macs + module.features
      rows.append(dict(name='/'.join(module.path), kernel=kernel,
                       output=tuple(y.shape[1:]), params=params, macs=macs))
    return y

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), x)
  return rows, variables


def layer_responses(model: models.ResNet, variables, x) -> list[jax.Array]:
  """Outputs of every 3x3 conv's BN, before the ReLU or the addition (Fig. 7).

  Evaluates ``x`` in inference mode and returns the responses in network
  order (stem first), each of shape ``x.shape[:1] + (h, w, c)``.
  """
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  # Sown values are stored in call order, which Python dicts keep.
  found = []
  for name, value in state['intermediates'].items():
    if name == 'response':  # The stem's.
      found.extend(value)
    elif models.SCANNED_NAME.fullmatch(name):  # Each response stacked over the blocks.
      responses = value['response']
      found.extend(r[j] for j in range(len(responses[0])) for r in responses)
    elif models.BLOCK_NAME.fullmatch(name):
      found.extend(value['response'])
  return found
