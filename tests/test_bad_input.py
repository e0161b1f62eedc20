"""Every bad input a user can give `lm_basics_train` is answered the same way, by a real process: exit status 2, exactly
one stderr line `error: ...` that names the problem, no traceback, no training line (`Iter`, `[EVAL]`, `[CHECKPOINT]`),
every file that was there before byte-for-byte, mode- and mtime-for-mtime the same (a finished run, the data, the inputs
of the case), and the fresh `--checkpoint_dir` of the command never created.

The table below is the one list of bad inputs; each row is one `lm_basics_train` process (two run at a time). The
defaults of every row are a valid tiny run on the Shakespeare bytes into a fresh directory; the row's arguments replace
the defaults' flags for the same settings (a setting given twice on one command line is itself refused). A real out-of-memory that the up-front memory estimate cannot foresee (the address space
of the process limited with RLIMIT_AS) is answered the same way, at the iteration where it happens.

What the notebooks test in-process (every rule of `validate`, `load_config_file`, `read_checkpoint`, `open_tokens`,
`check_model_args`) is tested here once more only as a user meets it: through the command line, in a real process.
"""
from __future__ import annotations
import os, pickle, random, re, resource, shutil
from pathlib import Path
import numpy as np
import pytest
import torch


@pytest.fixture(scope='module')
def existing(byte_run) -> Path:
    "A finished run (the suite's `byte_run`: checkpoints at 10 and 20, metrics.jsonl, config.json, run.json) that bad commands must leave alone."
    assert {p.name for p in byte_run.iterdir()} >= {'checkpoint_iter_10.pt', 'checkpoint_iter_20.pt', 'metrics.jsonl', 'config.json', 'run.json'}
    return byte_run


# ---------------------------------------------------------------------------------------------------- building the inputs
def data(corpus, train=None, val=None) -> list:
    return ['--train_data_path', train or corpus.path('train', 'npy'), '--val_data_path', val or corpus.path('val', 'npy')]

def write(path:Path, content) -> Path:
    if isinstance(content, np.ndarray): np.save(path, content)
    elif isinstance(content, bytes): path.write_bytes(content)
    else: path.write_text(content)
    return path

def unreadable(t, corpus) -> Path:
    p = shutil.copy(corpus.path('val', 'npy'), t/'locked.npy'); os.chmod(p, 0); return Path(p)

def id_past_vocab(t, corpus) -> Path:
    ids = np.load(corpus.path('val', 'npy')).copy(); ids[1234] = 300
    return write(t/'big_id.npy', ids)

def cut(src:Path, dst:Path, keep) -> Path:
    b = src.read_bytes(); dst.write_bytes(b[:keep(len(b))]); return dst

def foreign(t) -> Path:
    torch.save({'state_dict': {'w': torch.zeros(3)}, 'epoch': 3}, t/'foreign.pt'); return t/'foreign.pt'

def configless(t, existing) -> Path:
    "A checkpoint of the finished run without its `config` (as older trainers wrote them)."
    from lm_basics.checkpoint import read_checkpoint
    ck = read_checkpoint(existing/'checkpoint_iter_20.pt'); ck.pop('config'); torch.save(ck, t/'old.pt'); return t/'old.pt'

class Payload:
    "Unpickling this creates a file: it stands for any code a malicious checkpoint could run."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, 'w'))

def code_running(t, fmt:str) -> Path:
    """A .pt file (`torch.save`, or a bare pickle of protocol 2 or 5) whose unpickling would create t/PWNED. Proven first:
    the same payload, unpickled without `weights_only`, does run (else the case would prove nothing)."""
    def save(obj, path):
        if fmt == 'torch.save': torch.save(obj, path)
        else: path.write_bytes(pickle.dumps(obj, protocol=int(fmt[-1])))
        return path
    sample = save({'x': Payload(t/'proof')}, t/'sample.pt')
    if fmt == 'torch.save': torch.load(sample, weights_only=False)
    else: pickle.loads(sample.read_bytes())
    assert (t/'proof').exists(), f"{fmt}: the payload does not run when unpickled unsafely"
    (t/'proof').unlink(); sample.unlink()
    return save({'model_state_dict': {'w': torch.zeros(2)}, 'iteration': 1, 'config': {}, 'x': Payload(t/'PWNED')}, t/'evil.pt')

