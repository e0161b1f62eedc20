"""A run directory and a running trainer, tried as a hostile user would: files that look like a run's but are not its
own, data replaced between two jobs of one run, a stop request in the middle of a very long step or during the closing
sample, absurd sizes. Each is a real `lm_basics_train` process; each test fails without the fix it covers."""
from __future__ import annotations
import json, random, re, shutil, signal, time
from pathlib import Path
import numpy as np
import pytest
import torch


def flags(lm, corpus, **over):
    "The tiny run on the Shakespeare bytes, without the loss plot and not compiled."
    return ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'),
            *lm.tiny_flags(vocab_size=256, **over), '--no-plot', '--no-compile']


def finished_run(lm, corpus, d:Path, **over) -> Path:
    lm.run(*flags(lm, corpus, **over), '--checkpoint_dir', d, cwd=d.parent).ok()
    return d


# ---------------------------------------------------------------------------------------------------- never start afresh over a run
def test_unreadable_checkpoints_are_not_absent(lm, corpus, tmp_path):
    "Every checkpoint unreadable, then --resume auto: refused, naming the files; nothing is trained or rewritten."
    d = finished_run(lm, corpus, tmp_path/'run')
    rng = random.Random(0)
    for p in d.glob('checkpoint_iter_*.pt'): p.write_bytes(rng.randbytes(4000))
    before = lm.snapshot(d)
    lm.run(*flags(lm, corpus, max_iters=30), '--checkpoint_dir', d, '--resume', 'auto', cwd=tmp_path).error(
        'checkpoint_iter_10.pt (cannot be read)', 'checkpoint_iter_20.pt (cannot be read)', 'move them aside')
    assert lm.snapshot(d) == before, lm.changes(before, lm.snapshot(d))


def test_run_record_that_disagrees_is_refused(lm, corpus, tmp_path):
    "run.json naming another run, then --resume auto: refused, naming the disagreement, not a fresh start over the checkpoints."
    d = finished_run(lm, corpus, tmp_path/'run')
    (d/'run.json').write_text(json.dumps(dict(run_id='0123456789abcdef', parent=None, created='2026-01-01 00:00:00')))
    before = lm.snapshot(d)
    lm.run(*flags(lm, corpus, max_iters=30), '--checkpoint_dir', d, '--resume', 'auto', cwd=tmp_path).error(
        'disagree', 'run.json names run 0123456789abcdef')
    assert lm.snapshot(d) == before


def test_a_copied_in_checkpoint_is_never_overwritten(lm, corpus, tmp_path):
    "Another run's checkpoint copied in as checkpoint_iter_30.pt: a continuation to 40 is refused before it trains, the file intact."
    d, other = finished_run(lm, corpus, tmp_path/'run'), finished_run(lm, corpus, tmp_path/'other', max_iters=30, seed=1)
    shutil.copy(other/'checkpoint_iter_30.pt', d/'checkpoint_iter_30.pt')
    before = lm.snapshot(d)
    lm.run(*flags(lm, corpus, max_iters=40), '--checkpoint_dir', d, '--resume', 'auto', cwd=tmp_path).error(
        'checkpoint_iter_30.pt (belongs to run', 'could save over them')
    assert lm.snapshot(d) == before


# ---------------------------------------------------------------------------------------------------- the data a run trains on
def test_resume_on_replaced_data_is_refused(lm, corpus, tmp_path):
    "The token file replaced between two jobs of one run (same size, other tokens): --resume auto refuses; a branch says so."
    data = tmp_path/'data'; data.mkdir()
    for s in ('train', 'val'): shutil.copy(corpus.path(s, 'npy'), data/f'{s}.npy')
    args = ['--train_data_path', data/'train.npy', '--val_data_path', data/'val.npy', *lm.tiny_flags(vocab_size=256), '--no-plot', '--no-compile']
    lm.run(*args, '--checkpoint_dir', tmp_path/'run', cwd=tmp_path).ok()
    ids = np.load(data/'train.npy'); np.save(data/'train.npy', ids[::-1].copy())   # same size, other text
    before = lm.snapshot(tmp_path/'run')
    lm.run(*args, '--max_iters', 30, '--checkpoint_dir', tmp_path/'run', '--resume', 'auto', cwd=tmp_path).error(
        'train data', 'is not what this run trained on', '--checkpoint_dir NEW_DIR')
    assert lm.snapshot(tmp_path/'run') == before
    branch = lm.run(*args, '--max_iters', 30, '--resume_from', tmp_path/'run'/'checkpoint_iter_20.pt', '--checkpoint_dir', tmp_path/'branch',
                    cwd=tmp_path).ok()
    assert 'differs from the data of the run this one branches from' in branch.stdout, branch


