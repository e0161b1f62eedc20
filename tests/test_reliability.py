"""Reliability of `lm_basics_train`, proved on real processes.

Every test here runs the installed `lm_basics_train` command (the suite's runner, `lm.run` / `lm.start`) on the suite's
corpus (the Shakespeare plays as UTF-8 bytes, split by play) with the suite's tiny model, and then kills it, signals
it, fills its disk, or resumes it and compares tensors. Bad input (exit 2, one `error:` line, nothing touched) is
`test_bad_input.py`.

| guarantee | test |
|---|---|
| a run stopped (max_iters, SIGTERM, SIGINT) and resumed ends bit-identical to an uninterrupted one | `test_resume_is_bit_identical`, `test_preempted_run_resumes_bit_identical` |
| a resumed run's metrics have no duplicated or missing iterations | `test_resume_keeps_train_metrics_identical`, `test_preempted_run_resumes_with_identical_metrics`, `test_extended_run_has_identical_metrics` |
| `--resume auto` starts fresh in an empty directory; rerunning a finished job changes nothing | `test_resume_auto_on_empty_dir_starts_fresh`, `test_rerun_after_completion_does_not_retrain`, `test_rerun_after_completion_keeps_metrics` |
| another architecture (or optimizer) on resume is refused, naming each key; training-only changes are logged | `test_bad_input.py` (`resume-*-with-other-*`), `test_training_only_change_on_resume_is_logged` |
| SIGKILL at any moment never leaves a broken checkpoint; temporary files are never resumed from and are cleaned up; `--resume auto` completes with the uninterrupted run's weights | `test_sigkill_chaos` |
| `--keep_last N` keeps the newest N, `--keep_every M` the multiples of M, never fewer than one | `test_keep_last_and_keep_every`, `test_bad_input.py` (`keep_last-zero`) |
| a full disk or unwritable directory at save time is a clear error; older checkpoints intact | `test_checkpoint_save_failure_is_a_clear_error`, `test_disk_full_while_logging_is_a_clear_error` |
| SIGTERM/SIGINT finish the step, save, say where, flush metrics, exit 128+signum; a second SIGINT exits at once | `test_preemption_saves_and_exits`, `test_second_sigint_exits_at_once` |
| losing the console (closed pipe) does not lose the run | `test_closed_console_does_not_lose_the_run` |
| a non-finite loss/gradient stops before the weights change, naming the iteration and last checkpoint; or is skipped K times; without the per-step check it is caught before saving | `test_nonfinite_loss_stops_cleanly`, `test_skip_nonfinite_skips_then_stops`, `test_nonfinite_without_the_per_step_check_is_caught_before_saving` |
| a checkpoint that would run code is refused and the code never runs | `test_bad_input.py` (`resume-checkpoint-that-runs-code[...]`, three pickle formats) |
"""
from __future__ import annotations
import json, random, re, shutil, signal, subprocess, time
from pathlib import Path
import pytest
import torch
from lm_basics.checkpoint import read_checkpoint, list_checkpoints

N = 60  # iterations of the reference run
K = 24  # where the short run stops

def flags(lm, corpus, **over) -> list:
    """The suite's tiny run (`lm.tiny_flags`) with this file's settings: lr == min_lr makes the schedule (after warmup)
    independent of max_iters, so a run stopped early and extended is the same computation as one run to the end; a log
    line every step; no loss plot; never compiled (left unset, the trainer compiles a run long enough to repay it, and a
    compiled run rounds differently from an eager one of another length). `over` changes settings (None leaves one out)."""
    mine = dict(vocab_size=256, lr=1e-3, min_lr=1e-3, log_interval=1, seed=7)
    return ['--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'),
            *lm.tiny_flags(**{**mine, **over}), '--no-plot', '--no-compile']

# ------------------------------------------------------------------------------------- files, states, metrics

def checkpoints(d) -> dict[int, Path]: return {it: p for it, p in list_checkpoints(d)}
def temp_files(d) -> list[Path]: return sorted(Path(d).glob('.checkpoint_iter_*.tmp-*'))

