"""A run directory belongs to one run, and a mistake never costs finished work: real `lm_basics_train` processes on real
files (the Shakespeare plays as bytes) doing what careful and careless users do.

| situation | what happens | test |
|---|---|---|
| a second run on a directory in use (fresh, `--resume auto`, extending a finished run, or at the same instant) | refused at once, exit 2, naming the holder (pid, host, start time); it writes nothing | `test_second_run_is_refused_while_the_first_trains`, `test_two_runs_started_at_once` |
| the same under torchrun | rank 0 holds the lock; a scheduler's SIGTERM to the whole job saves the step every rank stopped at | `test_torchrun_rank0_holds_the_lock` |
| resuming an older checkpoint into a directory that holds later ones (a rewind) | refused, naming the later checkpoints and how to branch; `--checkpoint_dir NEW` branches, with the metrics up to the branch point | `test_rewind_is_refused_and_a_branch_keeps_history` |
| resuming a copy of a checkpoint | the run goes on beside the copy, never into the directory recorded inside it | `test_resume_from_a_copy_writes_beside_the_copy` |
| a stray file named like a checkpoint (random bytes) | never counted as the newest, never deleted; pruning removes only this run's checkpoints | `test_stray_checkpoint_file_is_never_counted_or_deleted` |
| a token file truncated or rewritten while training | one clear error naming the file, after saving the last completed step; no crash | `test_data_file_changed_underneath` |
| the same under torchrun, seen by one process only (each machine has its own copy) | every process stops at the same micro-batch (none left in an all-reduce), after saving the last completed step | `test_data_file_changed_under_torchrun` |
| Ctrl-C or SIGTERM during start-up | one line saying so (exit 130 / 143), nothing written | `test_signal_during_startup` |
| a run killed before its first checkpoint | its directory holds no run: the same command runs | `test_directory_without_a_checkpoint_holds_no_run` |
| a second Ctrl-C while a checkpoint is being written | exit 130, says it was interrupted, no temporary file, the previous checkpoint intact | `test_second_ctrl_c_while_saving` |
| two `lm_basics_prepare` jobs into one `--out` at once | the second is refused at once, naming the first's pid; the first's files stay; `--force` afterwards replaces them | `test_two_prepares_into_one_directory` |
| `--sample_tokens` with no tokenizer beside the data | refused before training; a run directory keeps its own tokenizer, which generation prefers | `test_sample_needs_a_tokenizer_and_the_run_keeps_its_own` |
| a planned run trained in chunks (`--lr_decay_iters`) | bit-identical to one uninterrupted run, with the same records | `test_training_in_chunks_is_one_run` |
"""
import json, os, random, re, shutil, signal, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
import pytest
import torch
from lm_basics.checkpoint import read_checkpoint, list_checkpoints, checkpoint_identity

def data_flags(corpus, train=None, val=None):
    return ['--train_data_path', train or corpus.path('train', 'npy'), '--val_data_path', val or corpus.path('val', 'npy'), '--vocab_size', '256']

def flags(lm, corpus, **over):
    "The tiny run on the Shakespeare bytes, without the loss plot and not compiled (many runs here are planned long and stopped early)."
    return [*data_flags(corpus), *lm.tiny_flags(**over), '--no-plot', '--no-compile']

from contextlib import contextmanager
@contextmanager
def killed_after(p):
    "Whatever happens in the block, `p` (a started process, in a session of its own) is not left running afterwards."
    try: yield p
    finally:
        if p.p.poll() is None:
            try: os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError: pass
            p.p.wait()

def catches(pid, sig) -> bool:
    "Whether process `pid` has a handler for `sig` (the SigCgt mask in /proc/PID/status)."
    mask = next(l.split()[1] for l in open(f'/proc/{pid}/status') if l.startswith('SigCgt:'))
    return bool(int(mask, 16) >> (sig - 1) & 1)

def its(d) -> list[int]: return [it for it, _ in list_checkpoints(d)]

def run_id(d) -> str: return json.loads((Path(d)/'run.json').read_text())['run_id']

