"""The test environment, set before JAX loads: four forced CPU devices (so data-parallel code
runs in tests) and one persistent compilation cache (the tests compile the same small programs
many times)."""

import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Unbounded (JAX's default size), so that JAX takes no file lock: a test that kills a process
# cannot leave one held. A main.py that a test starts uses its config.compilation_cache.
for flag, value in {'JAX_COMPILATION_CACHE_DIR': str(ROOT / '.pytest_cache' / 'jax'),
                    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}.items():
  os.environ.setdefault(flag, value)
sys.path.insert(0, str(ROOT))
