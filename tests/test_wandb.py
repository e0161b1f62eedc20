"""A W&B run, offline (`WANDB_MODE=offline`, no account), checked from what W&B itself wrote: the run's `.wandb`
transaction log under CHECKPOINT_DIR/wandb/offline-run-*/, decoded record by record (protobuf `Record`s in the
LevelDB log format), not from lm_basics' own console or metrics."""
import json, math
import pytest

EXPECTED_KEYS = ('train/loss', 'train/learning_rate', 'train/tokens_per_sec', 'train/iter_time_ms',
                 'eval/train_loss', 'eval/val_loss', 'eval/val_perplexity', 'final/train_loss', 'final/val_loss')

@pytest.fixture(scope='module')
def runs(tmp_path_factory, corpus, lm) -> dict:
    """Side by side: an offline W&B run (project, name, tags), and a run asking for online W&B without an API key."""
    cwd, bare = tmp_path_factory.mktemp('wandb_cwd'), tmp_path_factory.mktemp('no_login')
    data = ['--train_data_path', corpus.path('train', 'bin'), '--val_data_path', corpus.path('val', 'bin')]
    offline = (data + lm.tiny_flags(vocab_size=256) + ['--checkpoint_dir', cwd/'ck', '--use_wandb', '--wandb_project', 'P',
               '--wandb_run_name', 'N', '--wandb_tags', 'a,b'], cwd, None)
    # no WANDB_MODE=offline, no login, no key, no tty
    online = (data + lm.tiny_flags(vocab_size=256, max_iters=4) + ['--checkpoint_dir', bare/'run', '--use_wandb'], bare,
              dict(WANDB_MODE=None, WANDB_API_KEY=None, HOME=str(bare), NETRC=str(bare/'netrc'), WANDB_CONFIG_DIR=str(bare/'wandb_config')))
    first, second = lm.in_parallel(lambda c: lm.run(*c[0], cwd=c[1], env=c[2]), [offline, online])
    return dict(offline=(cwd, cwd/'ck', first), no_login=(bare, bare/'run', second))

@pytest.fixture(scope='module')
def wandb_run(runs, corpus, lm):
    cwd, ckdir, run = runs['offline']
    lm.check_training_run(run, checkpoint_dir=ckdir, train_tokens=corpus.n_train, val_tokens=corpus.n_val,
                          expect=dict(use_wandb=True, wandb_project='P', wandb_run_name='N', wandb_tags='a,b'))
    return cwd, ckdir

def test_offline_run_lives_in_the_checkpoint_dir(wandb_run, lm):
    cwd, ckdir = wandb_run
    runs = lm.offline_runs(ckdir)
    assert len(runs) == 1, runs
    assert len(list(runs[0].glob('run-*.wandb'))) == 1
    assert not (cwd/'wandb').exists(), "W&B wrote to the working directory instead of the checkpoint dir"

def test_name_project_tags_and_config(wandb_run, lm):
    from lm_basics.config import FIELDS
    w = lm.read_wandb_run(lm.offline_runs(wandb_run[1])[0])
    assert (w.project, w.name, w.tags) == ('P', 'N', ['a', 'b'])
    assert set(w.config) == set(FIELDS), set(w.config) ^ set(FIELDS)   # the full config, nothing else
    for k, v in dict(lm.TINY, vocab_size=256, use_wandb=True, wandb_project='P', wandb_run_name='N', wandb_tags=['a', 'b'],
                     checkpoint_dir=str(wandb_run[1]), seed=42, lr=6e-4, beta2=0.95).items():
        assert w.config[k] == v, (k, w.config[k], v)

def test_every_metric_at_its_iteration(wandb_run, lm):
    "Every quantity of both documents is logged, at the iteration it belongs to, with the value the run computed."
    w = lm.read_wandb_run(lm.offline_runs(wandb_run[1])[0])
    logged = {k for row in w.history for k in row if not k.startswith('_')}
    assert set(EXPECTED_KEYS) <= logged, set(EXPECTED_KEYS) - logged
    assert {k.split('/')[0] for k in logged} <= {'train', 'eval', 'final'}, logged   # one scheme of names
    by_step = {}
    for row in w.history: by_step.setdefault(row['_step'], {}).update(row)
    T = lm.TINY
    assert sorted(s for s, r in by_step.items() if 'train/loss' in r) == \
        sorted({i for i in range(T['max_iters']) if i % T['log_interval'] == 0} | {T['max_iters'] - 1})
    periodic = list(range(0, T['max_iters'], T['eval_interval']))
    assert sorted(s for s, r in by_step.items() if 'eval/val_loss' in r) in (periodic, periodic + [T['max_iters']])
    assert [s for s, r in by_step.items() if 'final/val_loss' in r] == [T['max_iters']]
    for s, r in by_step.items():
        if 'train/learning_rate' in r:
            assert r['train/learning_rate'] == pytest.approx(lm.cosine_lr(s, 6e-4, 6e-5, T['warmup_iters'], T['max_iters']), rel=1e-9, abs=1e-15)
        for p in ('eval', 'final'):
            if f'{p}/val_loss' in r: assert r[f'{p}/val_perplexity'] == pytest.approx(math.exp(r[f'{p}/val_loss']), rel=1e-9)
    # both sinks got the same numbers
    for rec in lm.read_metrics(wandb_run[1]/'metrics.jsonl'):
        for k, v in rec.items():
            if k not in ('iter', 'time'): assert by_step[rec['iter']][k] == pytest.approx(v, rel=1e-12), (rec['iter'], k)
    # the summary holds the final values
    for k in ('final/train_loss', 'final/val_loss'):
        assert w.summary[k] == pytest.approx(by_step[T['max_iters']][k], rel=1e-12)