def _flatten(x, prefix=''):
    if isinstance(x, dict):
        for k, v in x.items(): yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x): yield from _flatten(v, f"{prefix}{i}.")
    else: yield prefix.rstrip('.'), x

def assert_states_identical(a:dict, b:dict, what:str):
    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    assert fa.keys() == fb.keys(), f"{what}: different keys {sorted(fa.keys() ^ fb.keys())[:10]}"
    for k in fa:
        va, vb = fa[k], fb[k]
        if torch.is_tensor(va):
            assert torch.is_tensor(vb) and va.dtype == vb.dtype and va.shape == vb.shape and torch.equal(va, vb), \
                f"{what}: tensor {k} differs (max abs diff {(va.double() - vb.double()).abs().max().item() if va.shape == vb.shape else 'shape'})"
        else: assert va == vb, f"{what}: {k} differs: {va!r} != {vb!r}"

def assert_same_weights(ckpt_a:Path, ckpt_b:Path):
    a, b = read_checkpoint(ckpt_a), read_checkpoint(ckpt_b)
    assert a['iteration'] == b['iteration']
    assert_states_identical(a['model_state_dict'], b['model_state_dict'], 'model_state_dict')
    assert_states_identical(a['optimizer_state_dict'], b['optimizer_state_dict'], 'optimizer_state_dict')

_DETERMINISTIC = re.compile(r'loss|perplexity|learning_rate|grad_norm|skipped')
def metric_records(d, lm) -> list[tuple]:
    "(iter, kind, deterministic values) of every record in `d/metrics.jsonl`; timings are left out."
    out = []
    for r in lm.read_metrics(d):
        kind = sorted({k.split('/')[0] for k in r if '/' in k})
        out.append((r['iter'], '+'.join(kind), tuple(sorted((k, v) for k, v in r.items() if _DETERMINISTIC.search(k)))))
    return out

def kinds(records): return [(it, kind) for it, kind, _ in records]
def train_records(records): return [r for r in records if r[1] == 'train']

def missing_and_extra(a, b):
    ka, kb = kinds(a), kinds(b)
    dup = sorted({x for x in kb if kb.count(x) > 1})
    return dict(missing=[x for x in ka if x not in kb], extra=[x for x in kb if x not in ka], duplicated=dup)

def copy_run(src:Path, dst:Path) -> Path:
    shutil.copytree(src, dst); return dst

# -------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def base(lm, corpus) -> list:
    "Data, model and training settings shared by the resume tests (eval every step, checkpoint every 4)."
    return flags(lm, corpus, max_iters=None, eval_interval=1, checkpoint_interval=4, keep_last=2, keep_every=20)

@pytest.fixture(scope='module')
def baseline(tmp_path_factory, base, lm) -> dict:
    """Two runs side by side: the uninterrupted reference to N (started with --resume auto in an empty directory), and
    the same run stopped by max_iters at K, a pristine directory that tests copy before touching."""
    ref, short = tmp_path_factory.mktemp('reference')/'run', tmp_path_factory.mktemp('short')/'run'
    p_ref, _ = lm.in_parallel(lambda a: lm.run(*a, cwd=ref.parent).ok(),
                              [[*base, '--max_iters', N, '--checkpoint_dir', ref, '--resume', 'auto'],
                               [*base, '--max_iters', K, '--checkpoint_dir', short]])
    return dict(reference=dict(dir=ref, proc=p_ref, final=ref/f'checkpoint_iter_{N}.pt', records=metric_records(ref, lm)), short=short)

@pytest.fixture(scope='module')
def reference(baseline) -> dict: return baseline['reference']

@pytest.fixture(scope='module')
def short_run(baseline) -> Path: return baseline['short']

