"""The layers of a network: its table (Table 1's columns), Fig. 7's responses
and the deconvnet's projections.

``layer_table`` lists every conv and dense layer with its output shape,
parameters and multiply-adds (``--mode=summary``, the README's table);
``layer_responses`` reads the BN outputs the blocks sow (the report's Fig. 7);
``deconv`` projects a sown feature map's strongest channels back to the input
(the report's ``deconv``). All work on either block form (``scan_blocks``).
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
        module, (nn.Conv, nn.Dense)
    ):
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
      rows.append(
          dict(
              name='/'.join(module.path),
              kernel=kernel,
              output=tuple(y.shape[1:]),
              params=params,
              macs=macs,
          )
      )
    return y

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), x
    )
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
    elif models.SCANNED_NAME.fullmatch(
        name
    ):  # Each response stacked over the blocks.
      responses = value['response']
      found.extend(r[j] for j in range(len(responses[0])) for r in responses)
    elif models.BLOCK_NAME.fullmatch(name):
      found.extend(value['response'])
  return found


@jax.custom_vjp
def deconv_relu(x):
  """ReLU whose backward pass rectifies the signal it is given (deconvnet).

  Zeiler & Fergus (2014, §2.1) rectify the reconstruction on its way down;
  the gradient would instead zero it wherever the forward input was negative.
  """
  return nn.relu(x)


deconv_relu.defvjp(lambda x: (nn.relu(x), None), lambda _, g: (nn.relu(g),))

DECONV_KEEP = ('map', 'max')


def deconv(
    model: models.ResNet,
    variables,
    x,
    layer: str,
    count: int,
    keep: str = 'map',
):
  """Deconvnet projections (Zeiler & Fergus, 2014) of one image's strongest
  channels of a sown feature map (``conv1``, ``stage1``, ...).

  The deconvnet of a net of convs, inference-mode BN, ReLUs, max pooling and
  additions is the backward pass from the map to the input with ReLU's
  backward rule replaced (``deconv_relu``): convs become transposed convs
  with the same filters, BN (affine in inference) multiplies by its
  scale / sqrt(var + eps) and its bias drops out, max pooling unpools to the
  forward pass's maxima (the switches), additions send the signal down both
  paths, option A's subsampling and zero channels scatter it back.

  Each of the ``count`` channels with the largest maximum is projected on
  its own, all other channels zero: with ``keep='map'`` its whole map, with
  ``keep='max'`` only its strongest activation (as Zeiler & Fergus do).
  ``x`` is one input (1, h, w, 3). Returns the channels (strongest first),
  their maxima and the projections (count, h, w, 3), in input space.
  """
  deconvnet = model.clone(act=deconv_relu)

  def feature_map(x):
    _, state = deconvnet.apply(
        variables, x, train=False, mutable=['intermediates']
    )
    return state['intermediates'][layer][0]

  @jax.jit
  def project(x):
    fmap, backward = jax.vjp(feature_map, x)
    maxima, channels = jax.lax.top_k(fmap[0].max((0, 1)), count)
    kept = jnp.moveaxis(fmap[0], -1, 0)[channels]  # (count, h, w)
    if keep == 'max':  # One position (the first of ties) per channel.
      flat = kept.reshape(count, -1)
      kept = (
          flat * jax.nn.one_hot(flat.argmax(1), flat.shape[1], dtype=flat.dtype)
      ).reshape(kept.shape)
    one_channel = jax.nn.one_hot(channels, fmap.shape[-1], dtype=fmap.dtype)
    cotangents = kept[:, None, :, :, None] * one_channel[:, None, None, None]
    (projections,) = jax.vmap(backward)(cotangents)
    return channels, maxima, projections[:, 0]

  return project(x)
