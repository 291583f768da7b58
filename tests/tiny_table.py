"""configs/table1.py shrunk to seconds, in one place: tests/test_defenses.py runs main.py with
these overrides as flags and checks what it recorded against a config they were applied to."""

# Tiny net, 512 synthetic images, 1 or 2 epochs a stage. FP follows NAD's schedule, so NAD's
# fields shrink FP too; MCR has its own recipe (samples_per_epoch 0: one pass an epoch).
OVERRIDES = {
    'model.name': 'tiny',
    'data.train_size': 512, 'data.test_size': 256, 'data.clean_fraction': 0.25,
    'data.eval_batch_size': 128,
    'backdoor_training.epochs': 2, 'backdoor_training.batch_size': 32,
    'backdoor_training.learning_rate': 0.05, 'backdoor_training.lr_boundaries': (),
    'teacher.epochs': 1, 'teacher.batch_size': 32, 'teacher.learning_rate': 0.05,
    'teacher.lr_boundaries': (),
    'nad.epochs': 1, 'nad.batch_size': 32, 'nad.lr_boundaries': (),
    'mcr.epochs': 1, 'mcr.batch_size': 32, 'mcr.samples_per_epoch': 0, 'mcr.eval_every': 1,
    'mcr.points': 3,
    'table.attention_images': 2,
}


def flags() -> list[str]:
  """OVERRIDES as main.py's --config.FIELD=VALUE flags."""
  return [f'--config.{field}={value}' for field, value in OVERRIDES.items()]
