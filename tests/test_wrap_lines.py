"""tools/wrap_lines.py wraps notebook code to 120 columns without changing what the code means.

Each case is real source run through the tool in-process; the result is checked line by line, compiled, and compared
with the original (AST, docstrings' text, docments as fastcore reads them).
"""
from __future__ import annotations
import ast, importlib.util, json, sys
from pathlib import Path

import pytest
from fastcore.docments import docments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import wrap_lines  # noqa: E402
import run_notebooks  # noqa: E402


def wrapped(src:str) -> str:
    "`src` wrapped: every line fits, it still compiles, and its AST (docstrings' whitespace aside) is the same."
    new, why = wrap_lines.wrap_source(src)
    assert why is None, why
    assert max(len(l) for l in new.split('\n')) <= 120, new
    assert wrap_lines.meaning(new) == wrap_lines.meaning(src)
    return new

def run(src:str) -> dict:
    "The names `src` defines, after running it."
    ns = {}
    exec(compile(src, '<cell>', 'exec'), ns)
    return ns


LONG_COMMENT = ' '.join(['a comment long enough to push this line past the limit'] * 2)

def test_trailing_comment_moves_above_its_code():
    src = f'def f(x):\n    y = x * 2   # {LONG_COMMENT}\n    return y'
    new = wrapped(src)
    assert new.split('\n')[1:3] == [f'    # {LONG_COMMENT}', '    y = x * 2']
    assert run(new)['f'](3) == 6


def test_long_call_splits_after_an_outer_comma_aligned_after_the_bracket():
    src = ("result = dict(alpha=sorted([3, 1, 2]), beta=max(4, 5, 6), gamma='some text', delta=sum(range(10)), "
           "epsilon=len('abcdef'))")
    new = wrapped(src)
    first, second = new.split('\n')
    assert first.endswith(',') and second == ' ' * len('result = dict(') + "epsilon=len('abcdef'))"
    assert run(new)['result'] == run(src)['result']


def test_long_f_string_splits_outside_its_fields():
    src = ('def msg(name, items, n):\n'
           '    raise ValueError(f"{name} holds {n:,} values ({\', \'.join(items)}) but {{braces}} and more words '
           'follow here, {n * 2} of them, to make it long")')
    new = wrapped(src)
    rows = new.split('\n')[1:]
    assert len(rows) == 2 and all(r.strip().startswith(('raise ValueError(f"', 'f"')) for r in rows)
    for r in rows:   # each piece is a valid f-string on its own: no field cut in two
        piece = r.strip().removeprefix('raise ValueError(').rstrip(')')
        ast.parse(piece)
    with pytest.raises(ValueError) as a: run(src)['msg']('x', ['a', 'b'], 1234)
    with pytest.raises(ValueError) as b: run(new)['msg']('x', ['a', 'b'], 1234)
    assert str(a.value) == str(b.value)


def test_long_docstring_becomes_a_wrapped_triple_quoted_one():
    src = ('def f():\n'
           '    "' + 'Return nothing, but say so in a docstring that is far too long for one line of code. ' * 2 + '"\n'
           '    return None')
    new = wrapped(src)
    rows = new.split('\n')
    assert rows[1].startswith('    """Return nothing') and rows[2].startswith('    ') and rows[2].endswith('"""')
    assert ' '.join(run(new)['f'].__doc__.split()) == ' '.join(run(src)['f'].__doc__.split())


def test_docments_survive_a_moved_comment(tmp_path):
    src = ('from dataclasses import dataclass\n'
           '@dataclass\n'
           'class Config:\n'
           '    lr:float=0.1 # the peak learning rate\n'
           '    # checkpointing\n'
           '    checkpoint_dir:str="out" # where the checkpoints go, and the metrics, and the settings too, '
           'and whatever else the run writes')
    new = wrapped(src)
    assert '    # checkpointing\n\n    # where the checkpoints go' in new   # kept apart from the section comment
    docs = []
    for name, text in (('wrap_case_before', src), ('wrap_case_after', new)):   # docments reads a module's file
        (tmp_path/f'{name}.py').write_text(text)
        spec = importlib.util.spec_from_file_location(name, tmp_path/f'{name}.py')
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        try: spec.loader.exec_module(mod); docs.append(docments(mod.Config))
        finally: del sys.modules[name]
    assert docs[0] == docs[1] and docs[0]['checkpoint_dir'].startswith('where the checkpoints go')


@pytest.mark.parametrize('src, why', [
    ('%timeit sum(range(10))  # ' + ' '.join(['a magic line is not Python: its cell is left as it is'] * 2),
     'not Python'),
    ('x = """\n' + ' '.join(['a long line inside a string that is not a docstring stays as it is'] * 2) + '\n"""',
     None),
    ('#| export\nimport ' + ', '.join(f'module_{i}' for i in range(12)), None),   # no brackets, nowhere to split
])
def test_cells_left_alone(src, why):
    new, reason = wrap_lines.wrap_source(src)
    assert new == src and (reason or '').startswith(why or '')


def test_notebook_written_as_nbdev_writes_it(tmp_path):
    comment = ' '.join(['explained at length, far past the limit'] * 3)
    cells = [{'cell_type': 'markdown', 'id': 'm1', 'metadata': {}, 'source': ['# Title — ünïcode']},
             {'cell_type': 'code', 'id': 'c1', 'metadata': {}, 'execution_count': None, 'outputs': [],
              'source': ['#| export\n', f'total = sum([1, 2, 3])   # {comment}']}]
    nb = {'cells': cells, 'metadata': {'lm_basics': {}}, 'nbformat': 4, 'nbformat_minor': 5}
    nb['metadata']['lm_basics']['code_sha256'] = run_notebooks.code_sha256(nb)   # its outputs are fresh
    p = tmp_path/'t.ipynb'
    p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    before = p.read_text(encoding='utf-8')
    assert wrap_lines.main(['--check', str(p)]) == 1 and p.read_text(encoding='utf-8') == before   # lists, no write
    assert wrap_lines.main([str(p)]) == 0
    text = p.read_text(encoding='utf-8')
    new = json.loads(text)
    assert text == json.dumps(new, sort_keys=True, indent=1, ensure_ascii=False) + '\n' and 'ünïcode' in text
    assert new['cells'][1]['source'] == ['#| export\n', '# ' + comment[:comment.rindex(' ', 0, 118)] + '\n',
                                         '# ' + comment[comment.rindex(' ', 0, 118) + 1:] + '\n',
                                         'total = sum([1, 2, 3])']
    assert run_notebooks.is_fresh(p)   # only the layout of the code changed: still fresh
    assert wrap_lines.main(['--check', str(p)]) == 0
    assert wrap_lines.main([str(tmp_path/'missing.ipynb')]) == 2