def train_iters(lm, d) -> list[int]: return [r['iter'] for r in lm.read_metrics(d) if 'train/loss' in r]


# ---------------------------------------------------------------------------------------------------- 1. one run per directory
def test_second_run_is_refused_while_the_first_trains(lm, corpus, tmp_path):
    d = tmp_path/'x'
    first = lm.start(*flags(lm, corpus, max_iters=100_000, checkpoint_interval=50, log_interval=1), '--checkpoint_dir', d, cwd=tmp_path)
    with killed_after(first):
        first.wait_for(r'^Iter +1 ')
        host = os.uname().nodename
        for extra in ([], ['--resume', 'auto'], ['--resume', 'auto', '--max_iters', '200000']):
            second = lm.run(*flags(lm, corpus, max_iters=100_000), '--checkpoint_dir', d, *extra, cwd=tmp_path)
            line = second.error('is in use by another run', f'pid {first.pid} on {host}', 'started', 'choose another --checkpoint_dir')
            assert not re.search(r'^(Iter|\[CHECKPOINT\])', second.stdout, re.M), second
        first.wait_for(r'^\[CHECKPOINT\] Saved checkpoint to \S+_\d+\.pt')
        first.signal(signal.SIGTERM)
        done = first.finish()
    assert done.returncode == 128 + signal.SIGTERM, done
    iters = train_iters(lm, d)
    assert iters == sorted(set(iters)) and iters[0] == 0, "metrics.jsonl has duplicated or interleaved records"
    assert {checkpoint_identity(p)['run_id'] for _, p in list_checkpoints(d)} == {run_id(d)}
    # and once the first run has ended, the same directory is free again
    lm.run(*flags(lm, corpus, max_iters=int(its(d)[-1]) + 1), '--checkpoint_dir', d, '--resume', 'auto', cwd=tmp_path).ok()

def test_two_runs_started_at_once(lm, corpus, tmp_path):
    "Two fresh runs, then two runs extending a finished one, started at the same instant: one trains, the other writes nothing."
    def race(d, *extra, max_iters):
        procs = [lm.start(*flags(lm, corpus, max_iters=max_iters), '--checkpoint_dir', d, *extra, cwd=tmp_path) for _ in range(2)]
        runs = [p.finish() for p in procs]
        trained = [r for r in runs if re.search(r'^Iter ', r.stdout, re.M)]
        assert len(trained) == 1, runs   # exactly one of them trained; the other found the directory taken (or the work done)
        trained[0].ok()
        other = runs[1 - runs.index(trained[0])]
        if other.returncode: other.error(re.compile(r'is in use by another run|changed while this run was starting|already holds a run'))
        else: assert 'Run already complete' in other.stdout and '[CHECKPOINT]' not in other.stdout, other
    d = tmp_path/'race'
    race(d, max_iters=20)
    assert its(d) == [10, 20] and train_iters(lm, d) == [0, 5, 10, 15, 19]
    race(d, '--resume', 'auto', max_iters=40)
    assert its(d) == [20, 30, 40] and train_iters(lm, d) == [0, 5, 10, 15, 20, 25, 30, 35, 39]   # the first run's last line, 19, is cut

def test_torchrun_rank0_holds_the_lock(lm, tmp_path):
    d = tmp_path/'ddp'
    tiny = ['--dataset', 'shakespeare_bytes', *lm.tiny_flags(vocab_size=256, max_iters=100_000, log_interval=1), '--no-plot', '--no-compile']
    ddp = lm.start('--standalone', '--nproc_per_node', 2, '-m', 'lm_basics.train', *tiny, '--checkpoint_dir', d, cwd=tmp_path, script='torchrun')
    try:
        ddp.wait_for(r'^Iter +1 ')
        holder = json.loads((d/'run.lock').read_text())
        assert holder['pid'] != ddp.pid and 'lm_basics' in holder['command']   # a rank's pid, not torchrun's
        lm.run(*tiny, '--checkpoint_dir', d, '--resume', 'auto', cwd=tmp_path).error(f"pid {holder['pid']}", 'in use by another run')
    finally:   # a scheduler's preemption: SIGTERM to every process of the job (torchrun forwards a second one to its workers)
        os.killpg(ddp.pid, signal.SIGTERM)
        r = ddp.finish()
    assert r.returncode != 0, r
    stop = re.search(r'^Stopped by SIGTERM after iteration (\d+); continue with --resume auto', r.stdout, re.M)
    assert stop and its(d)[-1] == int(stop[1]) and read_checkpoint(d/f'checkpoint_iter_{stop[1]}.pt')['iteration'] == int(stop[1]), r


