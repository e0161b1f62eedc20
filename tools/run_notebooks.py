"""Run notebooks top to bottom on the current code and keep their outputs, so that the book reads on GitHub.

Each notebook runs in a fresh process, in its own directory (nbs/), as `nbdev_test` runs it: a cell marked
`#| eval: false` or calling `nbdev_export(` is not run, nor is anything under a `skip_exec` frontmatter. Unlike
`nbdev_test`, `#| slow` (and `#| notest`) cells ARE run, so that training demos show their curves; `--skip_slow` leaves
them out (their outputs are then empty). Figures are kept as PNG images (matplotlib's Agg backend), W&B is offline.

The first failing cell stops the run with its traceback and the notebook is left as it was. After a run, the notebook
gets every code cell's new outputs (stale ones go, those of cells not run too), a freshness stamp in its metadata,
`metadata.lm_basics.code_sha256`: the sha256 of what its code cells do (see `code_meaning`), which
tests/test_notebooks.py compares with the notebook's current code; then it is cleaned as `nbdev_clean` cleans it
(settings.ini keeps the `lm_basics` metadata key; execution counts go, outputs stay). Outputs that name this machine
(the repository's path, a temporary directory, the home directory) are reported, for the notebook to avoid.

Usage: python tools/run_notebooks.py [--skip_slow] [--timing] [NB ...]     (default: every nbs/*.ipynb)
"""
from __future__ import annotations
import argparse, hashlib, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
STAMP_KEY = 'lm_basics'      # notebook metadata key, kept by nbdev_clean (settings.ini: allowed_metadata_keys)
SEP = '\n\x1e\n'             # between code cells in the hashed text (a record separator: never in a cell's source)
SLOW_CELL = 10.0             # seconds: a cell slower than this that `nbdev_test` runs is reported (mark it `#| slow`)

