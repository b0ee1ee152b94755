"""The devices a run uses: one 1-D ``data`` mesh over every device and host.

The state is replicated and each global batch split along the mesh, so a
step's BatchNorm statistics and gradients are those of the global batch
(§3.4). On the CPU, one device per core.
"""

from collections.abc import Iterable
import os

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from resnet_jax import cli


class MeshError(cli.UserError):
  """Batch sizes that do not split over the devices."""


def replicated(mesh) -> NamedSharding:
  """Every device of ``mesh`` holds the whole array (the state)."""
  return NamedSharding(mesh, P())


def split(mesh) -> NamedSharding:
  """The first axis split over ``mesh`` (a global batch)."""
  return NamedSharding(mesh, P('data'))


def stacked(mesh) -> NamedSharding:
  """Global batches of several steps, (steps, batch, ...): the batch split."""
  return NamedSharding(mesh, P(None, 'data'))


def global_array(local: np.ndarray, sharding) -> jax.Array:
  """This process's rows of a batch, as a slice of the global array."""
  return jax.make_array_from_process_local_data(sharding, local)


def replicate(array: np.ndarray, sharding) -> jax.Array:
  """An array every process holds in full, replicated over all devices."""
  return jax.make_array_from_callback(
      array.shape, sharding, lambda index: array[index]
  )


def use_cpu_cores(batch_sizes: Iterable[int]):
  """On the CPU, makes one JAX device per core, unless the user chose a count.

  XLA:CPU runs the per-device parts of a sharded step side by side, which is
  faster than one device whose operations each use every core (BENCHMARKS.md).
  The count is the largest that divides every batch size. Accelerators are
  unaffected. Call it before JAX first touches a device.
  """
  if (
      'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
      or jax.config.jax_num_cpu_devices >= 0
  ):
    return
  cores = (
      len(os.sched_getaffinity(0))
      if hasattr(os, 'sched_getaffinity')
      else os.cpu_count()
  )
  count = max(
      d for d in range(1, cores + 1) if all(b % d == 0 for b in batch_sizes)
  )
  jax.config.update('jax_num_cpu_devices', count)


def make_mesh(batch_sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A 1-D data mesh (of every device by default); batches must split on it."""
  devices = jax.devices() if devices is None else devices
  for name, size in batch_sizes.items():
    if size % len(devices):
      raise MeshError(
          f'{name} {size} does not divide over '
          f'{len(devices)} devices; use a multiple of '
          f'{len(devices)}'
      )
  return jax.make_mesh(
      (len(devices),),
      ('data',),
      devices=devices,
      axis_types=(jax.sharding.AxisType.Auto,),
  )