# ---------------------------------------------------------------------------------------------------- 2-4. rewinds, copies, strays
@pytest.fixture(scope='module')
def finished(tmp_path_factory, corpus, lm):
    "A run to 40 with checkpoints every 10 (all kept), to copy and abuse."
    d = tmp_path_factory.mktemp('finished')/'run'
    lm.run(*flags(lm, corpus, max_iters=40, keep_last=10), '--checkpoint_dir', d, cwd=d.parent).ok()
    assert its(d) == [10, 20, 30, 40]
    return d

def test_rewind_is_refused_and_a_branch_keeps_history(lm, corpus, finished, tmp_path):
    d = shutil.copytree(finished, tmp_path/'rewind')
    before = lm.snapshot(d)
    rewind = lm.run(*flags(lm, corpus, max_iters=28, checkpoint_interval=5), '--resume_from', d/'checkpoint_iter_20.pt', cwd=tmp_path)
    rewind.error('checkpoint_iter_30.pt, checkpoint_iter_40.pt', '--checkpoint_dir NEW_DIR', 'iteration 20')
    assert lm.snapshot(d) == before, "a refused rewind changed the run directory"
    new = tmp_path/'branch'
    branch = lm.run(*flags(lm, corpus, max_iters=28, checkpoint_interval=5), '--resume_from', d/'checkpoint_iter_20.pt',
                    '--checkpoint_dir', new, cwd=tmp_path).ok()
    assert f"Resumed from {d/'checkpoint_iter_20.pt'} at iteration 20" in branch.stdout
    assert its(new) == [25, 28] and lm.snapshot(d) == before
    old, got = lm.read_metrics(d), lm.read_metrics(new)
    assert [r for r in got if r['iter'] < 20] == [r for r in old if r['iter'] < 20]   # the history up to the branch point
    assert train_iters(lm, new) == [0, 5, 10, 15, 20, 25, 27]
    info = json.loads((new/'run.json').read_text())
    assert info['parent'] == {'run_id': run_id(d), 'checkpoint': str((d/'checkpoint_iter_20.pt').resolve()), 'iteration': 20}
    assert info['run_id'] != run_id(d)

def test_resume_from_a_copy_writes_beside_the_copy(lm, corpus, finished, tmp_path):
    orig = shutil.copytree(finished, tmp_path/'runs'/'orig')
    (orig/'checkpoint_iter_30.pt').unlink(); (orig/'checkpoint_iter_40.pt').unlink()   # a run stopped after 20, still going on
    backup = tmp_path/'backup'; backup.mkdir(); shutil.copy(orig/'checkpoint_iter_20.pt', backup)
    before = lm.snapshot(orig)
    r = lm.run(*data_flags(corpus), '--resume_from', backup/'checkpoint_iter_20.pt', '--max_iters', 30, cwd=tmp_path).ok()
    assert lm.snapshot(orig) == before, "the run wrote into the directory recorded inside the checkpoint"
    assert its(backup) == [20, 30] and (backup/'metrics.jsonl').exists() and (backup/'run.json').exists()
    assert f"[CHECKPOINT] Saved checkpoint to {backup/'checkpoint_iter_30.pt'}" in r.stdout
    # the copy itself belongs to the run it came from: this run's pruning never deletes it
    lm.run('--resume', 'auto', '--checkpoint_dir', backup, '--max_iters', 70, '--keep_last', 1, cwd=tmp_path).ok()
    assert its(backup) == [20, 70]