@pytest.fixture(scope='module')
def continued(tmp_path_factory, short_run, reference, base, lm) -> dict:
    """Four commands on copies of the short run and of the reference, two at a time:
    the short run continued to N with --resume_from checkpoint_iter_K.pt and with --resume auto; the reference job's exact
    command run again (in a copy of its directory, under its own path: the reference is put back afterwards); and the
    short run continued to 32 with training settings changed."""
    root = tmp_path_factory.mktemp('continued')
    d1, d2, d3 = copy_run(short_run, root/'resume_from'), copy_run(short_run, root/'auto'), copy_run(short_run, root/'changed')
    ref = reference['dir']
    backup = copy_run(ref, root/'reference_backup')
    before = lm.snapshot(ref)
    cmds = {'resume_from': [*base, '--max_iters', N, '--checkpoint_dir', d1, '--resume_from', d1/f'checkpoint_iter_{K}.pt'],
            'auto': [*base, '--max_iters', N, '--checkpoint_dir', d2, '--resume', 'auto'],
            'rerun': [*base, '--max_iters', N, '--checkpoint_dir', ref, '--resume', 'auto'],
            'changed': [*base, '--max_iters', 32, '--checkpoint_dir', d3, '--resume', 'auto', '--lr', '2e-3',
                        '--eval_interval', '8', '--checkpoint_interval', '8']}
    runs = dict(zip(cmds, lm.in_parallel(lambda a: lm.run(*a, cwd=root), list(cmds.values()))))
    after = lm.snapshot(ref)
    rerun = dict(run=runs['rerun'], before=before, after=after,
                 metrics=dict(before=(backup/'metrics.jsonl').read_text(), after=(ref/'metrics.jsonl').read_text()))
    shutil.rmtree(ref); shutil.copytree(backup, ref)   # the other tests compare against the untouched reference
    return {'resume_from': (d1, runs['resume_from'].ok()), 'auto': (d2, runs['auto'].ok()), 'rerun': rerun, 'changed': (d3, runs['changed'])}

@pytest.fixture(scope='module')
def extended(continued) -> dict: return {k: continued[k] for k in ('resume_from', 'auto')}

@pytest.fixture(scope='module')
def rerun(continued) -> dict: return continued['rerun']

# ----------------------------------------------------------------------------------------- 1. exact resume

@pytest.mark.parametrize('how', ['resume_from', 'auto'])
def test_resume_is_bit_identical(extended, reference, how):
    "Stopped at K and resumed to N, every tensor of the model and optimizer equals the uninterrupted run's."
    d, p = extended[how]
    assert f"Resumed from {d/f'checkpoint_iter_{K}.pt'} at iteration {K}" in p.stdout, p
    assert_same_weights(reference['final'], d/f'checkpoint_iter_{N}.pt')

@pytest.mark.parametrize('how', ['resume_from', 'auto'])
def test_resume_keeps_train_metrics_identical(extended, reference, how, lm):
    "The resumed run's training records: every iteration once, with the uninterrupted run's losses."
    d, _ = extended[how]
    got, want = metric_records(d, lm), reference['records']
    assert [r[0] for r in train_records(got)] == list(range(N))
    assert train_records(got) == train_records(want)

def test_extended_run_has_identical_metrics(extended, reference, lm):
    "Extending a finished run with a larger --max_iters gives the same (iter, kind) records as one run to N."
    d, _ = extended['resume_from']
    got, want = metric_records(d, lm), reference['records']
    assert kinds(got) == kinds(want), missing_and_extra(want, got)
    assert got == want

# --------------------------------------------------------------------------------- 2. resume auto, rerun

def test_resume_auto_on_empty_dir_starts_fresh(reference):
    p = reference['proc']
    assert re.search(r"No checkpoint in .*: starting a new run", p.stdout), p
    assert 'Resumed from' not in p.stdout
    assert reference['records'][0][:2] == (0, 'eval') and read_checkpoint(reference['final'])['iteration'] == N

def test_rerun_after_completion_does_not_retrain(rerun):
    "Rerunning a finished job: exit 0, no training step, no new checkpoint, every checkpoint byte-identical."
    p = rerun['run'].ok()
    assert f"at iteration {N}" in p.stdout, p
    assert not re.search(r'^Iter ', p.stdout, re.M), "the rerun trained again"
    assert '[CHECKPOINT]' not in p.stdout, "the rerun saved a checkpoint again"
    ck = lambda s: {k: v for k, v in s.items() if Path(k).name.endswith('.pt')}
    assert ck(rerun['after']) == ck(rerun['before'])
    assert rerun['metrics']['after'].startswith(rerun['metrics']['before']), "the rerun lost metrics records"