def code_meaning(src:str) -> str:
    """What a code cell does, without its layout: its directives (`#| ...`, which decide whether and how it runs) and
    the syntax tree of its code (docstrings with their whitespace collapsed), so re-wrapping a line or a docstring or
    editing a comment leaves the outputs fresh, and any change to what runs does not. A cell Python cannot parse (a `%magic`) counts as its text."""
    import ast
    directives = [l.strip() for l in src.splitlines() if l.lstrip().startswith('#|')]
    try: tree = ast.parse(src)
    except SyntaxError: tree = None
    if tree is not None:
        for node in ast.walk(tree):   # a docstring re-wrapped is the same docstring: its whitespace is layout
            body = getattr(node, 'body', None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
               and isinstance(body[0].value.value, str):
                body[0].value.value = ' '.join(body[0].value.value.split())
    tree = src if tree is None else ast.dump(tree)
    return '\n'.join(directives + [tree])

def code_sha256(nb:dict) -> str:
    "The freshness stamp of a notebook (its JSON as a dict): sha256 of what its code cells do (`code_meaning`), in order."
    srcs = [code_meaning(c['source'] if isinstance(c['source'], str) else ''.join(c['source']))
            for c in nb['cells'] if c['cell_type'] == 'code']
    return hashlib.sha256(SEP.join(srcs).encode('utf-8')).hexdigest()

def stamp_of(nb:dict) -> str|None:
    "The stamp recorded in a notebook's metadata by its last run (None if it was never run by this tool)."
    return (nb.get('metadata', {}).get(STAMP_KEY) or {}).get('code_sha256')

def has_code(nb:dict) -> bool: return any(c['cell_type'] == 'code' for c in nb['cells'])

def is_fresh(path:Path|str) -> bool:
    "Whether a notebook's committed outputs come from its current code cells."
    nb = json.loads(Path(path).read_text(encoding='utf-8'))
    return stamp_of(nb) == code_sha256(nb)

# ------------------------------------------------------------------------------------------- one notebook (child)
def _machine_paths() -> dict[str, str]:
    "Strings that would tie an output to this machine: what each one is."
    out = {str(ROOT): 'the repository path', tempfile.gettempdir() + '/': 'a temporary directory',
           os.path.realpath(tempfile.gettempdir()) + '/': 'a temporary directory'}
    home = os.path.expanduser('~')
    if home not in ('/', '') and len(home) > 5: out[home + '/'] = 'the home directory'
    return out

def _texts(out:dict):
    "The text of one output (streams, text data, tracebacks)."
    if 'text' in out: yield ''.join(out['text'])
    for k, v in out.get('data', {}).items():
        if k.startswith('text/'): yield ''.join(v) if isinstance(v, list) else v
    yield from out.get('traceback', [])

def run_one(path:Path, skip_slow:bool=False, timing:bool=False) -> int:
    "Execute the notebook at `path` and write it back with its outputs and stamp (in this process); 0 if it ran whole."
    os.environ.setdefault('IPYTHONDIR', tempfile.mkdtemp(prefix='lm_basics_ipython_'))
    os.environ.update(WANDB_MODE='offline', MPLBACKEND='Agg', IN_TEST='1')
    from execnb.nbio import read_nb, write_nb, dict2nb
    from execnb.shell import CaptureShell, format_exc
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.clean import clean_nb
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor, nb_lang
    from fastcore.basics import str2bool

    rel = os.path.relpath(path)
    raw = json.loads(path.read_text(encoding='utf-8'))
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb   # as nbdev_test reads it: directives parsed
    fm = getattr(nb, 'frontmatter_', {}) or {}
    code_cells = [c for c in raw['cells'] if c['cell_type'] == 'code']
    for c in code_cells: c['outputs'], c['execution_count'] = [], None
    by_id = {c.get('id'): c for c in code_cells}
    if len(by_id) != len(code_cells) or None in by_id:
        print(f'{rel}: cells without unique ids; run nbdev_clean --fname {rel} first', file=sys.stderr); return 1
    test_flags = set(get_config(path=ROOT).tst_flags.split())   # what nbdev_test skips: notest, slow
    skip_flags = test_flags if skip_slow else set()
    index = {c.get('id'): i for i, c in enumerate(raw['cells'])}   # cells as numbered in the notebook file

    def skipped(cell) -> str|None:
        if 'nbdev_export' + '(' in cell.source: return 'nbdev_export'
        d = getattr(cell, 'directives_', {}) or {}
        if d.get('eval:', [''])[0].lower() == 'false': return 'eval: false'
        if flags := skip_flags & d.keys(): return ', '.join(sorted(flags))
        return None

    n_run, n_skip, times, t0 = 0, 0, [], time.perf_counter()
    if not (str2bool(fm.get('skip_exec', False)) or nb_lang(nb) != 'python' or not code_cells):
        shell = CaptureShell(path, mpl_format='png')
        sys.path.insert(0, str(ROOT))
        with working_directory(path.parent):
            for cell in nb.cells:
                if cell.cell_type != 'code': continue
                i = index.get(cell.get('id'))
                if skipped(cell): n_skip += 1; continue
                t = time.perf_counter()
                outs = shell.run(cell.source)
                times.append((time.perf_counter() - t, i, cell))
                n_run += 1
                if shell.exc is not None:
                    e = shell.exc
                    src = ''.join('    | ' + l for l in cell.source.splitlines(True)[:15])
                    print(''.join(format_exc(e)).rstrip() + f"\n\n{src.rstrip()}\n", file=sys.stderr)
                    print(f"{rel}: cell #{i} (id {cell.get('id')}, shown above) failed: {type(e).__name__}: {e}\n"
                          f"{rel} was not changed", file=sys.stderr)
                    return 1
                by_id[cell.get('id')]['outputs'] = [json.loads(json.dumps(o, default=str)) for o in outs]

    raw.setdefault('metadata', {})[STAMP_KEY] = {'code_sha256': code_sha256(raw)}
    cfg = get_config(path=ROOT)   # exactly what `nbdev_clean` does with this project's settings
    clean_nb(raw, False, cfg.get('allowed_metadata_keys').split(), cfg.get('allowed_cell_metadata_keys').split(),
             cfg.clean_ids)
    write_nb(dict2nb(raw), path)

    found = {}
    for c in code_cells:
        for o in c['outputs']:
            for text in _texts(o):
                for s, what in _machine_paths().items():
                    if s in text: found.setdefault(c['id'], set()).add(what)
    slow = [(s, i) for s, i, c in times if s > SLOW_CELL and not (test_flags & (getattr(c, 'directives_', {}) or {}).keys())]
    print(f'{rel}: {n_run} cells run, {n_skip} skipped, {time.perf_counter() - t0:.1f} s; outputs and stamp written')
    if timing:
        for s, i, c in sorted(times, key=lambda t: -t[0])[:5]: print(f'  cell #{i}: {s:.1f} s')
    for s, i in slow: print(f'  note: cell #{i} took {s:.0f} s and nbdev_test runs it; mark it #| slow if it must be slow')
    for cid, whats in found.items():
        print(f"  note: cell id {cid}'s output shows {', '.join(sorted(whats))} (machine-specific; avoid printing it)")
    return 0

# ------------------------------------------------------------------------------------------- the command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('notebooks', nargs='*', help='notebooks to run (default: every nbs/*.ipynb)')
    p.add_argument('--skip_slow', '--skip-slow', action='store_true', help='do not run #| slow cells (as nbdev_test)')
    p.add_argument('--timing', action='store_true', help="print each notebook's five slowest cells")
    p.add_argument('--_one', action='store_true', help=argparse.SUPPRESS)   # run one notebook in this process
    a = p.parse_args(argv)
    paths = [Path(n) for n in a.notebooks] or sorted(NBS.glob('*.ipynb'))
    for n in paths:
        if not n.is_file() or n.suffix != '.ipynb':
            print(f'error: {n}: not a notebook file (give paths like nbs/00_core.ipynb)', file=sys.stderr); return 2
    if a._one: return run_one(paths[0].resolve(), a.skip_slow, a.timing)
    for n in paths:   # each in a fresh process: no state (imports, seeds, signal handlers) leaks between notebooks
        # sets print in one order; argparse's help and progress bars are as wide as in any terminal, not this one
        env = {**os.environ, 'PYTHONHASHSEED': '0', 'COLUMNS': '100', 'LINES': '40'}
        flags = ['--skip_slow'] * a.skip_slow + ['--timing'] * a.timing
        rc = subprocess.run([sys.executable, __file__, '--_one', *flags, str(n)],
                            env=env).returncode
        if rc:
            print(f'error: {n} failed (see above); notebooks after it were not run', file=sys.stderr); return 1
    return 0

if __name__ == '__main__':
    sys.exit(main())
