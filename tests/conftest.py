"""Eight simulated CPU devices, so sharding is tested without accelerators.

The tests' programs are small and each runs a few times: LLVM's
optimisations take more time in the compiler than they save in the run, so
they compile at ``--xla_backend_optimization_level=0``. Their results round
otherwise than the default level's, in the last bits, as another CPU's do:
what the tests compare bitwise is compiled alike, and every other
comparison has a tolerance derived from the arithmetic.

One XLA compilation cache serves the whole run, every xdist worker and every
subprocess they start: the many runs of configs/smoke.py compile the same
programs, and a cached program computes exactly what a fresh compile does.
"""

import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = ' '.join(
    [
        os.environ.get('XLA_FLAGS', ''),
        '--xla_backend_optimization_level=0',
        '--xla_force_host_platform_device_count=8',
    ]
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR',
    os.path.join(
        tempfile.gettempdir(),
        'resnet_jax-tests-xla-cache-'
        + os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid())),
    ),
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_sessionfinish(session):
  if not hasattr(session.config, 'workerinput'):  # The last to finish.
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