def test_rerun_after_completion_keeps_metrics(rerun):
    before, after = rerun['metrics']['before'], rerun['metrics']['after']
    assert after == before, f"metrics.jsonl gained {after[len(before):]!r} when the finished job was rerun"

# ------------------------------------------------------------------------------ 3. settings changed on resume

def test_training_only_change_on_resume_is_logged(continued):
    d, p = continued['changed']
    p.ok()
    for change in (f"max_iters: {K} -> 32", "lr: 0.001 -> 0.002", "eval_interval: 1 -> 8", "checkpoint_interval: 4 -> 8"):
        assert f"Resume: {change}" in p.stdout, p
    assert read_checkpoint(d/'checkpoint_iter_32.pt')['config']['lr'] == 2e-3

# -------------------------------------------------------------------------------------- 4. SIGKILL chaos

CHAOS_LANES, KILLS_PER_LANE = 2, 8   # 16 kills in all, two processes at a time

@pytest.mark.slow
def test_sigkill_chaos(tmp_path, corpus, lm):
    """Kill processes that checkpoint every step at random (seeded) moments; after every kill each checkpoint file
    loads, temporary files are never taken for checkpoints, and --resume auto finally completes with the weights
    and metrics of an uninterrupted run."""
    def args(d, max_iters): return [*flags(lm, corpus, eval_interval=3, checkpoint_interval=1, keep_last=2, max_iters=max_iters),
                                    '--checkpoint_dir', d, '--resume', 'auto']
    def lane(i):
        rng, d, temp_seen, resumed, sure = random.Random(20240611 + i), tmp_path/f'chaos{i}', 0, [], 0
        saved = False   # a checkpoint is certainly on disk (a life saw the line of step 1, which comes after checkpoint 1)
        for life in range(KILLS_PER_LANE):
            latest = max(checkpoints(d), default=None)
            saved = saved or latest is not None
            p = lm.start(*args(d, 100_000), cwd=tmp_path)
            if rng.random() < 0.2: time.sleep(rng.uniform(0, 4.0))  # anywhere, start-up included
            else:   # during one of the first steps of this life, or the evaluation or checkpoint write after it
                n = rng.randrange(4)
                p.wait_for(rf'^Iter +{(latest or 0) + n} ')
                time.sleep(rng.uniform(0, 0.3))
                sure += saved                     # this life resumed for certain: it got as far as training
                saved = saved or n >= 1
            p.signal(signal.SIGKILL); r = p.finish()
            where = f"lane {i}, life {life}"
            assert r.returncode == -signal.SIGKILL, f"{where} ended by itself\n{r!r}"
            if m := re.search(r'Resumed from (\S+) at iteration (\d+)', r.stdout):
                resumed.append(int(m.group(2)))
                assert int(m.group(2)) == latest, f"{where} resumed from {m.group(1)}, the newest checkpoint was {latest}"
            elif re.search(r'^Starting training', r.stdout, re.M): assert latest is None, f"{where} started afresh despite {latest}"
            found = {int(p.name[len('checkpoint_iter_'):-3]): p for p in d.glob('checkpoint_iter_*.pt')}
            for it, path in found.items():
                ck = read_checkpoint(path)  # raises LMBasicsError if a checkpoint is incomplete
                assert ck['iteration'] == it, where
                assert all(torch.isfinite(v).all() for v in ck['model_state_dict'].values()), where
            if latest is not None: assert found, f"after the kill of {where} no checkpoint is left"
            assert len(found) <= 3, f"--keep_last 2 but {sorted(found)} after the kill of {where}"
            temp_seen += len(temp_files(d))
        assert len(resumed) >= sure, f"lane {i}: {len(resumed)} resumes, but {sure} lives got as far as training after a checkpoint"
        return dict(dir=d, resumed=resumed, temp_seen=temp_seen, sure=sure)
    lanes = lm.in_parallel(lane, range(CHAOS_LANES), workers=CHAOS_LANES)
    assert sum(r['sure'] for r in lanes) >= CHAOS_LANES * KILLS_PER_LANE // 2, "the seeds give too few lives that resume: pick others"

    final = max(max(checkpoints(r['dir'])) for r in lanes) + 8
    for r in lanes:  # a decoy: a temporary file with a higher iteration than any checkpoint must never be resumed from
        (r['dir']/'.checkpoint_iter_99999.pt.tmp-4242').write_bytes(b'half a checkpoint')
        r['latest'] = max(checkpoints(r['dir']))
    ref = tmp_path/'uninterrupted'
    *finals, _ = lm.in_parallel(lambda a: lm.run(*a, cwd=tmp_path).ok(), [*[args(r['dir'], final) for r in lanes],
        [*flags(lm, corpus, eval_interval=3, checkpoint_interval=1000, max_iters=final), '--checkpoint_dir', ref]], workers=3)
    for r, p in zip(lanes, finals):
        d = r['dir']
        assert f"at iteration {r['latest']}" in p.stdout and f"max_iters: 100000 -> {final}" in p.stdout, p
        assert not temp_files(d), f"temporary files left: {temp_files(d)}"
        assert max(checkpoints(d)) == final
        assert_same_weights(ref/f'checkpoint_iter_{final}.pt', d/f'checkpoint_iter_{final}.pt')
        assert metric_records(d, lm) == metric_records(ref, lm), missing_and_extra(metric_records(ref, lm), metric_records(d, lm))
    print(f"chaos: {CHAOS_LANES * KILLS_PER_LANE} kills, {sum(len(r['resumed']) for r in lanes)} resumes, "
          f"{sum(r['temp_seen'] for r in lanes)} temporary files seen right after kills, final iteration {final}")

