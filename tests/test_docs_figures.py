"""The figures the READMEs and docs/*.md quote come from result files under docs/results/
that a named command regenerates (docs/results/regenerate.py): every marked block must
equal what its result files say, cell for cell."""

import importlib.util
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md', os.path.join('benchmarks', 'README.md')] + [
    os.path.join('docs', f) for f in sorted(os.listdir(os.path.join(ROOT, 'docs')))
    if f.endswith('.md')]
MARKER = re.compile(r'<!-- figures: (\w+)[^>]*-->\n((?:\|.*\n)+)')
# Figures: "a / b" anywhere in a cell, or a cell that is one number (bold: outside a criterion).
PAIR = re.compile(r'\*{0,2}(\d+\.\d+)\*{0,2} / \*{0,2}(\d+\.\d+)')
NUMBER = re.compile(r'\*{0,2}(\d+\.\d+)\*{0,2}')


def sources():
  spec = importlib.util.spec_from_file_location(
      'regenerate', os.path.join(ROOT, 'docs', 'results', 'regenerate.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def figures(table: str) -> list:
  """The figures below a markdown table's header: every "a / b", and every cell that is one
  number, bold removed, in reading order."""
  rows = table.splitlines()[2:]  # below the header and its rule
  cells = [cell.strip() for row in rows for cell in row.strip('|').split('|')]
  return [figure for cell in cells for figure in (
      [NUMBER.fullmatch(cell)[1]] if NUMBER.fullmatch(cell) else
      [f'{a} / {b}' for a, b in PAIR.findall(cell)])]


def marked_blocks() -> list:
  """(doc, block name, the figures of the table under its marker)."""
  out = []
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      text = f.read()
    for name, table in MARKER.findall(text):
      out.append((doc, name, figures(table)))
  return out


BLOCKS = marked_blocks()


def test_every_block_is_marked_once():
  """Every block of regenerate.py is marked once in README.md, benchmarks/README.md or
  docs/*.md."""
  assert sorted(name for _, name, _ in BLOCKS) == sorted(sources().BLOCKS)


@pytest.mark.parametrize('doc,name,cells', BLOCKS, ids=[f'{d}:{n}' for d, n, _ in BLOCKS])
def test_a_block_quotes_its_result_files(doc, name, cells):
  module = sources()
  block = module.BLOCKS[name]
  for command, _ in block.sources.values():  # a main.py command names a config file that exists
    config = re.search(r'--config=(configs/\w+\.py)', command)
    assert config or not command.startswith('python main.py'), command
    assert not config or os.path.isfile(os.path.join(ROOT, config.group(1))), command
  results = module.load(name)
  if results is None:
    pytest.skip(f'{doc}: docs/results/ lacks the files of block {name!r}; regenerate them '
                f'with python docs/results/regenerate.py {name}')
  assert cells == block.cells(results), f'{doc}: block {name!r} differs from docs/results/'


def test_missing_only_runs_the_commands_of_absent_result_files(monkeypatch, tmp_path):
  """`regenerate.py --missing NAME` runs only the commands whose result file is not in
  docs/results/ yet, so a block can grow one run at a time."""
  module = sources()
  ran = []
  monkeypatch.setattr(module.subprocess, 'run', lambda argv, **_: ran.append(argv))
  monkeypatch.setattr(module, 'copy_measured', lambda *_: None)
  module.regenerate('cifar', set(), missing_only=True)
  assert not ran  # every result file of the block is here
  monkeypatch.setattr(module, 'HERE', str(tmp_path))  # an empty docs/results/
  module.regenerate('cifar', set(), missing_only=True)
  assert len(ran) == len(module.BLOCKS['cifar'].sources)


def test_a_result_with_stages_of_an_earlier_run_is_not_copied(monkeypatch, tmp_path):
  """regenerate.py copies only what its command measured: a workdir left by an earlier run
  (perhaps of older code) restores its finished stages, which the results mark."""
  module = sources()
  monkeypatch.setattr(module, 'ROOT', str(tmp_path))
  os.makedirs(tmp_path / module.HERE)
  os.makedirs(tmp_path / 'runs' / 'x')
  measured = {'timing': {'backdoored': {'img_per_s': [1.0]}, 'nad': {'img_per_s': [2.0]}}}
  kept = {'details': {'badnets': {'timing': {'teacher': {'from_earlier_run': True}}}},
          'timing': {'nad': {'img_per_s': [2.0], 'from_earlier_run': True}}}
  for results in (measured, kept):
    (tmp_path / 'runs' / 'x' / 'results.json').write_text(json.dumps(results))
    if results is kept:
      with pytest.raises(SystemExit) as exit_:
        module.copy_measured('runs/x/results.json', 'x.json')
      assert str(exit_.value.code) == (
          'error: runs/x/results.json: details.badnets.timing.teacher, timing.nad finished '
          'before this command ran (from_earlier_run), perhaps with older code; delete runs/x '
          'and run again')
    else:
      module.copy_measured('runs/x/results.json', 'x.json')
  with open(tmp_path / module.HERE / 'x.json') as f:
    assert json.load(f) == measured  # the refused one was not copied