def test_reader_reads_records_split_across_blocks(tmp_path, lm):
    "The .wandb reader itself: a record longer than a 32 KiB block is reassembled from FIRST/MIDDLE/LAST chunks."
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    rec = pb.Record(); item = rec.history.item.add(); item.key = 'x'; item.value_json = json.dumps('y' * 70000)
    body, small = rec.SerializeToString(), pb.Record()
    small.history.item.add(key='k', value_json='1')
    out, pos = bytearray(b':W&B' + struct.pack('<HB', 0xBEE1, 0)), 7
    def put(kind, chunk):
        out.extend(struct.pack('<IHB', 0, len(chunk), kind) + chunk)
    put(1, small.SerializeToString())
    rest, first = body, True
    while rest:
        left = 32768 - len(out) % 32768
        if left < 7: out.extend(b'\0' * left); continue
        chunk, rest = rest[:left - 7], rest[left - 7:]
        put((2 if first else 3) if rest else (1 if first else 4), chunk); first = False
    (tmp_path/'run-x.wandb').write_bytes(bytes(out))
    recs = lm.read_wandb_records(tmp_path/'run-x.wandb')
    assert [r.history.item[0].key for r in recs] == ['k', 'x']
    assert json.loads(recs[1].history.item[0].value_json) == 'y' * 70000

def test_no_wandb_login_is_one_clear_error(runs):
    "Online W&B without an API key (no WANDB_MODE=offline, no login, no tty) is a user mistake: one `error:` line."
    _, ckdir, run = runs['no_login']
    assert 'wandb' in run.error().lower(), run   # exit 2, exactly one `error:` line, no traceback
    # nothing left behind that would make the directory look like a run
    assert not (ckdir/'metrics.jsonl').exists() and not list(ckdir.glob('checkpoint_iter_*.pt')), sorted(ckdir.iterdir())


# ---------------------------------------------------------------------------------------------------- W&B that cannot start

def closed_port() -> int:
    "A local TCP port nobody listens on (just released)."
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

ONLINE = dict(WANDB_MODE='online', WANDB_API_KEY='x' * 40, no_proxy='*')   # a key: W&B itself would go on to its server
BAD_WANDB = {   # case -> (environment, flags, what the one error line must say)
    'server refuses': (dict(ONLINE, WANDB_BASE_URL='http://127.0.0.1:{port}'), [],
                       ['W&B cannot reach its server http://127.0.0.1:', 'Connection refused', 'WANDB_MODE=offline', 'wandb offline']),
    'no such server': (dict(ONLINE, WANDB_BASE_URL='https://wandb.invalid'), [],
                       ['W&B cannot reach its server https://wandb.invalid', 'WANDB_MODE=offline', 'wandb offline']),
    'mode misspelt': (dict(WANDB_MODE='ofline'), [], ["WANDB_MODE='ofline' is not valid for W&B", 'online, offline or disabled']),
    'project': ({}, ['--wandb_project', 'team/project'], ["--wandb_project 'team/project'", '/']),
    'tag too long': ({}, ['--wandb_tags', 'ok,' + 'x' * 65], ['--wandb_tags', 'has 65 characters; W&B takes 1 to 64']),
    'run name not UTF-8': ({}, ['--wandb_run_name', 'caf\udce9'], ['--wandb_run_name', 'not UTF-8']),   # a Latin-1 byte
}

@pytest.fixture(scope='module')
def bad_wandb_runs(tmp_path_factory, corpus, lm) -> dict:
    "A short run per case of BAD_WANDB, two at a time: (the run, its seconds, its run directory)."
    import time
    port = closed_port()
    data = ['--train_data_path', corpus.path('train', 'bin'), '--val_data_path', corpus.path('val', 'bin')]
    def one(case):
        env, flags, _ = BAD_WANDB[case]
        d = tmp_path_factory.mktemp('bad_wandb')
        env = {k: v.format(port=port) for k, v in env.items()} | dict(HOME=str(d), NETRC=str(d/'netrc'), WANDB_CONFIG_DIR=str(d/'cfg'))
        t0 = time.monotonic()
        r = lm.run(*data, *lm.tiny_flags(vocab_size=256, max_iters=4), '--checkpoint_dir', d/'run', '--use_wandb', *flags,
                   cwd=d, env=env, timeout=240)
        return r, time.monotonic() - t0, d/'run'
    return dict(zip(BAD_WANDB, lm.in_parallel(one, list(BAD_WANDB))))

@pytest.mark.parametrize('case', list(BAD_WANDB))
def test_wandb_that_cannot_start_is_one_line_naming_why(case, bad_wandb_runs):
    """An unreachable server is said within seconds (W&B alone waits 90 s, then blames the API key), with how to log
    offline; a setting W&B refuses is named (the flag, or the WANDB_* variable), not 'run wandb login'."""
    run, seconds, ckdir = bad_wandb_runs[case]
    line = run.error(*BAD_WANDB[case][2])
    assert 'wandb login' not in line, line
    assert seconds < 60, f"{case}: {seconds:.0f} s to fail"   # start-up and the model take a few; the probe at most 6
    assert not (ckdir/'metrics.jsonl').exists() and not list(ckdir.glob('checkpoint_iter_*.pt'))
