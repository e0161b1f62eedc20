"""The book's committed outputs come from its current code.

`tools/run_notebooks.py` runs a notebook top to bottom and records in its metadata the sha256 of its code cells
(`metadata.lm_basics.code_sha256`); a notebook whose code changed since its outputs were made fails here, naming the
command that refreshes it. The tool itself is checked on a tiny notebook, really executed.
"""
from __future__ import annotations
import json, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
TOOL = ROOT/'tools'/'run_notebooks.py'
sys.path.insert(0, str(ROOT/'tools'))
import run_notebooks  # noqa: E402


def test_every_notebook_output_is_from_its_current_code():
    stale = []
    for p in sorted(NBS.glob('*.ipynb')):
        nb = json.loads(p.read_text(encoding='utf-8'))
        if not run_notebooks.has_code(nb): continue
        stamp = run_notebooks.stamp_of(nb)
        if stamp != run_notebooks.code_sha256(nb):
            stale.append(f"{p.relative_to(ROOT)} ({'never run by the tool' if stamp is None else 'code changed since its outputs'})")
    assert not stale, (f"{len(stale)} notebooks show outputs that are not from their current code:\n  " + '\n  '.join(stale)
                       + '\nrefresh each with: python tools/run_notebooks.py ' + ' '.join(s.split()[0] for s in stale))


# ---------------------------------------------------------------------------------------------------- the tool itself
def _cell(src:str, kind:str='code', cid:str|None=None) -> dict:
    c = {'cell_type': kind, 'id': cid or f'c{abs(hash(src)) % 10**8}', 'metadata': {}, 'source': src.splitlines(True)}
    if kind == 'code': c.update(outputs=[], execution_count=None)
    return c

def _write(p:Path, cells:list[dict]):
    nb = {'cells': cells, 'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
          'nbformat': 4, 'nbformat_minor': 5}
    p.write_text(json.dumps(nb, indent=1) + '\n', encoding='utf-8')

def _run(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)

def _outputs(p:Path) -> dict:
    "{cell id: its outputs' text, joined}"
    nb = json.loads(p.read_text(encoding='utf-8'))
    return {c['id']: ''.join(t for o in c['outputs'] for t in run_notebooks._texts(o))
            for c in nb['cells'] if c['cell_type'] == 'code'}


def test_the_stamp_follows_the_code_cells(tmp_path):
    nb = tmp_path/'tiny.ipynb'
    _write(nb, [_cell('# A title', 'markdown', 'md'), _cell('x = 6 * 7\nx', cid='show'),
                _cell("#| slow\nprint('slow ran')", cid='slow'), _cell("#| eval: false\nprint('never')", cid='noeval'),
                _cell("import os\nos.path.basename(os.getcwd())", cid='cwd')])
    r = _run(nb)
    assert r.returncode == 0, r.stderr
    first = json.loads(nb.read_text())
    stamp = first['metadata']['lm_basics']['code_sha256']
    assert stamp == run_notebooks.code_sha256(first) and run_notebooks.is_fresh(nb)
    out = _outputs(nb)
    assert (out['show'], out['slow'], out['noeval'], out['cwd']) == ('42', 'slow ran\n', '', repr(tmp_path.name))
    assert all(c.get('execution_count') is None for c in first['cells'])   # cleaned: no execution counts
    # nbdev_clean (as .ci/run runs it) keeps the stamp and changes nothing
    subprocess.run([Path(sys.executable).parent/'nbdev_clean', '--fname', nb], cwd=ROOT, check=True, capture_output=True)
    assert json.loads(nb.read_text()) == first

    # a markdown edit leaves the outputs fresh; a code edit makes them stale until the tool runs again
    first['cells'][0]['source'] = ['# Another title\n']
    nb.write_text(json.dumps(first, indent=1))
    assert run_notebooks.is_fresh(nb)
    first['cells'][1]['source'] = ['x = (6 *   # a comment and a new layout: the same code, still fresh\n', '     7)\n', 'x']
    nb.write_text(json.dumps(first, indent=1))
    assert run_notebooks.is_fresh(nb)
    first['cells'][4]['source'] = ['def f():\n', '    """A docstring re-wrapped\n', '    over two lines."""\n', '\n'] + first['cells'][4]['source']
    nb.write_text(json.dumps(first, indent=1)); first = json.loads(nb.read_text())
    assert not run_notebooks.is_fresh(nb)   # a new function: stale
    assert _run(nb).returncode == 0; first = json.loads(nb.read_text())
    first['cells'][4]['source'][1:3] = ['    """A docstring re-wrapped over two lines."""\n']   # only its layout: still fresh
    nb.write_text(json.dumps(first, indent=1))
    assert run_notebooks.is_fresh(nb)
    first['cells'][2]['source'] = ["#| eval: false\n", "print('slow ran')"]   # a directive decides what runs: stale
    nb.write_text(json.dumps(first, indent=1))
    assert not run_notebooks.is_fresh(nb)
    first['cells'][2]['source'] = ["#| slow\n", "print('slow ran')"]
    first['cells'][1]['source'] = ['x = 6 * 9\n', 'x']
    nb.write_text(json.dumps(first, indent=1))
    assert not run_notebooks.is_fresh(nb)
    assert _run(nb).returncode == 0
    second = json.loads(nb.read_text())
    assert second['metadata']['lm_basics']['code_sha256'] not in (stamp, None) and run_notebooks.is_fresh(nb)
    assert _outputs(nb)['show'] == '54'

    # --skip_slow runs as nbdev_test does: the slow cell is not run and keeps no stale output
    assert _run('--skip_slow', nb).returncode == 0
    assert _outputs(nb)['slow'] == '' and run_notebooks.is_fresh(nb)


def test_a_failing_cell_stops_the_run_and_leaves_the_notebook(tmp_path):
    nb = tmp_path/'bad.ipynb'
    _write(nb, [_cell("print('one')", cid='one'), _cell("raise ValueError('the second cell is wrong')", cid='two'),
                _cell("print('three')", cid='three')])
    before = nb.read_bytes()
    r = _run(nb)
    assert r.returncode == 1
    assert "cell #1 (id two, shown above) failed: ValueError: the second cell is wrong" in r.stderr
    assert 'bad.ipynb was not changed' in r.stderr and nb.read_bytes() == before
    r = _run(tmp_path/'missing.ipynb')
    assert r.returncode == 2 and r.stderr.strip().startswith('error:') and 'Traceback' not in r.stderr
