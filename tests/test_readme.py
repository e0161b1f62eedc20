"""What the README says is what the repository does. It is the index notebook rendered; it stays a README (at most
1,500 words); its three commands (set up, train the demo, run the tests) agree with the repository and CI; the demo runs
(scaled down), continues from its newest checkpoint as the README says, and the numbers of its excerpt are the demo's;
the five commands from text to model use only flags those tools have; every link resolves, to a file of the repository
or a page the site builds. And the reference pages of the site (`nbs/*.md`) name, in every row of their tables, tests
that exist. (That every shipped config parses and validates is tested by the notebook 08_config; the two configs of the
Chinese document run, with their architectures checked, in test_cli_spec.py.)"""
import importlib, importlib.util, io, contextlib, json, math, re, shlex, subprocess, sys
from pathlib import Path
import pytest

MAX_WORDS = 1500
SCRIPTS = {'lm_basics_train': 'train', 'lm_basics_prepare': 'tokenize', 'lm_basics_generate': 'generate',
           'lm_basics_plot': 'records', 'lm_basics_export': 'export', 'lm_basics_bench': 'bench'}

def _root(lm) -> Path: return lm.ROOT

def _tool(lm, name:str):
    spec = importlib.util.spec_from_file_location(name, _root(lm)/'tools'/f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def readme(lm) -> str: return (_root(lm)/'README.md').read_text(encoding='utf-8')

def section(text:str, heading:str) -> str:
    "The text of the `## heading` section (to the next `## `)."
    return text.split(f'## {heading}', 1)[1].split('\n## ', 1)[0]

def bash_blocks(text:str) -> list[str]:
    return [b.strip() for b in re.findall(r'```bash\n(.*?)```', text, re.S)]

def quick_start_commands(text:str) -> list[str]:
    "The ```bash blocks of the README's Quick start section, in order."
    return bash_blocks(section(text, 'Quick start'))

def commands(block:str) -> list[list[str]]:
    "The commands of a bash block: comments dropped, `\\` continuations joined, each split as the shell splits it."
    return [shlex.split(c) for c in block.replace('\\\n', ' ').splitlines() if c.strip() and not c.lstrip().startswith('#')]


# ---------------------------------------------------------------------------------------------------- the README
def test_readme_is_the_index_notebook_rendered(lm):
    root = _root(lm)
    assert readme(lm) == _tool(lm, 'sync_readme').render(root/'nbs'/'index.ipynb'), \
        "README.md is out of step with nbs/index.ipynb: run python tools/sync_readme.py"

def test_readme_is_a_readme(lm):
    "At most 1,500 words; the reference (guarantees, bad inputs, speed, recipes) is on pages of the site, linked."
    text = readme(lm)
    words = len(text.split())   # as `wc -w` counts them, code included
    assert words <= MAX_WORDS, f'README.md has {words} words (at most {MAX_WORDS}): move the detail to a page of the site'
    site = _tool(lm, 'build_site').SITE_URL
    for page in ('guide', 'guarantees', 'bad_inputs', 'speed', 'recipe_results', 'developing'):
        assert f'({site}{page}.html)' in text, f'no link to the {page} page'

def test_readme_has_the_three_commands(lm):
    root = _root(lm)
    setup, demo, tests = quick_start_commands(readme(lm))
    # 1. set-up: a virtual environment, the pinned CPU torch, the project with its dev extras
    assert 'python3 -m venv .venv' in setup and '. .venv/bin/activate' in setup, setup
    assert 'torch==2.13.0' in setup and re.search(r'-e "?\.\[dev\]"?', setup), setup
    assert 'nbdev==2.4.14' in (root/'settings.ini').read_text()   # the dev extras pin nbdev
    # 2. the demo: the console script on a shipped config
    assert demo.split()[:3] == ['lm_basics_train', '--config', 'configs/demo.json'], demo
    assert (root/'configs'/'demo.json').is_file()
    assert 'lm_basics_train=lm_basics.cli:train' in (root/'settings.ini').read_text().replace(' ', '')
    # 3. the tests: the notebooks, then this suite; CI (.ci/run and the GitHub workflow) runs the same command
    assert 'nbdev_test' in tests and 'pytest tests' in tests, tests
    command = tests.split('IPYTHONDIR=/tmp/lm_basics_ipython ')[-1]
    assert command in (root/'.ci'/'run').read_text(), "CI does not run the README's test command"
    workflow = (root/'.github'/'workflows'/'test.yaml').read_text()
    assert tests in workflow and setup in workflow, "the test workflow does not run the README's set-up and test commands"

def test_demo_command_runs_and_continues(lm, tmp_path):
    """`lm_basics_train --config configs/demo.json` on the built-in Shakespeare data (prepared into LM_BASICS_CACHE),
    scaled down; run again with more iterations it continues from the newest checkpoint ("resume_from": "auto")."""
    import os, shutil
    shutil.copytree(_root(lm)/'configs', tmp_path/'configs')
    demo = quick_start_commands(readme(lm))[1].split()[1:]
    small = ['--max_iters', '10', '--warmup_iters', '2', '--log_interval', '5', '--eval_interval', '5', '--eval_iters', '2',
             '--checkpoint_interval', '5', '--batch_size', '4', '--context_length', '32', '--d_model', '32', '--num_heads', '2',
             '--d_ff', '64', '--num_layers', '1']
    first = lm.run(*demo, *small, cwd=tmp_path, fork=False).ok()   # the installed console script itself, as a reader runs it
    out = tmp_path/'runs'/'demo'
    assert sorted(p.name for p in out.glob('checkpoint_iter_*.pt')) == ['checkpoint_iter_10.pt', 'checkpoint_iter_5.pt']
    cache = Path(os.environ['LM_BASICS_CACHE'])/'shakespeare_bytes'
    meta = json.loads((cache/'meta.json').read_text())
    # (the configuration table is checked in test_cli_spec; here only what the README promises)
    assert f"Train data size: {meta['train_tokens']:,} tokens" in first.stdout.splitlines() and meta['vocab_size'] == 256
    assert 'No checkpoint in runs/demo: starting a new run' in first.stdout
    again = lm.run(*demo, *[a if a != '10' else '15' for a in small], cwd=tmp_path).ok()
    lines = again.stdout.splitlines()
    assert 'Resumed from runs/demo/checkpoint_iter_10.pt at iteration 10' in lines, again
    assert re.search(r'^Iter\s+10 \|', again.stdout, re.M) and not re.search(r'^Iter\s+[0-9] \|', again.stdout, re.M), again
    assert re.search(r'^\[CHECKPOINT\] Saved checkpoint to runs/demo/checkpoint_iter_15\.pt$', again.stdout, re.M), again
    its = [r['iter'] for r in lm.read_metrics(out/'metrics.jsonl') if 'train/loss' in r]
    assert its == sorted(set(its)) and its[-1] == 14
    check_demo_excerpt(lm, cache, meta)

def check_demo_excerpt(lm, cache:Path, meta:dict):
    """The numbers the README quotes from the demo's output are the demo's: its data (38 plays, byte tokens, the train
    size), its model's parameter count, and the baselines its validation loss is compared with."""
    import numpy as np, torch
    from lm_basics.config import parse_config, validate
    from lm_basics.model import count_parameters
    from lm_basics.train import build_model
    text = section(readme(lm), 'Quick start')
    assert f"Train data size: {meta['train_tokens']:,} tokens" in text
    assert meta['train_documents'] + len(meta['val_documents']) == 38 and '38 Shakespeare plays' in text
    cfg = validate(parse_config(['--config', str(_root(lm)/'configs'/'demo.json')])[0])
    n = count_parameters(build_model(cfg, torch.device('cpu')))['total']
    assert f'Total parameters: {n:,}' in text and f'a {n / 1e6:.1f}M-parameter model' in text, n
    val = float(re.findall(r'final val loss (\d+\.\d+)', text)[0])
    assert f'{val:.2f} nats per byte ({val / math.log(2):.2f} bits per byte)' in text
    train, valid = np.load(cache/'train.npy'), np.load(cache/'val.npy')
    p = np.bincount(train, minlength=256) / len(train)      # a unigram model of the training bytes, on the validation bytes
    unigram = float(-np.log(p[valid]).mean())
    assert f'against {unigram:.2f} for a unigram model of the bytes (and {math.log(256):.2f} for a uniform guess)' in text


def tool_flags(script:str) -> set[str]:
    "The flags of a console script, from its `--help` (its `main` run in this process)."
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(f'lm_basics.{SCRIPTS[script]}').main(['--help'])
    return set(re.findall(r'(?<![\w-])(--[a-z][\w-]*)', out.getvalue()))

def test_five_commands_use_the_tools_flags(lm):
    "Text to model to text in five commands: each is a console script the package installs, with flags it has."
    cmds = commands(bash_blocks(section(readme(lm), 'From raw text to a model you can talk to'))[0])
    assert [c[0] for c in cmds] == ['lm_basics_prepare', 'lm_basics_train', 'lm_basics_generate', 'lm_basics_plot', 'lm_basics_export']
    settings = (_root(lm)/'settings.ini').read_text().replace(' ', '')
    for c in cmds:
        assert f'{c[0]}=lm_basics.cli:' in settings, c[0]
        unknown = {a.split('=')[0] for a in c[1:] if a.startswith('--')} - tool_flags(c[0])
        assert not unknown, f'{c[0]} has no {sorted(unknown)}'

def test_every_link_resolves(lm):
    "Each link and image of the README is a file of the repository or a page the site builds (`build_site.NAV`)."
    build_site, root = _tool(lm, 'build_site'), _root(lm)
    pages = {'index'} | {build_site.page_name(n) for _, names in build_site.NAV for n in names}
    links = re.findall(r'\]\(([^)\s]+)\)', readme(lm))
    assert len(links) > 20
    for url in links:
        if url.startswith(build_site.SITE_URL):
            page = url[len(build_site.SITE_URL):].split('#')[0] or 'index.html'
            assert page.endswith('.html') and page[:-5] in pages, f'{url}: the site has no such page'
        else:
            assert not re.match(r'\w+://', url), f'{url}: a link away from the project'
            assert (root/url.split('#')[0]).exists(), f'{url}: no such file'


# ---------------------------------------------------------------------------------------------------- the reference pages
@pytest.fixture(scope='module')
def collected(lm) -> set[str]:
    "Every test of tests/ as pytest names it (`test_x` and `test_x[case]`), collected in a process of its own."
    r = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-o', 'addopts=', '-p', 'no:cacheprovider',
                        'tests'], cwd=_root(lm), capture_output=True, text=True, timeout=600)
    ids = [l.split('::', 1)[1] for l in r.stdout.splitlines() if '::' in l]
    assert r.returncode == 0 and len(ids) > 100, r.stdout[-3000:] + r.stderr[-3000:]
    return set(ids) | {i.split('[', 1)[0] for i in ids}

