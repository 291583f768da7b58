"""The test environment, set before JAX loads: four forced CPU devices (so data-parallel code
runs in tests), quicker compiles and one persistent compilation cache (the tests compile the
same small programs many times)."""

import os
import pathlib
import sys

# LLVM's optimisation level 1 instead of 2 halves the CPU compiles, which are most of the
# tests' time, and gives the same numbers (configs/tiny.py's and the quickstart's results.json
# are identical at both levels).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=4'
                           + ' --xla_backend_optimization_level=1').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Unbounded (JAX's default size), so that JAX takes no file lock: a test that kills a process
# cannot leave one held. A main.py that a test starts uses its config.compilation_cache.
for flag, value in {'JAX_COMPILATION_CACHE_DIR': str(ROOT / '.pytest_cache' / 'jax'),
                    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}.items():
  os.environ.setdefault(flag, value)
sys.path.insert(0, str(ROOT))

# The longest modules first (each runs 2-5 minutes on 2 CPU cores). pytest-xdist (README:
# `--dist loadfile --no-loadscope-reorder`) hands whole modules to its workers in this order,
# so the workers end together instead of one running the longest module alone at the end.
LONGEST_FIRST = ('test_multihost.py', 'test_seeds.py', 'test_defenses.py', 'test_api.py',
                 'test_cli.py', 'test_pipeline.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
