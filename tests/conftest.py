"""Four forced CPU devices, set before JAX loads, so data-parallel code runs in tests."""

import os
import pathlib
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
