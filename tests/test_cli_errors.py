"""Every bad input a user can give `lm_basics_train` is answered the same way: exit status 2, exactly one stderr line
`error: ...` that names the problem, no traceback, and no file touched (existing checkpoints, metrics and data are
byte-for-byte and mtime-for-mtime the same afterwards, and nothing new is created)."""
import os, re
from pathlib import Path
import numpy as np
import pytest

@pytest.fixture(scope='module')
def existing(tmp_path_factory, corpus, lm) -> Path:
    "A finished run (checkpoints at 10 and 20, metrics.jsonl, config.json) that bad commands must leave alone."
    d = tmp_path_factory.mktemp('existing')/'run'
    lm.run('--train_data_path', corpus.path('train', 'npy'), '--val_data_path', corpus.path('val', 'npy'),
           *lm.tiny_flags(vocab_size=256), '--checkpoint_dir', d, cwd=d.parent).ok()
    assert {p.name for p in d.iterdir()} >= {'checkpoint_iter_10.pt', 'checkpoint_iter_20.pt', 'metrics.jsonl', 'config.json'}
    return d

# Each case: (tmp, corpus, existing, lm) -> (arguments after the defaults, what the message must name).
# The defaults are a valid tiny run in a fresh checkpoint_dir; later flags win.
def _no_such_device() -> str:
    "`cuda` on a machine without a GPU (like the 2-core CPU box this suite targets), else a GPU index that does not exist."
    import torch
    return 'cuda:99' if torch.cuda.is_available() else 'cuda'
NO_SUCH_DEVICE = _no_such_device()

def data(tmp, corpus, train=None, val=None):
    return ['--train_data_path', train or corpus.path('train', 'npy'), '--val_data_path', val or corpus.path('val', 'npy')]

def config_file(tmp, text):
    p = tmp/'bad.json'; p.write_text(text); return p

def corrupt_copy(src, dst, keep):
    b = Path(src).read_bytes(); Path(dst).write_bytes(b[:keep(len(b))]); return dst

class RunsCode:
    "A pickle that would create a file when unpickled without `weights_only`."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))

def _save_foreign(tmp):
    import torch
    p = tmp/'foreign.pt'
    torch.save({'state_dict': {'w': torch.zeros(3)}, 'epoch': 3}, p); return p

def _save_code(tmp):
    import torch
    p = tmp/'evil.pt'
    torch.save({'model_state_dict': RunsCode(tmp/'PWNED'), 'iteration': 1}, p); return p

def _too_large(tmp, corpus):
    ids = np.load(corpus.path('val', 'npy')).copy(); ids[1234] = 300
    np.save(tmp/'big_id.npy', ids); return tmp/'big_id.npy'