# ---------------------------------------------------------------------------------------------------- stop requests
def test_sigterm_in_a_long_step_stops_within_a_micro_batch(lm, corpus, tmp_path):
    """A step of 60,000 micro-batches (minutes of work): SIGTERM once training started stops within seconds, the step
    abandoned, and the checkpoint holds the last completed iteration; --resume auto continues from it."""
    d = tmp_path/'run'
    p = lm.start(*flags(lm, corpus, max_iters=2), '--gradient_accumulation_steps', 60_000, '--eval_interval', 1000,
                 '--checkpoint_dir', d, cwd=tmp_path)
    p.wait_for(r'^-{80}')
    time.sleep(1.0)
    t0 = time.monotonic(); p.signal(signal.SIGTERM); run = p.finish()
    assert run.returncode == 128 + signal.SIGTERM and 'Traceback' not in run.stderr, run
    assert time.monotonic() - t0 < 30, f"took {time.monotonic() - t0:.0f}s to stop\n{run!r}"   # a step takes minutes
    assert 'Stopped by SIGTERM after iteration 0' in run.stdout, run
    assert torch.load(d/'checkpoint_iter_0.pt', weights_only=True)['iteration'] == 0


def test_sigterm_during_the_closing_sample_stops_it(lm, corpus, tmp_path):
    "A finished, saved run sampling 100,000 tokens: SIGTERM ends the sample at once and says the run is complete and saved."
    d = tmp_path/'run'
    p = lm.start(*flags(lm, corpus), '--sample_tokens', 100_000, '--checkpoint_dir', d, cwd=tmp_path)
    p.wait_for(r'^Sample \(')
    t0 = time.monotonic(); p.signal(signal.SIGTERM); run = p.finish()
    assert time.monotonic() - t0 < 20 and run.returncode == 128 + signal.SIGTERM, run
    line = [l for l in run.stderr.splitlines() if l.strip()]
    assert line == [f"Stopped by SIGTERM during the closing sample: the run is complete, saved in {d/'checkpoint_iter_20.pt'}"], run
    assert 'finishing this step' not in run.stdout + run.stderr


# ---------------------------------------------------------------------------------------------------- absurd sizes
def test_a_million_layers_is_refused_at_once(lm, corpus, tmp_path):
    "--num_layers 1048576: the memory check answers in seconds (it counts two layers, not a million)."
    t0 = time.monotonic()
    lm.run(*flags(lm, corpus), '--num_layers', 1048576, '--checkpoint_dir', tmp_path/'run', cwd=tmp_path).error(
        'this model and batch need about')
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------------------------------- the checkpoint reader
def test_checkpoint_reader_on_random_and_truncated_files(tmp_path):
    "Random bytes, text, and every kind of truncation of a real checkpoint: a checkpoint or one LMBasicsError, never another exception."
    from hypothesis import given, settings, strategies as st, HealthCheck
    from lm_basics.core import LMBasicsError
    from lm_basics.checkpoint import read_checkpoint, save_checkpoint
    from lm_basics.model import TransformerLM
    good = save_checkpoint(tmp_path/'good.pt', TransformerLM(vocab_size=16, context_length=8, d_model=8, num_layers=1, num_heads=2, d_ff=8),
                           None, 3).read_bytes()
    path = tmp_path/'x.pt'

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(min_size=1, max_size=4000), st.text(min_size=1).map(str.encode),
                     st.integers(1, len(good) - 1).map(lambda n: good[:n]),
                     st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)).map(lambda t: good[:t[0]] + bytes([t[1]]) + good[t[0] + 1:])))
    def check(data):
        path.write_bytes(data)
        try: ck = read_checkpoint(path)
        except LMBasicsError as e: assert 'x.pt' in str(e)
        else: assert ck['iteration'] == 3
    check()