def test_stray_checkpoint_file_is_never_counted_or_deleted(lm, corpus, finished, tmp_path):
    d = shutil.copytree(finished, tmp_path/'stray')
    stray = d/'checkpoint_iter_99999999.pt'; stray.write_bytes(random.Random(0).randbytes(5000))
    r = lm.run(*flags(lm, corpus, max_iters=50, keep_last=1), '--checkpoint_dir', d, '--resume', 'auto', cwd=tmp_path).ok()
    assert f"Resumed from {d/'checkpoint_iter_40.pt'} at iteration 40" in r.stdout
    assert its(d) == [50, 99999999] and stray.read_bytes() and read_checkpoint(d/'checkpoint_iter_50.pt')['iteration'] == 50


# ---------------------------------------------------------------------------------------------------- 5. data changed underneath
@pytest.mark.parametrize('how', ['truncated', 'rewritten in place'])
def test_data_file_changed_underneath(lm, corpus, tmp_path, how):
    train = shutil.copy(corpus.path('train', 'npy'), tmp_path/'train.npy')
    d = tmp_path/'run'
    p = lm.start(*flags(lm, corpus, max_iters=100_000, checkpoint_interval=100_000, log_interval=1), '--train_data_path', train,
                 '--checkpoint_dir', d, cwd=tmp_path)
    with killed_after(p):
        p.wait_for(r'^Iter +3 ')
        if how == 'truncated':
            with open(train, 'r+b') as f: f.truncate(1000)
        else:
            with open(train, 'r+b') as f: f.seek(200); f.write(bytes(5000))   # same size, same inode, new content
        r = p.finish()
    line = r.error(str(train), 'while the run was using it', '--resume auto')
    saved = re.findall(r'^\[CHECKPOINT\] Saved checkpoint to (\S+)$', r.stdout, re.M)
    assert len(saved) == 1, r
    ck = read_checkpoint(saved[0])
    assert ck['iteration'] >= 4 and Path(saved[0]).name == f"checkpoint_iter_{ck['iteration']}.pt"
    assert train_iters(lm, d)[-1] == ck['iteration'] - 1   # the records go up to the saved step


def test_data_file_changed_under_torchrun(lm, corpus, tmp_path):
    """Two "machines" (two torchrun launchers meeting through the c10d rendezvous), each with its own copy of the token
    file; one copy is truncated, so one process sees the change and the other cannot. They vote at every micro-batch,
    so both stop at the same one (neither left in an all-reduce with a peer that left), after saving the last completed
    step, each with one error line: the file it saw change, or that another process saw its copy change."""
    import socket
    with socket.socket() as sk: sk.bind(('127.0.0.1', 0)); port = sk.getsockname()[1]
    nodes = [tmp_path/'a', tmp_path/'b']
    for n in nodes: n.mkdir(); shutil.copy(corpus.path('train', 'npy'), n/'train.npy')
    d = tmp_path/'run'
    launch = ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv_backend', 'c10d', '--rdzv_endpoint', f'127.0.0.1:{port}',
              '--rdzv_id', 'data_changed', '-m', 'lm_basics.train',
              *flags(lm, corpus, max_iters=100_000, checkpoint_interval=100_000, log_interval=1), '--gradient_accumulation_steps', 2,
              '--train_data_path', 'train.npy', '--checkpoint_dir', d]   # each machine's own copy
    ps = [lm.start(*launch, cwd=n, script='torchrun') for n in nodes]
    try:
        while not any(re.search(r'^Iter +3 ', ''.join(p.out), re.M) for p in ps):   # rank 0 logs, on either machine
            assert all(p.p.poll() is None for p in ps), ps; time.sleep(0.05)
        with open(nodes[1]/'train.npy', 'r+b') as f: f.truncate(1000)
        t0 = time.monotonic()
        rs = [p.finish(timeout=300) for p in ps]   # a process left in an all-reduce would wait for gloo's 30-minute timeout
    finally:
        for p in ps:
            with killed_after(p): pass
    assert time.monotonic() - t0 < 240, rs   # seconds on an idle machine; generous for a busy one, far below gloo's timeout
    for r, n, what in zip(rs, nodes, ['changed (seen by another process of this run)', 'changed size']):
        assert r.returncode != 0 and 'Traceback' not in r.stdout, r
        errors = [l for l in r.stderr.splitlines() if l.startswith('error')]
        assert len(errors) == 1 and f'token file train.npy {what}' in errors[0] and '--resume auto' in errors[0], r
    saved = re.findall(r'^\[CHECKPOINT\] Saved checkpoint to (\S+)$', ''.join(rs[0].stdout + rs[1].stdout), re.M)
    assert len(saved) == 1, rs
    ck = read_checkpoint(saved[0])
    assert ck['iteration'] >= 4 and train_iters(lm, d)[-1] == ck['iteration'] - 1, rs

