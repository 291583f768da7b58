"""nad-jax: backdoor erasing by Neural Attention Distillation (Li et al., ICLR 2021) in JAX.

The Python API (nad_jax/api.py): load_data, train_backdoored, erase, evaluate.
"""

from nad_jax.api import Result, erase, evaluate, load_data, make_config, train_backdoored
from nad_jax.data import Dataset
from nad_jax.validation import ConfigError

__all__ = ['ConfigError', 'Dataset', 'Result', 'erase', 'evaluate', 'load_data', 'make_config',
           'train_backdoored']
