"""The layers of nad_jax: each module imports only its own layer and those below it.

1 pure pieces (models, attacks, data, attention, checkpoint, kernels, torch_io, figures,
defaults, streams), 2 the engine (train), 3 checks and stages (validation, stages), 4 defenses,
5 experiments (runners), 6 the public surface (api, cli, the package itself). Imports inside
functions count too: a lazy import is still a dependency.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'nad_jax'
LAYERS = {'train': 2, 'validation': 3, 'stages': 3, 'defenses': 4, 'experiments': 5,
          'api': 6, 'cli': 6, '__init__': 6}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer(module: str) -> int:
  parts = module.split('.')
  if parts == ['nad_jax']:
    return LAYERS['__init__']
  return LAYERS.get(parts[1], 1)


def imports(path: pathlib.Path) -> set[str]:
  """The nad_jax modules `path` imports, anywhere in the file (TYPE_CHECKING blocks aside)."""
  tree = ast.parse(path.read_text())
  type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) == 'TYPE_CHECKING' for n in ast.walk(node)}
  found = set()
  for node in ast.walk(tree):
    if id(node) in type_checking:
      continue
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith('nad_jax')}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('nad_jax'):
      folder = PACKAGE.parent / node.module.replace('.', '/')
      submodules = {f'{node.module}.{a.name}' for a in node.names
                    if (folder / a.name).is_dir() or (folder / f'{a.name}.py').exists()}
      found |= submodules or {node.module}  # `from nad_jax import models`: the submodule
  return found


def test_no_module_imports_a_layer_above_it():
  violations = []
  for path in sorted(PACKAGE.rglob('*.py')):
    name = module_name(path)
    for imported in imports(path):
      if layer(imported) > layer(name):
        violations.append(f'{name} (layer {layer(name)}) imports {imported} '
                          f'(layer {layer(imported)})')
  assert not violations, '\n'.join(violations)


def test_the_check_can_fail(tmp_path):
  """An attack module that imported the engine, even inside a function, would be caught."""
  offender = tmp_path / 'offender.py'
  offender.write_text('def prepare():\n  from nad_jax import train\n  return train\n')
  assert imports(offender) == {'nad_jax.train'}
  assert layer('nad_jax.train') > layer('nad_jax.attacks.offender')


def test_no_import_cycle():
  graph = {module_name(p): imports(p) for p in PACKAGE.rglob('*.py')}
  done, path = set(), []

  def visit(module):
    if module in path:
      raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(module):] + [module]))
    if module in done or module not in graph:
      return
    path.append(module)
    for imported in sorted(graph[module]):
      if not module.startswith(imported + '.'):  # a module's own package is not a cycle
        visit(imported)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
