"""The README is the index notebook rendered; its three commands (set up, train the demo, run the tests) are there
and agree with the repository; the demo command runs (scaled down) and, run again, continues from its newest checkpoint
as the README says. (That every shipped config parses and validates is tested by the notebook 08_config; the two
configs of the Chinese document run, with their architectures checked, in test_cli_spec.py.)"""
import importlib.util, json, re
from pathlib import Path
import pytest

def _root(lm) -> Path: return lm.ROOT

def _sync_readme(lm):
    spec = importlib.util.spec_from_file_location('sync_readme', _root(lm)/'tools'/'sync_readme.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def quick_start_commands(readme:str) -> list[str]:
    "The ```bash blocks of the README's Quick start section, in order."
    section = readme.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    return [b.strip() for b in re.findall(r'```bash\n(.*?)```', section, re.S)]

def test_readme_is_the_index_notebook_rendered(lm):
    root = _root(lm)
    assert (root/'README.md').read_text(encoding='utf-8') == _sync_readme(lm).render(root/'nbs'/'index.ipynb'), \
        "README.md is out of step with nbs/index.ipynb: run python tools/sync_readme.py"

def test_readme_has_the_three_commands(lm):
    root = _root(lm)
    setup, demo, tests = quick_start_commands((root/'README.md').read_text(encoding='utf-8'))
    # 1. set-up: a virtual environment, the pinned CPU torch, the project with its dev extras
    assert 'python3 -m venv .venv' in setup and '. .venv/bin/activate' in setup, setup
    assert 'torch==2.13.0' in setup and re.search(r'-e "?\.\[dev\]"?', setup), setup
    assert 'nbdev==2.4.14' in (root/'settings.ini').read_text()   # the dev extras pin nbdev
    # 2. the demo: the console script on a shipped config
    assert demo.split()[:3] == ['lm_basics_train', '--config', 'configs/demo.json'], demo
    assert (root/'configs'/'demo.json').is_file()
    assert 'lm_basics_train=lm_basics.cli:train' in (root/'settings.ini').read_text().replace(' ', '')
    # 3. the tests: the notebooks, then this suite; CI runs the same command
    assert 'nbdev_test' in tests and 'pytest tests' in tests, tests
    ci = (root/'.ci'/'run').read_text()
    assert tests.split('IPYTHONDIR=/tmp/lm_basics_ipython ')[-1] in ci, "CI does not run the README's test command"

def test_demo_command_runs_and_continues(lm, tmp_path):
    """`lm_basics_train --config configs/demo.json` on the built-in Shakespeare data (prepared into LM_BASICS_CACHE),
    scaled down; run again with more iterations it continues from the newest checkpoint ("resume_from": "auto")."""
    import os, shutil
    shutil.copytree(_root(lm)/'configs', tmp_path/'configs')
    demo = quick_start_commands((_root(lm)/'README.md').read_text(encoding='utf-8'))[1].split()[1:]
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