# ---------------------------------------------------------------------------------------------------- 8-9. signals
def test_signal_during_startup(lm, corpus, tmp_path):
    "Ctrl-C or SIGTERM while the tool is still starting (importing PyTorch takes seconds): one line, 128 + signal, nothing written."
    d = tmp_path/'run'
    for sig, code, word in ((signal.SIGINT, 130, 'SIGINT'), (signal.SIGTERM, 143, 'SIGTERM')):
        p = lm.start(*flags(lm, corpus, max_iters=20), '--checkpoint_dir', d, cwd=tmp_path, fork=False)   # exec'd: PyTorch imports
        while not catches(p.pid, signal.SIGTERM): time.sleep(0.005)   # the entry point's handlers are in place (Python
        p.signal(sig)                                                 # itself catches no SIGTERM); PyTorch is still importing
        r = p.finish()
        assert r.returncode == code and 'Traceback' not in r.stdout + r.stderr, r
        assert r.stderr.strip() == f'Stopped by {word} during start-up: nothing was trained or saved', r
        assert not d.exists()

def test_directory_without_a_checkpoint_holds_no_run(lm, corpus, tmp_path):
    "A run killed before its first checkpoint leaves run.json, config.json and metrics.jsonl: nothing to protect, so the same command runs."
    d = tmp_path/'run'
    args = flags(lm, corpus, max_iters=100_000, log_interval=1, checkpoint_interval=100_000)
    with killed_after(lm.start(*args, '--checkpoint_dir', d, cwd=tmp_path)) as p:
        p.wait_for(r'^Iter +0 ')
        p.signal(signal.SIGKILL); p.finish()
    assert {'run.json', 'config.json', 'metrics.jsonl'} <= {f.name for f in d.iterdir()} and not its(d)
    lm.run(*flags(lm, corpus, max_iters=10), '--checkpoint_dir', d, cwd=tmp_path).ok()
    assert its(d) == [10] and train_iters(lm, d) == [0, 5, 9]

def test_second_ctrl_c_while_saving(lm, corpus, tmp_path):
    "A model large enough that writing its checkpoint takes a while: the second Ctrl-C lands during the write."
    d = tmp_path/'big'
    big = ['--d_model', 512, '--num_heads', 8, '--d_ff', 2048, '--num_layers', 8, '--batch_size', 1, '--context_length', 32]
    p = lm.start(*flags(lm, corpus, max_iters=100_000, checkpoint_interval=2, log_interval=1, keep_last=1), *big, '--checkpoint_dir', d,
                 cwd=tmp_path)
    with killed_after(p): _second_ctrl_c(p, d)