# ------------------------------------------------------------------------------------------- 5. pruning

def test_resume_prunes_what_a_killed_run_left(lm, corpus, tmp_path):
    """A run killed between saving a checkpoint and pruning the oldest leaves one too many; killed there life after life
    (test_sigkill_chaos met it on a loaded machine: four checkpoints with --keep_last 2) they would pile up. A resumed
    run prunes its own checkpoints to --keep_last before it trains, so there are never more than keep_last + 1."""
    d = tmp_path/'run'
    lm.run(*flags(lm, corpus, max_iters=6, checkpoint_interval=1, keep_last=10), '--checkpoint_dir', d, cwd=tmp_path).ok()
    assert sorted(checkpoints(d)) == [1, 2, 3, 4, 5, 6]
    p = lm.start(*flags(lm, corpus, max_iters=100_000, checkpoint_interval=1000, keep_last=2), '--checkpoint_dir', d,
                 '--resume', 'auto', cwd=tmp_path)
    p.wait_for(r'^Iter +6 ')   # training, far from its next checkpoint
    p.signal(signal.SIGKILL); p.finish()
    assert sorted(checkpoints(d)) == [5, 6]


def test_keep_last_and_keep_every(reference, extended, preempted):
    "checkpoint every 4 to 60 with --keep_last 2 --keep_every 20 keeps 20, 40 (milestones) and 56, 60 (newest)."
    assert sorted(checkpoints(reference['dir'])) == [20, 40, 56, 60]
    assert sorted(checkpoints(extended['auto'][0])) == [20, 40, 56, 60]
    for name in SIGNALS:  # --keep_last 1 --keep_every 0: only the newest survives, at the stop and at the end
        assert preempted[name]['at_stop']['ckpts'] == [preempted[name]['stop']]
        assert sorted(checkpoints(preempted[name]['dir'])) == [N]

# ---------------------------------------------------------------------------- 6. save fails: disk, permissions


