"""Building blocks shared by the configs: the attack variants; the defaults live in
nad_jax/defaults.py."""

import ml_collections


ATTACK_VARIANTS = ('badnets', 'all2all', 'trojan', 'blend', 'sig', 'cl', 'refool', 'wanet')
CLEAN_LABEL_RATE = 0.8  # share of the target class, as the NAD code's SIG (8% of CIFAR-10)
CLEAN_LABEL_VARIANTS = ('sig', 'cl', 'refool')
# CL's clean model for the PGD perturbation: the victim's architecture, 20 epochs.
WRN_SURROGATE = dict(model='wrn16_1', epochs=20, learning_rate=0.1, lr_boundaries=(10, 15))


def set_attack(config: ml_collections.ConfigDict, variant: str | None,
               config_file: str) -> ml_collections.ConfigDict:
  """Selects the attack named by a config variant (`configs/<file>.py:<variant>`).

  'all2all' is BadNets with mode all_to_all. The clean-label attacks (sig, cl,
  refool) poison CLEAN_LABEL_RATE of the target class's images.
  """
  if variant in (None, ''):
    return config
  if variant not in ATTACK_VARIANTS:
    raise ValueError(f'{config_file} has no variant {variant!r}; choose one of {ATTACK_VARIANTS}')
  if variant == 'all2all':
    config.attack.name, config.attack.mode = 'badnets', 'all_to_all'
  else:
    config.attack.name = variant
  if variant in CLEAN_LABEL_VARIANTS:
    config.attack.poison_rate = CLEAN_LABEL_RATE
  return config