def _second_ctrl_c(p, d):
    p.wait_for(r'^\[CHECKPOINT\] Saved checkpoint to \S+_2\.pt')
    good = (d/'checkpoint_iter_2.pt').read_bytes()
    p.signal(signal.SIGINT)
    p.wait_for(r'^Received SIGINT')
    deadline = time.monotonic() + 120
    while not list(d.glob('.checkpoint_iter_*.tmp-*')):   # the save after the stop has begun writing
        assert time.monotonic() < deadline and p.p.poll() is None, p
        time.sleep(0.005)
    p.signal(signal.SIGINT)
    r = p.finish()
    assert r.returncode == 130 and 'Traceback' not in r.stdout + r.stderr, r
    assert 'Interrupted twice' in r.stderr and 'free disk space' not in r.stderr, r
    assert not list(d.glob('.checkpoint_iter_*')), "a temporary file was left behind"
    newest = max(its(d))
    assert read_checkpoint(d/f'checkpoint_iter_{newest}.pt')['iteration'] == newest
    if newest == 2: assert (d/'checkpoint_iter_2.pt').read_bytes() == good


# ---------------------------------------------------------------------------------------------------- 10. tokenizers
def test_sample_needs_a_tokenizer_and_the_run_keeps_its_own(lm, corpus, tmp_path):
    r = lm.run(*flags(lm, corpus), '--vocab_size', 300, '--sample_tokens', 20, '--checkpoint_dir', tmp_path/'x', cwd=tmp_path)
    # token files with no tokenizer.json beside them, and not bytes (vocab_size 300): no text to show
    r.error('--sample_tokens needs the tokenizer of the training data', 'lm_basics_prepare')
    assert not (tmp_path/'x').exists() and 'Iter' not in r.stdout
    from lm_basics.data import shakespeare_plays
    text = tmp_path/'text'; text.mkdir()
    for n, t in list(shakespeare_plays().items())[:4]: (text/f'{n}.txt').write_text(t)
    prep = lambda v, *a: subprocess.run([str(Path(sys.executable).parent/'lm_basics_prepare'), str(text), '--out', str(tmp_path/'data'),
                                         '--vocab_size', str(v), '--no-progress', *a], capture_output=True, text=True, timeout=300)
    assert prep(400).returncode == 0
    data = ['--train_data_path', tmp_path/'data'/'train.npy', '--val_data_path', tmp_path/'data'/'val.npy', '--vocab_size', 400]
    run = lm.run(*data, *lm.tiny_flags(), '--no-plot', '--no-compile', '--checkpoint_dir', tmp_path/'run', '--sample_tokens', 20, cwd=tmp_path).ok()
    kept = tmp_path/'run'/'tokenizer.json'
    assert kept.read_bytes() == (tmp_path/'data'/'tokenizer.json').read_bytes()
    assert re.search(r'\| Val bpb: [\d.]+$', run.stdout, re.M), run   # bits per byte, from the tokenizer's byte lengths
    assert prep(300, '--force').returncode == 0                           # the data is prepared again, with a smaller vocabulary
    gen = subprocess.run([str(Path(sys.executable).parent/'lm_basics_generate'), '--checkpoint', str(tmp_path/'run'), '--prompt', 'KING',
                          '--max_new_tokens', '5', '--seed', '0', '--device', 'cpu'], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and str(kept) in gen.stderr, gen.stderr      # the run's own tokenizer, not the new one
    again = lm.run(*data, '--resume', 'auto', '--checkpoint_dir', tmp_path/'run', '--max_iters', 30, cwd=tmp_path)
    again.error('the data was prepared again', str(kept))


# ---------------------------------------------------------------------------------------------------- 12. training in chunks
@pytest.mark.parametrize('recipe', [[], ['--optimizer', 'muon', '--lr_schedule', 'wsd', '--qk_norm', '--activation', 'relu2']],
                         ids=['adamw-cosine', 'muon-wsd'])
def test_training_in_chunks_is_one_run(lm, corpus, tmp_path, recipe):
    """A run planned for 30 iterations (its schedule ending at min_lr at 30), trained as 10 + 10 + 10 in three jobs, is the
    uninterrupted run, bit for bit, with the same records (each chunk's last step, off the log interval, is logged and
    then cut when the next chunk continues): with AdamW and cosine, and with Muon and warmup-stable-decay (whose state and schedule
    a checkpoint must carry just as exactly)."""
    plan = [*flags(lm, corpus, lr=3e-3, min_lr=3e-4, warmup_iters=3, log_interval=4, eval_interval=5, checkpoint_interval=5, keep_last=10), *recipe]
    one, chunks = tmp_path/'one', tmp_path/'chunks'
    with ThreadPoolExecutor(2) as ex:
        whole = ex.submit(lambda: lm.run(*plan, '--max_iters', 30, '--checkpoint_dir', one, cwd=tmp_path).ok())
        for n in (10, 20, 30):
            lm.run(*plan, '--max_iters', n, '--lr_decay_iters', 30, '--checkpoint_dir', chunks, '--resume', 'auto', cwd=tmp_path).ok()
        whole.result()
    a, b = read_checkpoint(one/'checkpoint_iter_30.pt'), read_checkpoint(chunks/'checkpoint_iter_30.pt')
    for k, v in a['model_state_dict'].items(): assert torch.equal(v, b['model_state_dict'][k]), k
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ('time',) and 'tokens_per_sec' not in k and 'iter_time' not in k and 'mfu' not in k}
                          for r in recs]
    assert strip(lm.read_metrics(chunks)) == strip(lm.read_metrics(one))
    # without --lr_decay_iters the first chunk would have decayed to min_lr by iteration 10: a different run
    lrs = {r['iter']: r['train/learning_rate'] for r in lm.read_metrics(chunks) if 'train/learning_rate' in r}
    assert lrs[8] > 2e-3 and lrs[29] < (4e-4 if not recipe else 1e-3)   # cosine is near min_lr at 29; WSD's 1-sqrt decay ends at 30
    if recipe:   # Muon's momentum buffers and AdamW's moments, each as the uninterrupted run left them
        a_opt, b_opt = a['optimizer_state_dict'], b['optimizer_state_dict']
        assert [g.get('muon') for g in a_opt['param_groups']].count(True) == 1, a_opt['param_groups']
        assert a_opt['state'].keys() == b_opt['state'].keys() and any('momentum_buffer' in st for st in a_opt['state'].values())
        for i, st in a_opt['state'].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor): assert torch.equal(v, b_opt['state'][i][k]), (i, k)