def text_file(t, corpus, name:str) -> Path:
    "The validation plays as plain text, under a token file's name."
    return write(t/name, np.load(corpus.path('val', 'npy')).astype(np.uint8).tobytes().decode('utf-8'))

def renamed(src:Path, dst:Path) -> Path: return Path(shutil.copy(src, dst))

def npz_named_npy(t) -> Path:
    np.savez(t/'arch.npz', ids=np.arange(1000, dtype=np.uint16)); return Path(os.replace(t/'arch.npz', t/'arch.npy') or t/'arch.npy')

def raw_ids(t, corpus, split:str, dtype:str, meta:str|None=None) -> Path:
    "The corpus's ids as a raw file of `dtype` (an even count), in its own directory with an optional meta.json stating `meta`."
    d = t/f'{split}_{dtype}'; d.mkdir(exist_ok=True)
    if meta: write(d/'meta.json', f'{{"dtype": "{meta}", "vocab_size": 256}}')
    ids = np.load(corpus.path(split, 'npy'))
    return write(d/f'{split}.bin', ids[:len(ids) // 2 * 2].astype(dtype).tobytes())

NO_SUCH_DEVICE = 'cuda:99' if torch.cuda.is_available() else 'cuda'   # `cuda` on a machine without a GPU


# ---------------------------------------------------------------------------------------------------- the table
# id -> (t, corpus, existing) -> (arguments after the defaults, what the error line must contain[, options])
# options: drop (default flags left out, so a config file can set them), unprivileged (run subject to file permissions),
# absent (what the error line must not say: misleading advice)
R = re.compile
CASES = {
    # data files
    'data-missing':             lambda t, c, e: (data(c, train=t/'nope.npy'), ['nope.npy', 'not found']),
    'data-is-a-directory':      lambda t, c, e: (data(c, train=(t/'dir.npy').mkdir() or t/'dir.npy'), ['dir.npy', 'directory']),
    'data-unreadable':          lambda t, c, e: (data(c, val=unreadable(t, c)), ['locked.npy', 'not readable'], dict(unprivileged=True)),
    'data-float-npy':           lambda t, c, e: (data(c, train=write(t/'float.npy', np.arange(1000, dtype=np.float32))), ['float.npy', 'float32', 'integer']),
    'data-npy-garbage':         lambda t, c, e: (data(c, train=write(t/'junk.npy', b'not a numpy file' * 10)), ['junk.npy', 'not a valid .npy']),
    'data-raw-odd-byte-count':  lambda t, c, e: (data(c, val=write(t/'odd.ids', b'\x01\x00' * 500 + b'\x01')), ['odd.ids', '1001 bytes', 'multiple']),
    'data-empty-raw':           lambda t, c, e: (data(c, train=write(t/'empty.bin', b'')), ['empty.bin', 'empty']),
    'data-empty-npy':           lambda t, c, e: (data(c, val=write(t/'empty.npy', np.zeros(0, np.uint16))), ['empty.npy', 'empty']),
    'data-token-id-past-vocab': lambda t, c, e: (data(c, val=id_past_vocab(t, c)), ['big_id.npy', '300', R(r'vocab_size (is )?256'), R(r'1,?234')]),
    'data-text-as-bin':         lambda t, c, e: (data(c, train=text_file(t, c, 'plays.bin')), ['plays.bin', 'holds text', 'lm_basics_prepare']),
    'data-text-as-txt':         lambda t, c, e: (data(c, val=text_file(t, c, 'plays.txt')), ['plays.txt', 'holds text', 'lm_basics_prepare']),
    'data-text-as-npy':         lambda t, c, e: (data(c, val=text_file(t, c, 'plays.npy')), ['plays.npy', 'holds text', 'lm_basics_prepare']),
    'data-npy-renamed-bin':     lambda t, c, e: (data(c, train=renamed(c.path('train', 'npy'), t/'train.bin')), ['train.bin', '.npy header', 'rename it to train.npy']),
    'data-npz-named-npy':       lambda t, c, e: (data(c, val=npz_named_npy(t)), ['arch.npy', 'zip archive', '.npz'], dict(absent=['allow_pickle'])),
    'data-random-bytes-npy':    lambda t, c, e: (data(c, train=write(t/'rand.npy', b'\x00' + random.Random(0).randbytes(5000))), ['rand.npy', 'not a valid .npy token file'],
                                                 dict(absent=['allow_pickle', 'pickle'])),
    'data-truncated-npy':       lambda t, c, e: (data(c, val=cut(c.path('val', 'npy'), t/'cut.npy', lambda n: n - 1001)), ['cut.npy', 'truncated', 'prepare it again']),
    'data-uint16-read-as-uint32': lambda t, c, e: (['--data_dtype', 'uint32', *data(c, train=raw_ids(t, c, 'train', 'uint16'), val=raw_ids(t, c, 'val', 'uint16'))],
                                                   ['train.bin', 'far past vocab_size 256', 'is --data_dtype uint32 right'], dict(absent=['or more (the largest'])),
    'data-wrong-dtype-meta-json': lambda t, c, e: (['--data_dtype', 'uint32', *data(c, train=raw_ids(t, c, 'train', 'uint16', 'uint16'), val=raw_ids(t, c, 'val', 'uint16'))],
                                                   ['train.bin', 'meta.json says uint16']),
    'data-uint32-read-as-uint16': lambda t, c, e: (data(c, train=raw_ids(t, c, 'train', 'uint32'), val=raw_ids(t, c, 'val', 'uint32')),
                                                   ['train.bin', 'every second token id is 0', '--data_dtype uint32']),
    'data-shorter-than-context': lambda t, c, e: (data(c, val=write(t/'short.npy', np.arange(20, dtype=np.uint16))), ['short.npy', '20 tokens', 'context_length 32']),
    # flags
    'flag-unknown':             lambda t, c, e: (['--d_modle', '64'], ['--d_modle']),
    'flag-wrong-type':          lambda t, c, e: (['--d_model', 'wide'], ['d_model', "'wide'", 'int']),
    'heads-not-dividing-d_model': lambda t, c, e: (['--num_heads', '3'], ['num_heads (3)', 'd_model (32)']),
    'size-zero':                lambda t, c, e: (['--num_layers', '0'], ['num_layers', 'positive']),
    'vocab-too-large-for-memory': lambda t, c, e: (['--vocab_size', '2147483647'], ['this model and batch need about', 'GiB', 'free',
                                                    '--batch_size', '--context_length', 'model size']),
    'lr-negative':              lambda t, c, e: (['--lr', '-0.001'], ['lr must', '-0.001']),
    'warmup-longer-than-run':   lambda t, c, e: (['--warmup_iters', '50'], ['warmup_iters (50)', 'max_iters (20)']),
    'beta2-not-below-1':        lambda t, c, e: (['--beta2', '1.0'], ['beta2', '1.0']),
    'eps-inf':                  lambda t, c, e: (['--eps', 'inf'], ['eps must be a finite number', 'inf']),
    'rope_theta-inf':           lambda t, c, e: (['--rope_theta', 'inf'], ['rope_theta must be a finite number', 'inf']),
    'seed-negative':            lambda t, c, e: (['--seed', '-1'], ['seed must lie in [0, 2**32 - 1]', '-1']),
    'seed-past-32-bits':        lambda t, c, e: (['--seed', '4294967296'], ['seed must lie in', 'got 4294967296']),
    'keep_last-zero':           lambda t, c, e: (['--keep_last', '0'], ['keep_last', 'positive']),
    'activation-unknown':       lambda t, c, e: (['--activation', 'gelu'], ['activation must be swiglu or relu2', "'gelu'"]),
    'optimizer-unknown':        lambda t, c, e: (['--optimizer', 'sgd'], ['optimizer must be adamw or muon', "'sgd'"]),
    'lr_schedule-unknown':      lambda t, c, e: (['--lr_schedule', 'step'], ['lr_schedule must be one of cosine, wsd, linear', "'step'"]),
    'muon-with-fsdp':           lambda t, c, e: (['--optimizer', 'muon', '--fsdp'], ['--optimizer muon needs whole matrices', '--fsdp']),
    'fsdp-without-torchrun':    lambda t, c, e: (['--fsdp'], ['error: --fsdp shards the model across processes', 'launch with torchrun']),
    'skip-nonfinite-without-check': lambda t, c, e: (['--no-check_finite', '--skip_nonfinite', '2'], ['--skip_nonfinite needs the check before every update']),
    # settings that would do nothing, named with what makes them so
    'dataset-with-data-paths':  lambda t, c, e: (['--dataset', 'shakespeare_bytes'], ['--dataset', '--train_data_path', 'do nothing']),
    **{f'muon-setting-without-muon[{k}]': (lambda k: lambda t, c, e: ([f'--{k}', '0.02'], [f'--{k}', "optimizer (the default) = 'adamw'", '--optimizer muon']))(k)
       for k in ('muon_lr', 'muon_momentum', 'muon_weight_decay')},
    'decay_frac-without-wsd':   lambda t, c, e: (['--decay_frac', '0.3'], ['--decay_frac', "lr_schedule (the default) = 'cosine'", '--lr_schedule wsd']),
    'checkpoint_dir-empty':     lambda t, c, e: (['--checkpoint_dir', ''], ['checkpoint_dir is empty']),
    'resume-muon-setting-on-adamw-checkpoint': lambda t, c, e: (['--checkpoint_dir', e, '--resume', 'auto', '--max_iters', '40', '--muon_lr', '0.02'],
                                                                ['--muon_lr', 'checkpoint_iter_20.pt', "'adamw'"]),
    # numbers no run could finish with, or that would overflow
    'total_batch_size-2**70':   lambda t, c, e: (['--total_batch_size', str(2**70)], ['total_batch_size 1,180,591,620,717,411,303,424 is too large']),
    'total_batch_size-2**40':   lambda t, c, e: (['--total_batch_size', str(2**40)], ['total_batch_size 1,099,511,627,776', 'micro-steps', 'lower --total_batch_size'],
                                                 dict(absent=['out of memory', '--batch_size'])),
    'total_batch_size-2**31':   lambda t, c, e: (['--total_batch_size', str(2**31)], ['total_batch_size 2,147,483,648', 'micro-steps', 'lower --total_batch_size']),
    'gradient_accumulation_steps-2**24': lambda t, c, e: (['--gradient_accumulation_steps', '16777216'], ['gradient_accumulation_steps 16,777,216 is too large', '65,536']),
    'eval_iters-2**31':         lambda t, c, e: (['--eval_iters', str(2**31)], ['eval_iters 2,147,483,648 is too large', '65,536']),
    'device-unavailable':       lambda t, c, e: (['--device', NO_SUCH_DEVICE], [f"'{NO_SUCH_DEVICE}'", 'not available']),
    # config files
    'config-unknown-key':       lambda t, c, e: (['--config', write(t/'bad.json', '{"d_modle": 32}')], ['bad.json', "'d_modle'", 'd_model']),
    'config-malformed-json':    lambda t, c, e: (['--config', write(t/'bad.json', '{"d_model": 32,\n')], ['bad.json', 'JSON', 'line 2']),
    'config-wrong-type':        lambda t, c, e: (['--config', write(t/'bad.json', '{"batch_size": "sixteen"}')], ['bad.json', 'batch_size', "'sixteen'"]),
    'config-duplicate-key':     lambda t, c, e: (['--config', write(t/'bad.json', '{"d_model": 64, "d_model": 128}')], ['bad.json', "'d_model'", 'appears more than once']),
    'config-is-a-directory':    lambda t, c, e: (['--config', (t/'configs').mkdir() or t/'configs'], ['configs', 'is a directory']),
    'config-nested-100000-deep': lambda t, c, e: (['--config', write(t/'deep.json', '{"wandb_tags": ' + '[' * 100_000 + ']' * 100_000 + '}')], ['deep.json', 'too deeply']),
    'config-5000-digit-number': lambda t, c, e: (['--config', write(t/'big.json', '{"seed": 1' + '0' * 5000 + '}')], ['big.json', 'cannot read']),
    'config-path-of-no-such-user': lambda t, c, e: (['--config', write(t/'home.json', '{"checkpoint_dir": "~no_such_user_lmb/run"}')], ['home.json', 'no such user']),
    'config-d_model-too-large': lambda t, c, e: (['--config', write(t/'bad.json', '{"d_model": 1e20}')], ['d_model', 'too large'], dict(drop=['d_model'])),
    # checkpoints
    'resume-missing-checkpoint': lambda t, c, e: (['--checkpoint_dir', e, '--resume_from', e/'checkpoint_iter_999.pt'], ['checkpoint_iter_999.pt', 'not found']),
    'resume-truncated-checkpoint': lambda t, c, e: (['--resume_from', cut(e/'checkpoint_iter_20.pt', t/'trunc.pt', lambda n: n // 2)], ['trunc.pt', 'checkpoint']),
    'resume-empty-checkpoint':  lambda t, c, e: (['--resume_from', write(t/'empty.pt', b'')], ['empty.pt']),
    'resume-garbage-checkpoint': lambda t, c, e: (['--resume_from', write(t/'garbage.pt', random.Random(0).randbytes(5000))], ['garbage.pt', 'checkpoint']),
    'resume-foreign-checkpoint': lambda t, c, e: (['--resume_from', foreign(t)], ['foreign.pt', 'not an lm_basics checkpoint']),
    'resume-configless-checkpoint-other-weights': lambda t, c, e: (['--resume_from', configless(t, e), '--d_model', '64', '--max_iters', '40'], ['fit']),
    **{f'resume-checkpoint-that-runs-code[{fmt}]': (lambda fmt: lambda t, c, e: (['--resume_from', code_running(t, fmt)],
                                                                                 [str(t/'evil.pt'), 'refusing', 'code']))(fmt)
       for fmt in ('torch.save', 'pickle protocol 2', 'pickle protocol 5')},
    'resume-from-with-other-architecture': lambda t, c, e: (['--checkpoint_dir', e, '--resume_from', e/'checkpoint_iter_20.pt', '--d_model', '64', '--num_layers', '2'],
                                                           ['architecture', R(r'd_model: 32 .*64'), R(r'num_layers: 1 .*2')]),
    'resume-auto-with-other-architecture': lambda t, c, e: (['--checkpoint_dir', e, '--resume', 'auto', '--max_iters', '40', '--d_model', '64', '--num_layers', '2'],
                                                           ['architecture', R(r'd_model: 32 .*64'), R(r'num_layers: 1 .*2')]),
    'resume-with-other-optimizer': lambda t, c, e: (['--checkpoint_dir', e, '--resume', 'auto', '--max_iters', '40', '--optimizer', 'muon'],
                                                   ['--optimizer muon', 'holds the state of adamw']),
    'fresh-run-in-a-used-checkpoint-dir': lambda t, c, e: (['--checkpoint_dir', e], [str(e), 'already holds a run', '--resume auto']),
}

# A real out-of-memory: the process may map 1.5 GiB (PyTorch and the trainer start in about 0.8), the model is tiny and its
# evaluation (no activations kept) fits, but a training step of 32 layers keeps about 2 GiB of activations for the
# backward pass. The up-front estimate compares that with the machine's free memory, which RLIMIT_AS does not lower, so
# it lets the run start, and the allocation fails inside the first step.
OOM_LIMIT = 1536 << 20
OOM_FLAGS = dict(d_model=4, num_heads=2, d_ff=256, num_layers=32, batch_size=400, max_iters=3, eval_iters=1, warmup_iters=0)

OOM_CASES = {'out-of-memory': [], 'out-of-memory-no-compile': ['--no-compile']}

def limit_address_space():   # runs in the child between fork and exec: no imports, no allocation worth the name
    resource.setrlimit(resource.RLIMIT_AS, (OOM_LIMIT, OOM_LIMIT))


@pytest.fixture(scope='module')
def answers(tmp_path_factory, corpus, existing, lm) -> dict:
    "Every case of the table (and the out-of-memory run) as a real process, two at a time: the run and the files before and after."
    root = tmp_path_factory.mktemp('bad')
    def one(cid):
        t = root/re.sub(r'\W+', '_', cid); inputs = t/'inputs'; inputs.mkdir(parents=True)
        fresh = t/'fresh_run'
        if cid in OOM_CASES:
            return dict(run=lm.run(*data(corpus), *lm.tiny_flags(vocab_size=256, **OOM_FLAGS), '--no-plot', *OOM_CASES[cid],
                                   '--checkpoint_dir', fresh, cwd=t, preexec=limit_address_space), dir=fresh)
        args, needles, *opts = CASES[cid](inputs, corpus, existing)
        opts = opts[0] if opts else {}
        if opts.get('unprivileged') and not lm.can_drop_file_permissions(): return None
        argv = lm.merge_flags([*data(corpus), *lm.tiny_flags(vocab_size=256, **{k: None for k in opts.get('drop', ())}),
                               '--no-plot', '--checkpoint_dir', fresh, *args])   # the row's settings replace the defaults'
        before = lm.snapshot(t, existing, corpus.dir)
        run = lm.run(*argv, cwd=t, unprivileged=opts.get('unprivileged', False))
        return dict(run=run, needles=needles, absent=opts.get('absent', ()), before=before, after=lm.snapshot(t, existing, corpus.dir),
                    fresh=fresh.exists(), inputs=inputs)
    ids = [*OOM_CASES, *CASES]   # the slowest first
    return dict(zip(ids, lm.in_parallel(one, ids)))


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_clear_line(case, answers, lm):
    a = answers[case]
    if a is None: lm.need_unprivileged()
    run = a['run']
    line = run.error(*a['needles'])   # exit 2, exactly one stderr line 'error: ...' holding the needles, no traceback
    for n in a['absent']: assert n not in line, f"{n!r} in {line!r}"
    assert not re.search(r'^(Iter|\[EVAL\]|\[CHECKPOINT\])', run.stdout, re.M), run
    assert a['after'] == a['before'], f"files changed by a refused run: {lm.changes(a['before'], a['after'])}\n{run!r}"
    assert not a['fresh'], f"the fresh --checkpoint_dir was created\n{run!r}"
    if case.startswith('resume-checkpoint-that-runs-code'): assert not (a['inputs']/'PWNED').exists(), "loading the checkpoint ran its code"


@pytest.mark.parametrize('case', list(OOM_CASES))
def test_out_of_memory_in_the_first_steps_is_one_clear_line(case, answers):
    """An allocation that fails in the first training step (the trainer's own loop with --no-compile; by default the
    eager step it times first, to decide whether to compile): one line naming the iteration and what to lower, exit 2."""
    run = answers[case]['run']
    line = run.error('out of memory', 'at iteration 0' if 'no-compile' in case else 'timed to decide whether to compile',
                     '--batch_size', '--gradient_accumulation_steps', '--context_length', 'model size')
    assert 'this model and batch need' not in line, "the up-front estimate refused the run: the test no longer reaches a real out-of-memory"
    assert not re.search(r'^(Iter|\[CHECKPOINT\])', run.stdout, re.M), run