@pytest.mark.parametrize('how', ['read-only directory', 'full disk'])
def test_checkpoint_save_failure_is_a_clear_error(tmp_path, short_run, base, lm, how):
    "Resuming in a directory where the next checkpoint cannot be written: one clear error, exit 2, old checkpoints intact."
    mounted = None
    if how == 'full disk':
        ck_size = (short_run/f'checkpoint_iter_{K}.pt').stat().st_size
        used = sum(-(-p.stat().st_size // 4096) * 4096 for p in short_run.iterdir())
        lm.mount_small_tmpfs(tmp_path/'small', used + ck_size // 2 + 16384)
        mounted = tmp_path/'small'
        d = copy_run(short_run, mounted/'run')
    else:
        lm.need_unprivileged()
        d = copy_run(short_run, tmp_path/'run')
        d.chmod(0o555)
    try:
        before = {p.name: p.read_bytes() for p in d.glob('checkpoint_iter_*.pt')}
        p = lm.run(*base, '--max_iters', N, '--checkpoint_dir', d, '--resume', 'auto', cwd=tmp_path, unprivileged=how != 'full disk')
        if how == 'full disk': p.error('cannot save checkpoint', f'checkpoint_iter_{K + 4}.pt', 'free disk space')
        else:   # a directory that cannot be written is found before training starts, not at the first checkpoint
            p.error('cannot write', str(d), 'Permission denied', 'writable --checkpoint_dir')
            assert not re.search(r'^Iter ', p.stdout, re.M), p
        after = {p.name: p.read_bytes() for p in d.glob('checkpoint_iter_*.pt')}
        assert after == before, "an existing checkpoint changed or disappeared"
        assert read_checkpoint(d/f'checkpoint_iter_{K}.pt')['iteration'] == K
        assert not temp_files(d)
    finally:
        d.chmod(0o755)
        if mounted is not None: subprocess.run(['umount', '-l', str(mounted)])

def test_disk_full_while_logging_is_a_clear_error(tmp_path, base, lm):
    mnt = tmp_path/'tiny'
    lm.mount_small_tmpfs(mnt, 12 * 1024)
    try:
        p = lm.run(*base, '--max_iters', 400, '--checkpoint_interval', 1000, '--checkpoint_dir', mnt/'run', cwd=tmp_path)
        p.error('No space left')
    finally: subprocess.run(['umount', '-l', str(mnt)])

def test_disk_full_while_preparing_is_a_clear_error(tmp_path, lm):
    "lm_basics_prepare onto a full disk: one clear error, exit 2, and nothing left behind, not even the directory it made."
    from lm_basics.data import shakespeare_plays
    texts = tmp_path/'texts'; texts.mkdir()
    for n, t in list(shakespeare_plays().items())[:6]: (texts/f'{n}.txt').write_text(t)   # about 0.7 MB of text
    mnt = tmp_path/'tiny'
    lm.mount_small_tmpfs(mnt, 256 * 1024)   # its token files alone need about 0.75 MB
    try:
        r = lm.run(texts, '--out', mnt/'data', '--vocab_size', 512, '--no-progress', cwd=tmp_path, script='lm_basics_prepare')
        r.error('cannot write the prepared data', str(mnt/'data'), 'No space left', 'free disk space', 'nothing was kept')
        assert list(mnt.iterdir()) == []
    finally: subprocess.run(['umount', '-l', str(mnt)])

# ------------------------------------------------------------------------------------------- 7. preemption

SIGNALS = ['SIGTERM', 'SIGINT']

@pytest.fixture(scope='module')
def preempted(tmp_path_factory, base, lm) -> dict:
    "For each signal: a run to N signalled after step 5 (--keep_last 1), then the same command again."
    def one(name):
        d = tmp_path_factory.mktemp(name.lower())/'run'
        args = [*base, '--max_iters', N, '--checkpoint_dir', d, '--resume', 'auto', '--keep_last', '1', '--keep_every', '0']
        p = lm.start(*args, cwd=d.parent)
        p.wait_for(r'^Iter +5 ')
        p.signal(getattr(signal, name)); first = p.finish()
        m = re.search(r'Stopped by \w+ after iteration (\d+)', first.stdout)
        found = checkpoints(d)
        at_stop = dict(ckpts=sorted(found), metrics=(d/'metrics.jsonl').read_bytes(),
                       ckpt=read_checkpoint(found[max(found)]) if found else None)
        return dict(dir=d, first=first, stop=int(m.group(1)) if m else None, at_stop=at_stop, resumed=lm.run(*args, cwd=d.parent))
    return dict(zip(SIGNALS, lm.in_parallel(one, SIGNALS)))

@pytest.mark.parametrize('name', SIGNALS)
def test_preemption_saves_and_exits(preempted, name):
    "The signalled process finishes its step, saves at that iteration, says where, flushes metrics, exits 128+signum."
    r = preempted[name]
    p, stop = r['first'], r['stop']
    assert p.returncode == 128 + getattr(signal, name), p
    assert 'Traceback' not in p.stdout + p.stderr and not p.stderr.strip(), p
    assert stop is not None and 5 < stop < N, p
    path = r['dir']/f'checkpoint_iter_{stop}.pt'
    assert f"Saved checkpoint to {path}" in p.stdout, p
    assert r['at_stop']['ckpts'] == [stop]
    ck = r['at_stop']['ckpt']
    assert ck['iteration'] == stop
    assert ck['train_state']['metrics_bytes'] == len(r['at_stop']['metrics']), "metrics.jsonl not flushed up to the checkpoint"
    recs = [json.loads(l) for l in r['at_stop']['metrics'].decode().splitlines()]
    assert [x['iter'] for x in recs if 'train/loss' in x] == list(range(stop)), "metrics.jsonl lacks steps before the stop"

@pytest.mark.parametrize('name', SIGNALS)
def test_preempted_run_resumes_bit_identical(preempted, reference, name, lm):
    r = preempted[name]
    p = r['resumed'].ok()
    stop = r['stop']
    assert f"Resumed from {r['dir']/f'checkpoint_iter_{stop}.pt'} at iteration {stop}" in p.stdout, p
    assert_same_weights(reference['final'], r['dir']/f'checkpoint_iter_{N}.pt')
    assert train_records(metric_records(r['dir'], lm)) == train_records(reference['records'])

@pytest.mark.parametrize('name', SIGNALS)
def test_preempted_run_resumes_with_identical_metrics(preempted, reference, name, lm):
    r = preempted[name]
    got, want = metric_records(r['dir'], lm), reference['records']
    assert kinds(got) == kinds(want), missing_and_extra(want, got)
    assert got == want

def test_ctrl_c_inside_a_long_step_stops_within_a_micro_batch(tmp_path, corpus, lm):
    """A Ctrl-C inside a step of 3000 micro-batches (seconds even on a fast CPU): the step is abandoned at the next
    micro-batch, iteration 0 (the last completed step) is saved, and the run exits 130 without waiting for the step.
    (A second Ctrl-C while that checkpoint is written: `test_second_ctrl_c_while_saving` in test_run_dir.py.)"""
    d = tmp_path/'run'
    p = lm.start(*flags(lm, corpus, gradient_accumulation_steps=3000, eval_interval=1000, checkpoint_interval=1000, max_iters=1000),
                 '--checkpoint_dir', d, cwd=tmp_path)
    p.wait_for(r'^\[EVAL\] iter +0 ')
    time.sleep(1.5)                                   # step 0 is in progress: it takes far longer than this
    t0 = time.monotonic(); p.signal(signal.SIGINT); r = p.finish()
    assert r.returncode == 130 and 'Traceback' not in r.stdout + r.stderr, r
    assert 'Stopped by SIGINT after iteration 0' in r.stdout and not re.search(r'^Iter ', r.stdout, re.M), r
    assert time.monotonic() - t0 < 60, "the Ctrl-C waited for the step to finish"
    assert list(checkpoints(d)) == [0] and not temp_files(d)
    for line in (d/'metrics.jsonl').read_text().splitlines(): json.loads(line)  # complete lines only

def test_closed_console_does_not_lose_the_run(tmp_path, corpus, lm):
    "The reader of stdout goes away mid-run: the run still ends with a checkpoint, and without a traceback."
    d = tmp_path/'run'
    args = [*flags(lm, corpus, eval_interval=10, checkpoint_interval=100, max_iters=20), '--checkpoint_dir', d]
    p = subprocess.Popen([*lm.command(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, stdin=subprocess.DEVNULL)
    for line in p.stdout:
        if line.startswith('Starting training'): break
    p.stdout.close()
    err = p.stderr.read(); p.wait(300)
    assert 'Traceback' not in err, err[-2000:]
    assert checkpoints(d), f"exit {p.returncode} and no checkpoint saved\n{err[-2000:]}"

# ------------------------------------------------------------------------------------------- 8. non-finite

@pytest.fixture(scope='module')
def nonfinite(tmp_path_factory, corpus, lm) -> dict:
    """An absurd learning rate (the loss diverges within a few steps), a checkpoint every step, three ways: checked every
    step (the default on the CPU), unchecked (--no-check_finite), and skipping up to 3 non-finite steps."""
    root = tmp_path_factory.mktemp('nonfinite')
    def absurd(name, *extra):
        return [*flags(lm, corpus, lr=1e4, min_lr=0, warmup_iters=0, eval_interval=1000, checkpoint_interval=1, max_iters=40),
                '--checkpoint_dir', root/name, *extra]
    cmds = {'checked': absurd('checked', '--keep_last', 100),
            'unchecked': absurd('unchecked', '--no-check_finite', '--log_interval', 1000, '--keep_last', 100),
            'skipping': absurd('skipping', '--skip_nonfinite', 3, '--keep_last', 10)}
    runs = lm.in_parallel(lambda a: lm.run(*a, cwd=root), list(cmds.values()))
    return {k: (root/k, r) for k, r in zip(cmds, runs)}

def test_nonfinite_loss_stops_cleanly(nonfinite):
    d, p = nonfinite['checked']
    line = p.error('non-finite', 'last good checkpoint')
    it = int(re.search(r'at iteration (\d+)', line).group(1))
    last = max(checkpoints(d))
    assert last == it and str(d/f'checkpoint_iter_{last}.pt') in line, line
    ck = read_checkpoint(d/f'checkpoint_iter_{last}.pt')
    assert all(torch.isfinite(v).all() for v in ck['model_state_dict'].values())
    assert all(torch.isfinite(t).all() for _, t in _flatten(ck['optimizer_state_dict']) if torch.is_tensor(t))

def test_skip_nonfinite_skips_then_stops(nonfinite):
    (d, p), k = nonfinite['skipping'], 3
    line = p.error('non-finite')
    skipped = [int(i) for i in re.findall(r'at iteration (\d+): step skipped', p.stdout)]
    stop = int(re.search(r'at iteration (\d+)', line).group(1))
    assert len(skipped) == k and skipped == list(range(stop - k, stop)), p
    # the checkpoints saved after skipped steps hold the weights and optimizer state from before the first skip
    first = read_checkpoint(d/f'checkpoint_iter_{skipped[0]}.pt')
    for it in range(skipped[0] + 1, stop + 1):
        ck = read_checkpoint(d/f'checkpoint_iter_{it}.pt')
        assert_states_identical(first['model_state_dict'], ck['model_state_dict'], f'model at {it}')
        assert_states_identical(first['optimizer_state_dict']['state'], ck['optimizer_state_dict']['state'], f'optimizer at {it}')
    assert all(torch.isfinite(v).all() for v in first['model_state_dict'].values())

def test_nonfinite_without_the_per_step_check_is_caught_before_saving(nonfinite):
    # --no-check_finite: no device sync per step; a non-finite step is found at the next log line or checkpoint
    # (here: a checkpoint every step), and nothing trained after it is saved (combined with --skip_nonfinite it is a
    # bad input: test_bad_input.py, skip-nonfinite-without-check)
    (checked, c), (unchecked, p) = nonfinite['checked'], nonfinite['unchecked']
    bad = int(re.search(r'at iteration (\d+)', c.error('non-finite')).group(1))   # the per-step check: step `bad` was not taken
    line = p.error('non-finite', f'before iteration {bad + 1}', 'last good checkpoint')
    assert str(unchecked/f'checkpoint_iter_{bad}.pt') in line, line
    # step `bad` was taken (poisoning the weights), but the checkpoint after it was refused: the saved ones are the
    # same as those of the run that checked every step
    assert sorted(checkpoints(unchecked)) == sorted(checkpoints(checked)) == list(range(1, bad + 1))
    for c in checkpoints(unchecked):
        assert_states_identical(read_checkpoint(checked/f'checkpoint_iter_{c}.pt')['model_state_dict'],
                                read_checkpoint(unchecked/f'checkpoint_iter_{c}.pt')['model_state_dict'], f'model at {c}')