CASES = {
    'missing-data-file': lambda t, c, e: (data(t, c, train=t/'nope.npy'), ['nope.npy', 'not found']),
    'data-is-a-directory': lambda t, c, e: (os.mkdir(t/'dir.npy') or data(t, c, train=t/'dir.npy'), ['dir.npy', 'directory']),
    'float-npy': lambda t, c, e: (np.save(t/'float.npy', np.arange(1000, dtype=np.float32)) or data(t, c, train=t/'float.npy'),
                                  ['float.npy', 'float32', 'integer']),
    'raw-odd-byte-count': lambda t, c, e: ((t/'odd.ids').write_bytes(b'\x01\x00' * 500 + b'\x01') and data(t, c, val=t/'odd.ids'),
                                           ['odd.ids', '1001 bytes', 'multiple']),
    'empty-raw-file': lambda t, c, e: ((t/'empty.bin').write_bytes(b'') or data(t, c, train=t/'empty.bin'), ['empty.bin', 'empty']),
    'empty-npy-file': lambda t, c, e: (np.save(t/'empty.npy', np.zeros(0, np.uint16)) or data(t, c, val=t/'empty.npy'),
                                      ['empty.npy', 'empty']),
    'token-id-past-vocab': lambda t, c, e: (data(t, c, val=_too_large(t, c)), ['big_id.npy', '300', re.compile(r'vocab_size (is )?256'), re.compile(r'1,?234')]),
    'data-shorter-than-context': lambda t, c, e: (np.save(t/'short.npy', np.arange(20, dtype=np.uint16)) or data(t, c, val=t/'short.npy'),
                                                  ['short.npy', '20 tokens', 'context_length 32']),
    'unknown-flag': lambda t, c, e: (data(t, c) + ['--bogus_flag', '3'], ['--bogus_flag']),
    'unknown-config-key': lambda t, c, e: (['--config', config_file(t, '{"d_modle": 32}')] + data(t, c), ['bad.json', "'d_modle'", 'd_model']),
    'malformed-json': lambda t, c, e: (['--config', config_file(t, '{"d_model": 32,\n')] + data(t, c), ['bad.json', 'JSON', 'line 2']),
    'wrong-type-flag': lambda t, c, e: (data(t, c) + ['--d_model', 'wide'], ['d_model', "'wide'", 'int']),
    'wrong-type-config': lambda t, c, e: (['--config', config_file(t, '{"batch_size": "sixteen"}')] + data(t, c),
                                          ['bad.json', 'batch_size', "'sixteen'"]),
    'heads-not-dividing-d_model': lambda t, c, e: (data(t, c) + ['--num_heads', '3'], ['num_heads (3)', 'd_model (32)']),
    'negative-lr': lambda t, c, e: (data(t, c) + ['--lr', '-0.001'], ['lr must', '-0.001']),
    'warmup-longer-than-run': lambda t, c, e: (data(t, c) + ['--warmup_iters', '50'], ['warmup_iters (50)', 'max_iters (20)']),
    'beta2-not-below-1': lambda t, c, e: (data(t, c) + ['--beta2', '1.0'], ['beta2', '1.0']),
    'unavailable-device': lambda t, c, e: (data(t, c) + ['--device', NO_SUCH_DEVICE], [f"'{NO_SUCH_DEVICE}'", 'not available']),
    'resume-missing-checkpoint': lambda t, c, e: (data(t, c) + ['--checkpoint_dir', e, '--resume_from', e/'checkpoint_iter_999.pt'],
                                                  ['checkpoint_iter_999.pt', 'not found']),
    'resume-truncated-checkpoint': lambda t, c, e: (data(t, c) + ['--resume_from', corrupt_copy(e/'checkpoint_iter_20.pt', t/'trunc.pt', lambda n: n // 2)],
                                                    ['trunc.pt', 'checkpoint']),
    'resume-garbage-checkpoint': lambda t, c, e: (data(t, c) + ['--resume_from', (t/'garbage.pt').write_bytes(os.urandom(5000)) and t/'garbage.pt'],
                                                  ['garbage.pt', 'checkpoint']),
    'resume-foreign-checkpoint': lambda t, c, e: (data(t, c) + ['--resume_from', _save_foreign(t)], ['foreign.pt', 'model_state_dict']),
    'resume-checkpoint-that-runs-code': lambda t, c, e: (data(t, c) + ['--resume_from', _save_code(t)], ['evil.pt', 'refusing']),
    'resume-with-other-architecture': lambda t, c, e: (data(t, c) + ['--checkpoint_dir', e, '--resume_from', e/'checkpoint_iter_20.pt',
                                                                     '--d_model', '64', '--num_layers', '2'],
                                                       ['d_model', 'num_layers', '32', '64']),
    'fresh-run-in-a-used-checkpoint-dir': lambda t, c, e: (data(t, c) + ['--checkpoint_dir', e], [str(e), 'already holds a run']),
}

@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_clear_line(case, lm, corpus, existing, tmp_path):
    bad = tmp_path/'inputs'; bad.mkdir()
    args, names = CASES[case](bad, corpus, existing)
    fresh = tmp_path/'fresh_run'
    argv = [*lm.tiny_flags(vocab_size=256), '--checkpoint_dir', fresh, *args]
    before = lm.snapshot(tmp_path, existing, corpus.dir)
    run = lm.run(*argv, cwd=tmp_path)
    assert run.returncode == 2, run
    assert 'Traceback' not in run.stdout + run.stderr, run
    lines = [l for l in run.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), run
    msg = lines[0]
    for n in names:
        if isinstance(n, re.Pattern): assert n.search(msg), f"{n.pattern!r} not in {msg!r}"
        else: assert str(n) in msg, f"{n!r} not in {msg!r}"
    assert not re.search(r'^(Iter|\[EVAL\]|\[CHECKPOINT\])', run.stdout, re.M), run
    assert lm.snapshot(tmp_path, existing, corpus.dir) == before, f"files changed by a failed run\n{run}"
    assert not fresh.exists()
    if case == 'resume-checkpoint-that-runs-code': assert not (bad/'PWNED').exists(), "loading the checkpoint ran its code"