def table_rows(md:str) -> list[list[str]]:
    "The body rows of the markdown tables of `md`, as cells (`\\|` inside a cell is not a border)."
    rows = [[c.strip() for c in re.split(r'(?<!\\)\|', l.strip())[1:-1]] for l in md.splitlines() if l.startswith('|')]
    return [r for r in rows if not all(re.fullmatch(r':?-+:?', c) for c in r) and r[-1] != 'test']

@pytest.mark.parametrize('page', ['guarantees.md', 'bad_inputs.md'])
def test_every_row_names_tests_that_exist(page, lm, collected):
    """Each row of the guarantee and bad-input tables ends with the tests that check it, and each is a test of the suite
    (on the bad-input page a bare `[case]` is a case of test_bad_input_is_one_clear_line)."""
    md = (_root(lm)/'nbs'/page).read_text(encoding='utf-8')
    rows = table_rows(md)
    assert len(rows) >= 10, rows
    for row in rows:
        names = re.findall(r'`([^`]+)`', row[-1])
        assert names, f'{page}: a row without its test: {row[0]}'
        for name in names:
            if name.startswith('['): name = f'test_bad_input_is_one_clear_line{name}'
            assert name in collected, f'{page}: {name} is not a test of the suite (row: {row[0][:80]})'
    for f in re.findall(r'`(tests/[\w/]+\.py)`', md): assert (_root(lm)/f).is_file(), f'{page}: no {f}'