def test_muon_without_weight_decay_is_said_in_the_log_once(lm, corpus, tmp_path):
    """Muon with `--muon_weight_decay 0` is a valid choice that the recipes chapter's study found to do worse:
    the run says so in one line at its start and trains; with the default decay it says nothing of the kind."""
    muon = [*flags(lm, corpus), '--optimizer', 'muon', '--lr_schedule', 'wsd', '--max_iters', 2]
    undecayed = lm.run(*muon, '--muon_weight_decay', 0, '--checkpoint_dir', tmp_path/'a', cwd=tmp_path).ok()
    notes = [l for l in undecayed.stdout.splitlines() if l.startswith('Note: muon_weight_decay 0')]
    assert len(notes) == 1 and 'validated worse than AdamW' in notes[0], undecayed.stdout
    decayed = lm.run(*muon, '--checkpoint_dir', tmp_path/'b', cwd=tmp_path).ok()
    assert 'Note:' not in decayed.stdout and read_checkpoint(tmp_path/'b'/'checkpoint_iter_2.pt')['config']['muon_weight_decay'] == 0.1


# ---------------------------------------------------------------------------------------------------- 11. lm_basics_prepare
@pytest.fixture(scope='module')
def plays_dir(tmp_path_factory):
    from lm_basics.data import shakespeare_plays
    d = tmp_path_factory.mktemp('plays')
    for n, t in shakespeare_plays().items(): (d/f'{n}.txt').write_text(t)
    return d

def _prepare(lm, *args, cwd): return lm.start(*args, '--no-progress', cwd=cwd, script='lm_basics_prepare')

