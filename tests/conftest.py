"""The test environment, set before JAX loads: four forced CPU devices (so data-parallel code
runs in tests) and one compilation cache."""

import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One persistent compilation cache for every worker and every main.py a test starts: the
# tests compile the same small programs many times. Bounded, so that JAX locks its files.
for flag, value in {'JAX_COMPILATION_CACHE_DIR': str(ROOT / '.pytest_cache' / 'jax'),
                    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
                    'JAX_COMPILATION_CACHE_MAX_SIZE': str(2**30)}.items():
  os.environ.setdefault(flag, value)
sys.path.insert(0, str(ROOT))