@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_prepare_stopped_cleanly(lm, plays_dir, tmp_path, sig):
    "Ctrl-C or SIGTERM while preparing: one line, exit 128 + signal, and nothing left in the output directory."
    out = tmp_path/'data'
    p = _prepare(lm, plays_dir, '--out', out, '--vocab_size', 2000, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list(out.glob('.prepare-*')) if out.exists() else True:   # the signal comes the instant the temporary directory
        assert time.monotonic() < deadline and p.p.poll() is None, p  # appears (a window that once left it behind)
    p.signal(sig)
    r = p.finish()
    assert r.returncode == 128 + sig and 'Traceback' not in r.stdout + r.stderr, r
    assert r.stderr.strip() == f'Interrupted by {signal.Signals(sig).name}: stopped; nothing half-written was kept', r
    assert not out.exists(), sorted(out.iterdir())

def test_prepare_after_a_kill_cleans_up(lm, plays_dir, tmp_path):
    "A SIGKILL leaves the temporary directory behind; the next run into the same --out removes it and succeeds."
    out = tmp_path/'data'
    p = _prepare(lm, plays_dir, '--out', out, '--vocab_size', 2000, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (out.exists() and list(out.glob('.prepare-*'))):
        assert time.monotonic() < deadline and p.p.poll() is None, p
        time.sleep(0.01)
    p.signal(signal.SIGKILL); p.finish()
    left = list(out.glob('.prepare-*'))
    assert left, "the kill left nothing to clean up: the test proves nothing"
    r = _prepare(lm, plays_dir, '--out', out, '--vocab_size', 400, cwd=tmp_path).finish()
    assert r.returncode == 0, r
    assert not list(out.glob('.prepare-*')) and (out/'train.npy').exists()

def test_two_prepares_into_one_directory(lm, plays_dir, tmp_path):
    """Two lm_basics_prepare jobs into the same --out at once (vocabularies 2000 and 400, say): the second is refused at
    once, naming the first's pid, and the first's files are what the directory holds; after it, --force replaces them.
    (Without the lock both wrote, the later replacing the earlier's finished files one by one, or mixing them.)"""
    out = tmp_path/'data'
    first = _prepare(lm, plays_dir, '--out', out, '--vocab_size', 2000, cwd=tmp_path)
    with killed_after(first):
        deadline = time.monotonic() + 120
        while not (out.exists() and list(out.glob('.prepare-*'))):   # it holds the directory
            assert time.monotonic() < deadline and first.p.poll() is None, first
            time.sleep(0.01)
        second = _prepare(lm, plays_dir, '--out', out, '--vocab_size', 400, cwd=tmp_path).finish()
        second.error(str(out), 'being written by another lm_basics_prepare', f'pid {first.pid}', 'another --out')
        assert first.finish().returncode == 0, first
    assert json.loads((out/'meta.json').read_text())['vocab_size'] == 2000 and not list(out.glob('.prepare-*'))
    _prepare(lm, plays_dir, '--out', out, '--vocab_size', 400, cwd=tmp_path).finish().error('already holds prepared data', '--force')
    assert _prepare(lm, plays_dir, '--out', out, '--vocab_size', 400, '--force', cwd=tmp_path).finish().returncode == 0
    assert json.loads((out/'meta.json').read_text())['vocab_size'] == 400

def test_prepare_text_without_whitespace(lm, tmp_path):
    "4 MB with no whitespace at all (one 'word' per file, as for base64 or DNA) trains and encodes in bounded time, losslessly."
    import random, string
    text = ''.join(random.Random(0).choices(string.ascii_letters + string.digits, k=4_000_000))
    (tmp_path/'blob.txt').write_text(text)
    t = time.monotonic()
    r = _prepare(lm, tmp_path/'blob.txt', '--out', tmp_path/'data', '--vocab_size', 1000, cwd=tmp_path).finish(timeout=600)
    assert r.returncode == 0, r
    print(f"4 MB without whitespace prepared in {time.monotonic() - t:.0f} s")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path/'data'/'tokenizer.json'))
    ids = np.load(tmp_path/'data'/'train.npy').tolist() + np.load(tmp_path/'data'/'val.npy').tolist()
    assert tok.decode(ids, skip_special_tokens=False) == text + '<|endoftext|>'
